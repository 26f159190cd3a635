package mounts

import (
	"encoding/json"
	"errors"
	"fmt"
	"imgfuse/remote"
	"io"
	"os"
	"path/filepath"
	"sort"
	"text/tabwriter"
	"time"

	"imgfuse/imgtool"
)

// StatusEntry is one mount in `imgfuse status --output=json`. The keys
// are a contract for scripts: add, never rename.
type StatusEntry struct {
	Mountpoint        string    `json:"mountpoint"`
	Image             string    `json:"image"`
	Format            string    `json:"format"`
	PID               int       `json:"pid"`
	State             string    `json:"state"`
	ReadOnly          bool      `json:"read-only"`
	Passthrough       bool      `json:"passthrough"`
	PassthroughDetail string    `json:"passthrough-detail"`
	Overlay           *string   `json:"overlay"`
	OverlayTemporary  bool      `json:"overlay-temporary"`
	ServingMode       string    `json:"serving-mode"`
	PIDFile           *string   `json:"pidfile"`
	Started           time.Time `json:"started"`
	Hint              *string   `json:"hint"`
	// IOErrors, LastIOError and Log: what the mount's callers got as
	// EIO, and where the server logs (issue 12).
	IOErrors    uint64        `json:"io-errors"`
	LastIOError *IOErrorState `json:"last-io-error"`
	Log         *string       `json:"log"`
	// Remote: a remote image's objects (State.Remote); left out for
	// local images.
	Remote []remote.Stats `json:"remote,omitempty"`
}

// List reads every state file in dir of a mount of the calling user (as
// State.Mine), sorted by mountpoint. A directory that does not exist yet
// holds no mounts.
func List(dir string) ([]StatusEntry, error) {
	if err := CheckStateDir(dir); errors.Is(err, os.ErrNotExist) {
		return []StatusEntry{}, nil
	} else if err != nil {
		return nil, err
	}
	names, err := filepath.Glob(filepath.Join(dir, "*.json"))
	if err != nil {
		return nil, err
	}
	mounts, err := Read(nil)
	if err != nil {
		return nil, err
	}
	live := map[string]*Entry{}
	for _, m := range mounts {
		live[m.Mountpoint] = m
	}
	entries := []StatusEntry{}
	for _, name := range names {
		b, err := os.ReadFile(name)
		if err != nil {
			continue // removed by a server exiting meanwhile
		}
		var st State
		if json.Unmarshal(b, &st) != nil || st.Mountpoint == "" || StatePath(dir, st.Mountpoint) != name || !st.Mine(os.Geteuid()) {
			continue
		}
		entries = append(entries, describeState(st, live))
	}
	sort.Slice(entries, func(i, j int) bool { return entries[i].Mountpoint < entries[j].Mountpoint })
	return entries, nil
}

// One is the status of the mount at mountpoint, for `imgfuse status
// MOUNTPOINT`: an error (exit 1) naming what is there instead when it is
// not one of the calling user's imgfuse mounts (nothing, the disk of one,
// another filesystem, another user's mount).
func One(dir, mountpoint string) (StatusEntry, error) {
	fail := func(format string, args ...any) (StatusEntry, error) {
		return StatusEntry{}, &imgtool.Error{Op: "status", Path: mountpoint, Named: true, Err: fmt.Errorf(format, args...)}
	}
	mp, err := resolveMountpoint(mountpoint)
	if err != nil {
		return StatusEntry{}, &imgtool.Error{Op: "status", Path: mountpoint, Err: err}
	}
	entries, err := List(dir)
	if err != nil {
		return StatusEntry{}, err
	}
	for _, e := range entries {
		if e.Mountpoint == mp {
			return e, nil
		}
	}
	e, mounted, _ := Find(mp)
	switch {
	case mounted && !IsImgfuse(e):
		return fail("%s is not an imgfuse mount: it is %s %s mount (%s)", mountpoint, article(e.FSType), e.FSType, e.Source)
	case mounted:
		if uid, ok := Owner(e); ok && uid != os.Geteuid() {
			return fail("%s is not one of your imgfuse mounts: uid %d mounted it", mountpoint, uid)
		}
		return fail("%s is an imgfuse mount without a state file here (its server keeps it in another state directory)", mountpoint)
	}
	if p, ok, _ := Find(filepath.Dir(mp)); ok && IsImgfuse(p) {
		return fail("%s is not an imgfuse mount: it is a file of the one at %s", mountpoint, filepath.Dir(mp))
	}
	return fail("%s is not an imgfuse mount: nothing is mounted there", mountpoint)
}

