package main

import (
	"errors"
	"fmt"
	"io"
	"log"
	"os"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/cobra"

	"imgfuse/aio"
	"imgfuse/coroutine"
	"imgfuse/drivers"
	"imgfuse/fusefs"
)

// mountOptions are the flags and arguments of `imgfuse mount`.
type mountOptions struct {
	image, mountpoint string // as the user spelled them (for messages)
	absImage          string // absolute
	absMountpoint     string // absolute, symlinks resolved (as in mountinfo)

	readOnly   bool
	foreground bool
	format     string
	snapshot   string
	name       string
	allowOther bool
	noDirectIO bool
	forceShare bool
	growable   bool
	noPassthru bool
	lazyRefcnt bool
	cacheSize  string
	debug      bool
	logFile    string
	// nonEmpty: mount over a directory that holds files (hiding them).
	nonEmpty bool

	// overlay: serve a temporary qcow2 overlay over the image, removed
	// on exit; overlayKeep: the overlay at this path, kept (absolute
	// after validate).
	overlay     bool
	overlayKeep string
	// pidFile receives the server's pid once the mount answers (absolute
	// after validate).
	pidFile string
	// removeOnExit lists files and then (empty) directories the server
	// removes once it has unmounted and closed the image: the demo's
	// sample files. Not a user flag.
	removeOnExit []string
	// defaultLog is the default log the parent opened as this daemon's
	// stdout and stderr (daemonlog.go), "" with --log or --foreground.
	// A hidden flag, set by the parent only.
	defaultLog string
	// warn delivers a one-line warning (without the "imgfuse: " prefix)
	// to the user's terminal: stderr for a --foreground server or the
	// parent of a daemon, the readiness pipe in the daemon (whose parent
	// prints it). nil: the log only. Not a user flag.
	warn func(msg string)
}

const mountLong = `Mount IMAGE so that MOUNTPOINT exposes it as one regular file.

MOUNTPOINT must exist. If it is a directory, the disk appears as
MOUNTPOINT/disk (see --name); if it is a regular file, it becomes the disk.
A directory that is not empty, or a regular file that is not, is refused
(exit 7), since the mount would hide what it holds, unless --nonempty is
given. A MOUNTPOINT that is the image itself, its external data file or a
file of its backing chain (also through a hard or symbolic link) is
refused (exit 7) even with --nonempty.

A qcow2 image whose metadata points past the end of its file (a copy cut
short) is refused for a writable mount (exit 6, with the reason); with
--read-only it mounts with a one-line warning naming the problem and
'imgfuse check', and reads of the damaged range fail with EIO. 'imgfuse
status' shows how many I/O errors a mount returned and the last one, and
names the server's log: --log FILE, or its default log next to its state
file (1 MiB, kept after it exits).

By default imgfuse detaches and returns once the mount answers; errors from
opening the image are printed here and the exit code is non-zero. Stop it
with 'imgfuse unmount MOUNTPOINT', which returns once the image is flushed
and closed.

The disk is writable unless --read-only, --snapshot or --force-share is
given; a read-only disk refuses open(O_RDWR) with EROFS so that
'mount -o loop' falls back to a read-only mount by itself. An image that
cannot be opened for writing (a corrupt qcow2 image, a file without write
permission) is not mounted: the error says so, and --read-only still
mounts it. A write past the end of the disk fails with ENOSPC unless
--growable is given; 'truncate -s' grows the disk either way, and
shrinking it is refused.

On Linux 6.9 or later, run as root, opens of a raw image's disk for
reading only are served by the kernel straight from the image file (FUSE
passthrough); opens for writing still go through imgfuse. The log says
'passthrough: on' or 'passthrough: off: <why>'; --no-passthrough turns it
off.

Without root the mount goes through fusermount3 (/dev/fuse must be open
to users, as distributions make it). Only the mounting user reaches the
disk, not even root, unless --allow-other (which needs user_allow_other in
/etc/fuse.conf). If fusermount3 refuses the mount, its reason is printed:
'imgfuse: mount MOUNTPOINT: fusermount3: ...'.

The server unmounts on SIGINT, SIGTERM or SIGHUP (unless the disk is busy:
then it logs and keeps serving), and after any unmount flushes and closes
the image and exits; 'imgfuse unmount' waits for that and fails if the
flush did.

--overlay sends every write to a temporary qcow2 overlay whose backing
file is IMAGE (like qemu-nbd -s): IMAGE is opened read-only and stays
byte-identical, other read-only users (qemu-img info, another
imgfuse mount --read-only) can use it meanwhile, and the overlay (in
$TMPDIR, else /var/tmp) is deleted when the server exits. --overlay-keep
FILE creates the overlay at FILE (which must not exist) and keeps it.

--pidfile FILE: the server writes its pid to FILE once the mount answers
and removes FILE when it exits.

Encrypted images are refused (exit 5). A LUKS container, though, is
exposed as its raw encrypted bytes with --format raw, for cryptsetup to
open the disk. An image in a format imgfuse recognises but cannot read
(VMDK, VHDX, QED, qcow version 1, Parallels, DMG, cloop, Bochs)
is refused by name (exit 5) rather than exposed as a raw disk, and so is
a qcow2 image whose backing file is one; --format raw exposes the file's
own bytes.

Exit status: 0 once the mount answers (with --foreground: after a clean
unmount and flush); 2 for usage errors; 3 if the image cannot be opened, 4
if another process holds its lock, 5 if it uses an unsupported feature
(an encrypted image, or a format imgfuse cannot read), 6 if it is corrupt, 7 if the mount itself
fails (the mountpoint is missing, not empty, already a mount, or the FUSE
mount is refused), 8 (with --foreground) if the final flush fails; 1 for
anything else.`

