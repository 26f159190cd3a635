package main

import (
	"encoding/json"
	"fmt"
	"io"

	"github.com/spf13/cobra"

	"imgfuse/imgtool"
	"imgfuse/mounts"
)

const statusLong = `List the imgfuse mounts of this user: one per server state file (see
'imgfuse unmount'), each checked against /proc/self/mountinfo and the
server's process. A user other than root sees their own mounts only.

With MOUNTPOINT, describe that mount alone (--output=json: one object,
not an array); if it is not one of this user's imgfuse mounts, say what
is there instead and exit 1.

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
--foreground server), and, for a remote image (or a chain with one),
remote: per object its url, size, etag, cached, fetched, requests,
cache-hits, cache-misses, last-error, prefetch ("running", "done",
"failed: ...") and prefetch-done.

A mount that returned I/O errors gets a line under the table with the
count and the last error; the LOG column names each server's log, which
holds every error's cause (the first ten, then one line a second).`

func newStatusCmd(stdout io.Writer) *cobra.Command {
	var output string
	cmd := &cobra.Command{
		Use:   "status [--output=human|json] [MOUNTPOINT]",
		Short: "List imgfuse mounts and their servers",
		Long:  statusLong,
		Args: func(cmd *cobra.Command, args []string) error {
			if len(args) > 1 {
				return imgtool.Usagef("status takes at most one argument, MOUNTPOINT (got %d)", len(args))
			}
			return nil
		},
		RunE: func(cmd *cobra.Command, args []string) error {
			if output != "human" && output != "json" {
				return imgtool.Usagef("invalid --output %q (want human or json)", output)
			}
			var entries []mounts.StatusEntry
			var shown any
			if len(args) == 1 {
				e, err := mounts.One(mounts.StateDir(), args[0])
				if err != nil {
					return err
				}
				entries, shown = []mounts.StatusEntry{e}, e
			} else {
				var err error
				if entries, err = mounts.List(mounts.StateDir()); err != nil {
					return err
				}
				shown = entries
			}
			if output == "json" {
				b, err := json.MarshalIndent(shown, "", "  ")
				if err != nil {
					return err
				}
				_, err = fmt.Fprintf(stdout, "%s\n", b)
				return err
			}
			return mounts.PrintStatus(stdout, entries)
		},
	}
	cmd.Flags().StringVar(&output, "output", "human", "output format: human|json")
	return cmd
}
