package session

import (
	"encoding/json"
	"strings"

	"imgfuse/imgtool"
	"imgfuse/remote"
)

// Options is everything a mount session needs: the flags and arguments of
// `imgfuse mount`, as the user gave them, and what the parent process
// resolved from them. The daemon child receives it whole, as JSON (see
// Start): no flag list is kept twice, so a new option reaches the daemon
// by being a field here.
type Options struct {
	// Image and Mountpoint as the user spelled them: for messages, and
	// opened from the directory the command ran in (the daemon starts
	// there and leaves it once the mount answers).
	Image      string `json:"image"`
	Mountpoint string `json:"mountpoint"`
	// AbsImage is absolute; AbsMountpoint absolute with its symlinks
	// resolved, as mountinfo names it. Set by Validate.
	AbsImage      string `json:"abs-image"`
	AbsMountpoint string `json:"abs-mountpoint"`

	ReadOnly      bool   `json:"read-only"`
	Foreground    bool   `json:"foreground"`
	Format        string `json:"format"`   // "auto", or a readable format
	Snapshot      string `json:"snapshot"` // internal snapshot NAME|ID
	Name          string `json:"name"`     // the disk's file name in a directory mountpoint
	AllowOther    bool   `json:"allow-other"`
	NoDirectIO    bool   `json:"no-direct-io"`
	ForceShare    bool   `json:"force-share"`
	Growable      bool   `json:"growable"`
	NoPassthrough bool   `json:"no-passthrough"`
	IOURing       bool   `json:"io-uring"`
	LazyRefcounts bool   `json:"lazy-refcounts"`
	CacheSize     string `json:"cache-size"`
	Debug         bool   `json:"debug"`
	// LogFile is --log (absolute after Validate).
	LogFile string `json:"log"`
	// NonEmpty: mount over a directory or file that is not empty.
	NonEmpty bool `json:"nonempty"`
	// Overlay: serve a temporary qcow2 overlay over the image, removed
	// on exit; OverlayKeep: the overlay at this path, kept (absolute
	// after Validate).
	Overlay     bool   `json:"overlay"`
	OverlayKeep string `json:"overlay-keep"`
	// PIDFile receives the server's pid once the mount answers
	// (absolute after Validate).
	PIDFile string `json:"pidfile"`
	// RemoveOnExit lists files and then (empty) directories the server
	// removes once it has unmounted and closed the image: the demo's
	// sample files.
	RemoveOnExit []string `json:"remove-on-exit"`
	// DefaultLog is the default log the parent opened as the daemon's
	// stdout and stderr (log.go), "" with --log or --foreground.
	DefaultLog string `json:"default-log"`

	// Remote is how remote images are fetched and cached (--cache-dir,
	// --cache-max, --s3-endpoint); Prefetch (--prefetch) fetches every
	// remote image of the mount whole in the background.
	Remote   remote.Config `json:"remote"`
	Prefetch bool          `json:"prefetch"`

	// Warn delivers a one-line warning (without the "imgfuse: " prefix)
	// to the user's terminal: stderr for a --foreground server or the
	// parent of a daemon, the readiness pipe in the daemon (whose parent
	// prints it). nil: the log only.
	Warn func(msg string) `json:"-"`
}

// CheckFlags refuses, as usage errors, combinations of options that make
// no sense whatever the image: checked before anything is opened.
func (o *Options) CheckFlags() error {
	if err := imgtool.CheckFormatFlag(o.Format); err != nil {
		return err
	}
	if o.Overlay && o.OverlayKeep != "" {
		return imgtool.Usagef("--overlay and --overlay-keep exclude each other (--overlay-keep FILE is --overlay with the overlay kept at FILE)")
	}
	if err := o.checkWriteFlags(); err != nil {
		return err
	}
	if o.Debug && o.LogFile == "" && !o.Foreground {
		return imgtool.Usagef("--debug needs --log FILE (or --foreground, to log to stderr): a detached server's messages are discarded")
	}
	if o.Name != "" && (strings.ContainsRune(o.Name, '/') || o.Name == "." || o.Name == "..") {
		return imgtool.Usagef("invalid --name %q: a file name, without '/'", o.Name)
	}
	return nil
}

// ReadOnlyMount decides whether the disk is exposed read-only, and so
// whether the image is opened read-only. Every format is writable by
// default. Snapshots are read-only views by definition. Without image locks
// nothing stops a writer, so --force-share is read-only too.
//
// A driver that cannot write an image it was asked to open writable (the
// qcow2 driver, for a corrupt image) fails the open: Serve reports that
// rather than exposing a writable disk whose every write fails, which would
// keep `mount -o loop` from falling back to read-only.
func (o *Options) ReadOnlyMount() bool {
	return o.ReadOnly || o.Snapshot != "" || o.ForceShare
}

// overlayed reports whether writes go to an overlay (--overlay or
// --overlay-keep).
func (o *Options) overlayed() bool { return o.Overlay || o.OverlayKeep != "" }

// logPath is the file a daemon started with o logs to, "" if none.
func (o *Options) logPath() string {
	if o.LogFile != "" {
		return o.LogFile
	}
	return o.DefaultLog
}

func (o *Options) marshal() (string, error) {
	b, err := json.Marshal(o)
	return string(b), err
}