func newMountCmd() *cobra.Command {
	o := &mountOptions{}
	cmd := &cobra.Command{
		Use:   "mount [flags] IMAGE MOUNTPOINT",
		Short: "Expose a disk image as a file on MOUNTPOINT",
		Long:  mountLong,
		Example: `  imgfuse mount disk.qcow2 /mnt/img
  sudo mount -o loop /mnt/img/disk /mnt/root
  imgfuse mount --read-only disk.qcow2 /mnt/img
  imgfuse mount --snapshot before-upgrade disk.qcow2 /mnt/img
  imgfuse mount --overlay --pidfile /run/img.pid base.qcow2 /mnt/img   # writes thrown away`,
		Args: exactArgs("IMAGE", "MOUNTPOINT"),
		RunE: func(cmd *cobra.Command, args []string) error {
			o.image, o.mountpoint = args[0], args[1]
			if err := checkFormatFlag(o.format); err != nil {
				return err
			}
			if err := o.checkWriteFlags(); err != nil {
				return err
			}
			if o.debug && o.logFile == "" && !o.foreground {
				return usagef("--debug needs --log FILE (or --foreground, to log to stderr): a detached server's messages are discarded")
			}
			if o.name != "" && (strings.ContainsRune(o.name, '/') || o.name == "." || o.name == "..") {
				return usagef("invalid --name %q: a file name, without '/'", o.name)
			}
			if fd, ok := daemonReadyFD(); ok {
				o.absImage, o.absMountpoint = o.image, o.mountpoint
				return runDaemonChild(o, fd)
			}
			stderr := cmd.ErrOrStderr()
			o.warn = func(msg string) { fmt.Fprintf(stderr, "imgfuse: %s\n", msg) }
			if err := o.validate(); err != nil {
				return err
			}
			if o.foreground {
				var logw io.Writer = cmd.ErrOrStderr()
				if o.logFile != "" {
					lf, err := os.OpenFile(o.logFile, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o644)
					if err != nil {
						return usagef("--log: %v", err)
					}
					defer lf.Close()
					logw = lf
				}
				logger := log.New(logw, "imgfuse: ", log.LstdFlags)
				if o.logFile != "" {
					// stderr gets the warning; the log keeps it too.
					toTerm := o.warn
					o.warn = func(msg string) { toTerm(msg); logger.Print(msg) }
				} else {
					o.warn = func(msg string) { logger.Print(msg) } // the log is stderr
				}
				return serve(o, logger, func() {
					logger.Printf("mounted %s on %s; Ctrl-C or 'imgfuse unmount %s' to stop",
						o.image, o.mountpoint, o.mountpoint)
				})
			}
			return startDaemon(o)
		},
	}
	f := cmd.Flags()
	f.BoolVarP(&o.readOnly, "read-only", "r", false, "expose the disk read-only (open(O_RDWR) fails with EROFS)")
	f.BoolVar(&o.foreground, "foreground", false, "serve in the foreground until unmounted or interrupted")
	f.StringVarP(&o.format, "format", "f", "auto", "image format: "+strings.Join(formatChoices(), "|"))
	f.StringVar(&o.snapshot, "snapshot", "", "expose internal snapshot `NAME|ID` (read-only) instead of the active disk")
	f.StringVar(&o.name, "name", "", "file name of the disk in a directory MOUNTPOINT (default \"disk\")")
	f.BoolVar(&o.allowOther, "allow-other", false, "let other users reach the mount (needs user_allow_other in /etc/fuse.conf)")
	f.BoolVar(&o.noDirectIO, "no-direct-io", false, "open the image without O_DIRECT (for filesystems that refuse it, e.g. tmpfs)")
	f.BoolVarP(&o.forceShare, "force-share", "U", false, "take no image locks, as qemu-img -U: mount an image another process may be writing (implies --read-only)")
	f.BoolVar(&o.growable, "growable", false, "let a write past the end of the disk grow it instead of failing with ENOSPC")
	f.BoolVar(&o.noPassthru, "no-passthrough", false, "never let the kernel serve a raw image's reads itself (FUSE passthrough); every read then goes through imgfuse")
	f.BoolVar(&o.lazyRefcnt, "lazy-refcounts", false, "qcow2 v3: use lazy refcounts for this mount (fewer metadata writes; a crash then needs a refcount rebuild, done by the next writable mount)")
	f.StringVar(&o.cacheSize, "cache-size", "", "most memory for each image's metadata cache, e.g. 8M or 256M (qcow2 L2 tables; default: enough to map the disk, at most 32M)")
	f.BoolVar(&o.debug, "debug", false, "log every FUSE request (needs --log FILE, or --foreground to log to stderr)")
	f.StringVar(&o.logFile, "log", "", "append the daemon's messages to `FILE` instead of its default log (named by 'imgfuse status')")
	f.BoolVar(&o.overlay, "overlay", false, "send writes to a temporary qcow2 overlay, deleted on exit; IMAGE stays unchanged (like qemu-nbd -s)")
	f.StringVar(&o.overlayKeep, "overlay-keep", "", "like --overlay, but create the overlay at `FILE` (must not exist) and keep it")
	f.BoolVar(&o.nonEmpty, "nonempty", false, "mount on a directory or regular file MOUNTPOINT that is not empty, hiding what it holds while mounted")
	f.StringVar(&o.pidFile, "pidfile", "", "write the server's pid to `FILE` once the mount answers; removed on exit")
	f.StringArrayVar(&o.removeOnExit, "remove-on-exit", nil, "internal: paths the server removes after unmounting")
	_ = f.MarkHidden("remove-on-exit")
	f.StringVar(&o.defaultLog, "default-log", "", "internal: the default log the parent opened as stdout and stderr")
	_ = f.MarkHidden("default-log")
	return cmd
}