// describeState turns a state file into a status entry, deciding its
// state from the process and the mount table.
func describeState(st State, live map[string]*Entry) StatusEntry {
	e := StatusEntry{
		Mountpoint: st.Mountpoint, Image: st.Image, Format: st.Format, PID: st.PID,
		ReadOnly: st.ReadOnly, Passthrough: st.Passthrough == "on", PassthroughDetail: st.Passthrough,
		OverlayTemporary: st.OverlayTemporary, ServingMode: st.ServingMode, Started: st.Started,
		IOErrors: st.IOErrors, LastIOError: st.LastIOError, Remote: st.Remote,
	}
	if st.Log != "" {
		e.Log = &st.Log
	}
	if st.Overlay != "" {
		e.Overlay = &st.Overlay
	}
	if st.PIDFile != "" {
		e.PIDFile = &st.PIDFile
	}
	m, mounted := live[st.Mountpoint]
	mounted = mounted && IsImgfuse(m)
	switch {
	case !ServerRunning(st.PID):
		e.State = "dead"
		hint := "imgfuse unmount " + imgtool.ShellQuote(st.Mountpoint)
		e.Hint = &hint
	case mounted:
		e.State = "mounted"
	default:
		e.State = "unmounting"
	}
	return e
}

// PrintStatus prints entries as a table, and the hints below it.
func PrintStatus(w io.Writer, entries []StatusEntry) error {
	if len(entries) == 0 {
		_, err := fmt.Fprintln(w, "no imgfuse mounts")
		return err
	}
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "MOUNTPOINT\tIMAGE\tFORMAT\tPID\tSTATE\tACCESS\tPASSTHROUGH\tOVERLAY\tSERVING\tIO-ERRORS\tLOG")
	dash := func(s string) string {
		if s == "" {
			return "-"
		}
		return s
	}
	var hints []string
	for _, e := range entries {
		access := "rw"
		if e.ReadOnly {
			access = "ro"
		}
		pt := "off"
		if e.Passthrough {
			pt = "on"
		}
		ov := "-"
		if e.Overlay != nil {
			ov = *e.Overlay
			if !e.OverlayTemporary {
				ov += " (kept)"
			}
		}
		logPath := "-"
		if e.Log != nil {
			logPath = *e.Log
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%d\t%s\t%s\t%s\t%s\t%s\t%d\t%s\n", e.Mountpoint, e.Image, dash(e.Format), e.PID,
			e.State, access, pt, ov, dash(e.ServingMode), e.IOErrors, logPath)
		if e.Hint != nil {
			hints = append(hints, fmt.Sprintf("%s: the server (pid %d) is gone; run '%s'", e.Mountpoint, e.PID, *e.Hint))
		}
		for _, r := range e.Remote {
			h := fmt.Sprintf("%s: %s: %d of %d bytes cached, %d fetched in %d request(s), %d cache hit(s)",
				e.Mountpoint, r.URL, r.Cached, r.Size, r.Fetched, r.Requests, r.CacheHits)
			if r.Prefetch != "" {
				h += fmt.Sprintf(", prefetch %s (%d%%)", r.Prefetch, 100*r.PrefetchDone/max(r.Size, 1))
			}
			if r.LastError != "" {
				h += "; last error: " + r.LastError
			}
			hints = append(hints, h)
		}
		if l := e.LastIOError; l != nil {
			where := l.Operation
			if l.Offset != nil {
				where = fmt.Sprintf("%s at disk offset %#x", l.Operation, *l.Offset)
			}
			hints = append(hints, fmt.Sprintf("%s: %d I/O error(s); the last at %s: %s: %s", e.Mountpoint, e.IOErrors,
				l.Time.Format(time.RFC3339), where, l.Cause))
		}
	}
	if err := tw.Flush(); err != nil {
		return err
	}
	for _, h := range hints {
		fmt.Fprintln(w, h)
	}
	return nil
}
