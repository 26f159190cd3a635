package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"
)

const statusLong = `List the imgfuse mounts of this user: one per server state file (see
'imgfuse unmount'), each checked against /proc/self/mountinfo and the
server's process.

STATE is "mounted" (the server runs and the mount is there), "dead" (the
server is gone: a dead mount, or a state file left behind; 'imgfuse
unmount MOUNTPOINT' clears it and removes a temporary overlay) or
"unmounting" (the mount is gone and the server is flushing and closing
the image).

--output=json prints an array of objects with the keys mountpoint,
image, format, pid, state, read-only, passthrough (true or false),
passthrough-detail, overlay (null without one), overlay-temporary,
serving-mode, pidfile (null without one), started, hint (null unless
the mount needs attention), io-errors (how many I/O errors the mount has
returned), last-io-error (null, or {time, operation, offset, cause}: the
last of them, offset null for a flush) and log (the file the server logs
to: --log FILE or its default log in the state directory; null for a
--foreground server).

A mount that returned I/O errors gets a line under the table with the
count and the last error; the LOG column names each server's log, which
holds every error's cause (the first ten, then one line a second).`

// statusEntry is one mount in `imgfuse status --output=json`. The keys
// are a contract for scripts: add, never rename.
type statusEntry struct {
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
	LastIOError *ioErrorState `json:"last-io-error"`
	Log         *string       `json:"log"`
}

func newStatusCmd(stdout io.Writer) *cobra.Command {
	var output string
	cmd := &cobra.Command{
		Use:   "status [--output=human|json]",
		Short: "List imgfuse mounts and their servers",
		Long:  statusLong,
		Args:  exactArgs(),
		RunE: func(cmd *cobra.Command, args []string) error {
			if output != "human" && output != "json" {
				return usagef("invalid --output %q (want human or json)", output)
			}
			entries, err := listStatus(stateDir())
			if err != nil {
				return err
			}
			if output == "json" {
				b, err := json.MarshalIndent(entries, "", "  ")
				if err != nil {
					return err
				}
				_, err = fmt.Fprintf(stdout, "%s\n", b)
				return err
			}
			return printStatus(stdout, entries)
		},
	}
	cmd.Flags().StringVar(&output, "output", "human", "output format: human|json")
	return cmd
}

// listStatus reads every state file in dir, sorted by mountpoint. A
// directory that does not exist yet holds no mounts.
func listStatus(dir string) ([]statusEntry, error) {
	if err := checkStateDir(dir); errors.Is(err, os.ErrNotExist) {
		return []statusEntry{}, nil
	} else if err != nil {
		return nil, err
	}
	names, err := filepath.Glob(filepath.Join(dir, "*.json"))
	if err != nil {
		return nil, err
	}
	mounts, err := readMounts(nil)
	if err != nil {
		return nil, err
	}
	live := map[string]*mountEntry{}
	for _, m := range mounts {
		live[m.Mountpoint] = m
	}
	entries := []statusEntry{}
	for _, name := range names {
		b, err := os.ReadFile(name)
		if err != nil {
			continue // removed by a server exiting meanwhile
		}
		var st daemonState
		if json.Unmarshal(b, &st) != nil || st.Mountpoint == "" || statePath(dir, st.Mountpoint) != name {
			continue
		}
		entries = append(entries, describeState(st, live))
	}
	sort.Slice(entries, func(i, j int) bool { return entries[i].Mountpoint < entries[j].Mountpoint })
	return entries, nil
}

// describeState turns a state file into a status entry, deciding its
// state from the process and the mount table.
func describeState(st daemonState, live map[string]*mountEntry) statusEntry {
	e := statusEntry{
		Mountpoint: st.Mountpoint, Image: st.Image, Format: st.Format, PID: st.PID,
		ReadOnly: st.ReadOnly, Passthrough: st.Passthrough == "on", PassthroughDetail: st.Passthrough,
		OverlayTemporary: st.OverlayTemporary, ServingMode: st.ServingMode, Started: st.Started,
		IOErrors: st.IOErrors, LastIOError: st.LastIOError,
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
	mounted = mounted && isImgfuseMount(m)
	switch {
	case !daemonRunning(st.PID):
		e.State = "dead"
		hint := "imgfuse unmount " + shellQuote(st.Mountpoint)
		e.Hint = &hint
	case mounted:
		e.State = "mounted"
	default:
		e.State = "unmounting"
	}
	return e
}

// printStatus prints entries as a table, and the hints below it.
func printStatus(w io.Writer, entries []statusEntry) error {
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

// shellQuote quotes s for a POSIX shell when it needs it, so that printed
// commands can be pasted as they are.
func shellQuote(s string) string {
	if s != "" && strings.Trim(s, "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789/._-+=:,@%") == "" {
		return s
	}
	return "'" + strings.ReplaceAll(s, "'", `'\''`) + "'"
}