// mountReadOnly decides whether the disk is exposed read-only, and so
// whether the image is opened read-only. Every format is writable by
// default. Snapshots are read-only views by definition. Without image locks
// nothing stops a writer, so --force-share is read-only too.
//
// A driver that cannot write an image it was asked to open writable (the
// qcow2 driver, for a corrupt image) fails the open: serve reports that
// rather than exposing a writable disk whose every write fails, which would
// keep `mount -o loop` from falling back to read-only.
func mountReadOnly(readOnlyFlag bool, snapshot string, forceShare bool) bool {
	return readOnlyFlag || snapshot != "" || forceShare
}

// checkWriteFlags refuses write-path flags on a mount that cannot write:
// silently ignoring them would hide a mistake in a script.
func (o *mountOptions) checkWriteFlags() error {
	for _, f := range []struct {
		name string
		set  bool
	}{
		{"--overlay", o.overlay},
		{"--overlay-keep", o.overlayKeep != ""},
		{"--growable", o.growable},
		{"--lazy-refcounts", o.lazyRefcnt},
	} {
		if !f.set {
			continue
		}
		switch {
		case o.readOnly:
			return usagef("%s needs a writable mount, not --read-only", f.name)
		case o.snapshot != "":
			return usagef("%s needs a writable mount; --snapshot is read-only", f.name)
		case o.forceShare:
			return usagef("%s needs a writable mount; --force-share is read-only", f.name)
		}
	}
	return nil
}

// validate checks, in the calling process, what can be checked before
// starting a daemon, so that common mistakes fail fast with a clear message.
func (o *mountOptions) validate() error {
	// A log file that cannot be made is a bad flag value, as a
	// --pidfile in a missing directory is.
	if o.logFile != "" {
		if fi, err := os.Stat(filepath.Dir(o.logFile)); err != nil || !fi.IsDir() {
			return usagef("--log %s: no such directory %s", o.logFile, filepath.Dir(o.logFile))
		}
		// Absolute: the daemon records it in its state file, for status.
		if abs, err := filepath.Abs(o.logFile); err == nil {
			o.logFile = abs
		}
	}
	// OpenHead refuses, without blocking, what cannot be an image: a
	// FIFO would block the plain open below for ever.
	head, err := aio.OpenHead(o.image)
	if err != nil {
		return openError(describeOpenError(o.image, err)) // "open IMAGE: is a FIFO, not a regular file or block device"
	}
	head.Close()
	f, err := os.Open(o.image)
	if err != nil {
		return openError(describeOpenError(o.image, err)) // "open IMAGE: no such file or directory"
	}
	fi, err := f.Stat()
	f.Close()
	if err != nil {
		return openError(fmt.Errorf("open %s: %w", o.image, err))
	}
	if fi.IsDir() {
		return openError(fmt.Errorf("open %s: is a directory, not a disk image", o.image))
	}
	if o.absImage, err = filepath.Abs(o.image); err != nil {
		return err
	}

	if err := checkFormat(o.image, o.format); err != nil {
		return err
	}
	format, err := resolveFormat(o.image, o.format)
	if err != nil {
		return openError(err)
	}
	if err := o.validateMountpoint(format); err != nil {
		return mountFailed(err)
	}
	if o.snapshot != "" && format == "raw" {
		return fmt.Errorf("--snapshot: %s is a raw image, which has no snapshots", o.image)
	}
	if o.lazyRefcnt && format == "raw" && !o.overlayed() {
		return fmt.Errorf("--lazy-refcounts: %s is a raw image, which has no refcounts", o.image)
	}
	if o.cacheSize != "" {
		if _, err := parseSize(o.cacheSize); err != nil {
			return usagef("--cache-size: %v", err)
		}
	}
	if o.overlayKeep != "" {
		if o.overlayKeep, err = filepath.Abs(o.overlayKeep); err != nil {
			return err
		}
		if _, err := os.Lstat(o.overlayKeep); err == nil {
			return usagef("--overlay-keep %s: the file exists; refusing to overwrite it", o.overlayKeep)
		}
		if fi, err := os.Stat(filepath.Dir(o.overlayKeep)); err != nil || !fi.IsDir() {
			return usagef("--overlay-keep %s: no such directory %s", o.overlayKeep, filepath.Dir(o.overlayKeep))
		}
	}
	if o.pidFile != "" {
		if o.pidFile, err = filepath.Abs(o.pidFile); err != nil {
			return err
		}
		if fi, err := os.Stat(filepath.Dir(o.pidFile)); err != nil || !fi.IsDir() {
			return usagef("--pidfile %s: no such directory %s", o.pidFile, filepath.Dir(o.pidFile))
		}
	}
	return nil
}

// overlayed reports whether writes go to an overlay (--overlay or
// --overlay-keep).
func (o *mountOptions) overlayed() bool { return o.overlay || o.overlayKeep != "" }

// validateMountpoint checks that the mountpoint exists, can take a mount,
// is not a file of the image's chain and, unless --nonempty, hides
// nothing: the same rules for a directory and a regular file. It changes
// nothing, so a refusal leaves everything as it was.
func (o *mountOptions) validateMountpoint(format string) error {
	mi, err := os.Stat(o.mountpoint)
	switch {
	case errors.Is(err, syscall.ENOTCONN) || isDeadMount(o.mountpoint):
		return fmt.Errorf("mountpoint %s is a dead mount (its server has exited); run 'imgfuse unmount %s' first",
			o.mountpoint, o.mountpoint)
	case errors.Is(err, os.ErrNotExist):
		return fmt.Errorf("mountpoint %s does not exist (create a directory or an empty file there)", o.mountpoint)
	case err != nil:
		return fmt.Errorf("mountpoint: %w", err)
	case !mi.IsDir() && !mi.Mode().IsRegular():
		return fmt.Errorf("mountpoint %s is neither a directory nor a regular file", o.mountpoint)
	}
	if o.absMountpoint, err = canonicalPath(o.mountpoint); err != nil {
		return fmt.Errorf("mountpoint: %w", err)
	}
	e, mounted, err := findMount(o.absMountpoint)
	if err != nil {
		return fmt.Errorf("mountpoint: %w", err)
	}
	if mounted {
		return fmt.Errorf("mountpoint %s is already a mount (%s, type %s); unmount it first or choose another",
			o.mountpoint, e.Source, e.FSType)
	}
	if mi.Mode().IsRegular() {
		// Not even --nonempty: the mount would cover a file the image
		// itself is made of.
		if err := o.checkNotInChain(mi, format); err != nil {
			return err
		}
	}
	switch {
	case o.nonEmpty:
	case mi.IsDir():
		if name, err := firstEntry(o.mountpoint); err != nil {
			return fmt.Errorf("mountpoint: %w", err)
		} else if name != "" {
			return fmt.Errorf("mountpoint %s is not empty (it holds %s); the mount would hide its files: "+
				"choose an empty directory, or give --nonempty", o.mountpoint, name)
		}
	case mi.Size() > 0:
		return fmt.Errorf("mountpoint %s is a file of %d bytes; the mount would hide its contents: "+
			"choose an empty file or a directory, or give --nonempty", o.mountpoint, mi.Size())
	}
	return nil
}

// checkNotInChain refuses a regular-file mountpoint (mi) that is the
// image, its external data file or a file of its backing chain, however
// it is reached (a hard link, a symbolic link): compared by device and
// inode. The chain is read from a read-only open without image locks,
// closed at once; an image that does not open is compared alone (its
// mount fails at its own open, before mounting).
func (o *mountOptions) checkNotInChain(mi os.FileInfo, format string) error {
	files := []drivers.ChainFile{{Path: o.image, Role: "image"}}
	opts := drivers.OpenOptions{ReadOnly: true, ForceShare: true, NoDataFile: true, Formats: imageFormats()}
	if d, _, err := drivers.Open(o.image, format, opts); err == nil {
		if fl := drivers.FilesOf(d); len(fl) > 0 {
			files = fl
		}
		d.Close()
	}
	for _, f := range files {
		fi, err := os.Stat(f.Path)
		if err != nil || !os.SameFile(mi, fi) {
			continue
		}
		what := "the image itself"
		if f.Role != "image" {
			what = fmt.Sprintf("the %s of %s (%s)", f.Role, f.Of, f.Path)
		}
		return fmt.Errorf("mountpoint %s is %s: the mount would hide a file of the image it serves behind its own disk; "+
			"choose another mountpoint (--nonempty does not allow this)", o.mountpoint, what)
	}
	return nil
}

// firstEntry returns the name of one entry of directory dir, "" if it is
// empty.
func firstEntry(dir string) (string, error) {
	f, err := os.Open(dir)
	if err != nil {
		return "", err
	}
	defer f.Close()
	names, err := f.Readdirnames(1)
	if errors.Is(err, io.EOF) {
		return "", nil
	}
	if err != nil {
		return "", err
	}
	return names[0], nil
}

// resolveFormat returns the format name to open image with: name itself,
// or the probed one for "auto".
func resolveFormat(image, name string) (string, error) {
	if name != "" && name != "auto" {
		return name, nil
	}
	f, err := drivers.ProbeFile(imageFormats(), image)
	if err != nil {
		return "", fmt.Errorf("probe: %w", err)
	}
	return f.Name(), nil
}

// serve opens the image, mounts it, calls ready once the mount answers,
// and serves until the mount goes away (SIGINT/SIGTERM unmount it; so does
// an external umount). It then flushes and closes the image. Errors before
// ready are returned for the caller to report; later ones are logged and
// also returned.
func serve(o *mountOptions, logger *log.Logger, ready func()) (err error) {
	// Catch signals before mounting so that none can kill us with the
	// mount up and the image dirty.
	// SIGHUP too: a --foreground server whose terminal goes away stops
	// like one interrupted (the daemon has no terminal to lose).
	sigs := make(chan os.Signal, 2)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM, syscall.SIGHUP)
	defer signal.Stop(sigs)
	// Whatever happens, the demo's files go once the image is closed.
	defer removePaths(o.removeOnExit, logger)

	format, err := resolveFormat(o.image, o.format)
	if err != nil {
		return openError(fmt.Errorf("open %s: %w", o.image, err))
	}
	ro := mountReadOnly(o.readOnly, o.snapshot, o.forceShare)
	opts := drivers.OpenOptions{
		ReadOnly:      ro,
		Formats:       imageFormats(),
		Snapshot:      o.snapshot,
		NoDirectIO:    o.noDirectIO,
		ForceShare:    o.forceShare,
		Growable:      o.growable && !ro,
		LazyRefcounts: o.lazyRefcnt && !ro,
		// The format was probed just above: a probed raw image guards
		// its first sector (drivers.OpenOptions.Probed).
		Probed: o.format == "" || o.format == "auto",
		Logf:   logger.Printf,
	}
	if o.cacheSize != "" {
		if opts.CacheSize, err = parseSize(o.cacheSize); err != nil {
			return usagef("--cache-size: %v", err)
		}
	}
	var d drivers.Driver
	overlay := ""
	if o.overlayed() {
		if d, overlay, err = openOverlay(o, format, opts); err != nil {
			return err
		}
		logger.Printf("writes go to the overlay %s", overlay)
		if o.overlayKeep == "" {
			// Removed on every way out, after the close below.
			defer func() {
				if rerr := os.Remove(overlay); rerr != nil {
					logger.Printf("remove overlay: %v", rerr)
				}
			}()
		}
	} else {
		var f drivers.Format
		if d, f, err = drivers.Open(o.image, format, opts); err != nil {
			return openError(describeOpenError(o.image, explainWritableOpen(o.image, format, opts, err)))
		}
		format = f.Name()
	}
	if dmg := drivers.DamageOf(d); dmg != nil {
		// The open went on (read-only, or damage below a writable top
		// that never writes there): say so now, not at the first EIO.
		msg := damageWarning(o.image, dmg)
		if o.warn != nil {
			o.warn(msg)
		} else {
			logger.Print(msg)
		}
	}
	var mtime time.Time
	if fi, err := os.Stat(o.image); err == nil {
		mtime = fi.ModTime()
	}
	absImage := o.absImage
	if absImage == "" {
		absImage, _ = filepath.Abs(o.image)
	}
	srv, err := fusefs.Mount(o.mountpoint, d, fusefs.Options{
		Name:       o.name,
		ReadOnly:   ro,
		Growable:   opts.Growable,
		AllowOther: o.allowOther,
		ModTime:    mtime,
		FSName:     "imgfuse:" + absImage,
		Debug:      o.debug,
		Logger:     logger,

		NoPassthrough: o.noPassthru,
	})
	if err != nil {
		d.Close()
		if o.overlayKeep != "" {
			os.Remove(overlay) // we created it a moment ago; it holds nothing
		}
		var fe *fusefs.FusermountError
		if errors.As(err, &fe) {
			// fusermount3's own words: the reason, on one line.
			err = fmt.Errorf("mount %s: %w", o.mountpoint, fe)
		}
		return mountFailed(err)
	}
	passthrough := passthroughState(srv, o.noPassthru)
	logger.Printf("passthrough: %s", passthrough)

	logger.Printf("serving requests: %s", srv.Mode)
	mp := o.absMountpoint
	if mp == "" {
		mp, _ = canonicalPath(o.mountpoint)
	}
	state := daemonState{
		PID: os.Getpid(), Image: absImage, Mountpoint: mp,
		Format: format, ReadOnly: ro, Passthrough: passthrough,
		Overlay: overlay, OverlayTemporary: overlay != "" && o.overlayKeep == "",
		ServingMode: srv.Mode, PIDFile: o.pidFile,
		Started: time.Now().UTC(),
		Log:     o.logPath(),
	}
	statePath, serr := writeState(stateDir(), state)
	if serr != nil {
		logger.Printf("warning: %v ('imgfuse unmount' will not wait for this process)", serr)
	}
	if o.pidFile != "" {
		if perr := writePIDFile(o.pidFile, state.PID); perr != nil {
			// A script waiting for the pid file would wait for ever:
			// fail the mount instead.
			_ = srv.Unmount()
			srv.Wait()
			_ = closeImage(d, o.image, logger)
			if serr == nil {
				os.Remove(statePath)
			}
			if o.overlayKeep != "" {
				os.Remove(overlay)
			}
			return mountFailed(fmt.Errorf("--pidfile: %w", perr))
		}
		defer removePIDFile(o.pidFile, state.PID)
	}
	ready()

	served := make(chan struct{})
	go func() {
		srv.Wait()
		close(served)
	}()
	// I/O errors reach 'imgfuse status' through the state file, rewritten
	// when they happen: at once for the first of a while, then at most
	// every ioErrorPublishEvery (a dd over a damaged range fails every
	// request).
	var publishTimer <-chan time.Time
	var published time.Time
	publish := func() {
		st := srv.IOErrors()
		state.IOErrors, state.LastIOError = st.Count, ioErrorStateOf(st.Last)
		published = time.Now()
		if serr == nil {
			if _, werr := writeState(stateDir(), state); werr != nil {
				logger.Printf("warning: %v (status will not show the I/O errors)", werr)
			}
		}
	}
loop:
	for {
		select {
		case <-srv.IOErrorNotify():
			if publishTimer == nil {
				if wait := ioErrorPublishEvery - time.Since(published); wait > 0 {
					publishTimer = time.After(wait)
				} else {
					publish()
				}
			}
		case <-publishTimer:
			publishTimer = nil
			publish()
		case s := <-sigs:
			logger.Printf("%v: unmounting %s", s, mp)
			if err := srv.Unmount(); err != nil {
				// Typically EBUSY: a loop device still holds the disk.
				// Dropping the mount would fail the loop device's I/O,
				// so keep serving. busyReason reads only /proc and
				// /sys, never the mount we serve.
				why := "free the disk, then retry"
				if e, ok, _ := findMount(mp); ok && (errors.Is(err, syscall.EBUSY) || strings.Contains(err.Error(), "busy")) {
					why = busyReason(e, mp)
				}
				// go-fuse's fusermount error ends in a newline: one line.
				logger.Printf("%s; still serving: %s", strings.Join(strings.Fields(err.Error()), " "), why)
			}
		case <-served:
			break loop
		}
	}

	// The errors of the last moments go with a close error below.
	st := srv.IOErrors()
	state.IOErrors, state.LastIOError = st.Count, ioErrorStateOf(st.Last)
	closeName := o.image
	if overlay != "" {
		closeName = overlay
	}
	err = closeImage(d, closeName, logger)
	if serr == nil {
		// Leave the error where 'imgfuse unmount', waiting for us to
		// exit, finds it; a clean close removes the state file.
		if err != nil {
			state.CloseError = err.Error()
			if _, werr := writeState(stateDir(), state); werr != nil {
				os.Remove(statePath)
			}
		} else {
			os.Remove(statePath)
		}
	}
	if err != nil {
		return err
	}
	logger.Printf("%s unmounted; %s flushed and closed", mp, closeName)
	return nil
}

// writePIDFile writes pid to path atomically: a temporary file in the same
// directory, renamed over path, so a reader never sees a partial pid.
func writePIDFile(path string, pid int) error {
	tmp, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".*")
	if err != nil {
		return err
	}
	_, err = fmt.Fprintf(tmp, "%d\n", pid)
	if cerr := tmp.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Chmod(tmp.Name(), 0o644)
	}
	if err == nil {
		err = os.Rename(tmp.Name(), path)
	}
	if err != nil {
		os.Remove(tmp.Name())
	}
	return err
}

// removePIDFile removes path if it still holds pid (another server may
// have been started with the same --pidfile since).
func removePIDFile(path string, pid int) {
	b, err := os.ReadFile(path)
	if err == nil && strings.TrimSpace(string(b)) == strconv.Itoa(pid) {
		os.Remove(path)
	}
}

// removePaths removes each path in turn (files, then the directories that
// held them, which must be empty by then); errors are logged.
func removePaths(paths []string, logger *log.Logger) {
	for _, p := range paths {
		if err := os.Remove(p); err != nil && !errors.Is(err, os.ErrNotExist) {
			logger.Printf("remove %s: %v", p, err)
		}
	}
}

// passthroughState says whether the mount is in FUSE passthrough mode, for
// the log and the state file: "on", or "off: " and why.
func passthroughState(srv *fusefs.Server, noPassthru bool) string {
	on, why := srv.Passthrough()
	switch {
	case on:
		return "on"
	case noPassthru:
		return "off: --no-passthrough"
	}
	return "off: " + why
}

// closeImage flushes d and then closes it, even if the flush failed: the
// descriptors and image locks must go whatever happened. A flush error is
// logged at once (before the close, which may take time or fail too) and
// returned with any close error.
func closeImage(d drivers.Driver, image string, logger *log.Logger) error {
	var ferr error
	coroutine.Run(func(co *coroutine.Co) { ferr = d.Flush(co) })
	if ferr != nil {
		ferr = fmt.Errorf("flush %s: %v%w", image, trimPathError(ferr, image), sentinelOf(ferr))
		logger.Printf("%v; data written through the mount may not be in the image; closing it", ferr)
	}
	var cerr error
	if err := d.Close(); err != nil {
		cerr = fmt.Errorf("close %s: %v%w", image, trimPathError(err, image), sentinelOf(err))
	}
	if err := errors.Join(ferr, cerr); err != nil {
		return flushFailed(err)
	}
	return nil
}

// explainWritableOpen adds a hint to err, the failure to open an image for
// writing, when the image opens read-only: a driver refuses to write a
// corrupt image, and a user may lack write permission, yet either can be
// read with --read-only. The read-only open is closed at once.
func explainWritableOpen(image, format string, opts drivers.OpenOptions, err error) error {
	if opts.ReadOnly || errors.Is(err, drivers.ErrLocked) || errors.Is(err, os.ErrNotExist) ||
		strings.Contains(err.Error(), "read-only") { // the driver said so already
		return err
	}
	opts.ReadOnly, opts.Growable, opts.LazyRefcounts = true, false, false
	d, _, rerr := drivers.Open(image, format, opts)
	if rerr != nil {
		return err
	}
	d.Close()
	return fmt.Errorf("%w (it cannot be opened for writing; --read-only mounts it read-only)", err)
}

// damageWarning is the one-line warning about an image (or a file of its
// backing chain) whose metadata the open found damaged: the file, the
// first problem, what it means for reads, and the command that reports
// everything.
func damageWarning(image string, dmg error) string {
	file, cause := image, dmg.Error()
	var de *drivers.DamageError
	if errors.As(dmg, &de) {
		file, cause = de.Path, de.Err.Error()
	}
	where := file
	if file != image {
		where = file + " (in the backing chain of " + image + ")"
	}
	msg := fmt.Sprintf("warning: %s: %s; reads of the damaged range fail with EIO; run 'imgfuse check %s' for a full report",
		where, cause, shellQuote(file))
	return strings.NewReplacer("\n", " ", "\r", " ").Replace(msg) // one line, whatever a file name holds
}

// ioErrorPublishEvery is the shortest time between two rewrites of the
// state file for I/O errors.
const ioErrorPublishEvery = 250 * time.Millisecond

// ioErrorStateOf is e for the state file, nil for no error.
func ioErrorStateOf(e fusefs.IOError) *ioErrorState {
	if e.Op == "" {
		return nil
	}
	st := &ioErrorState{Time: e.Time.UTC(), Operation: e.Op, Cause: e.Cause}
	if e.Offset >= 0 {
		off := e.Offset
		st.Offset = &off
	}
	return st
}
