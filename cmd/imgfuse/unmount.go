package main

import (
	"time"

	"github.com/spf13/cobra"

	"imgfuse/imgtool"
	"imgfuse/mounts"
)

const unmountLong = `Unmount an imgfuse MOUNTPOINT and wait until its server has flushed and
closed the image (up to --timeout). If the flush or close failed, say so
and exit 8: data written through the mount may be missing from the image.

A dead mount (its server was killed; every access fails with "Transport
endpoint is not connected") is detached lazily, with a note; the state
its server left is removed, with its temporary --overlay file. If the
mount is already gone but such state remains, unmount removes it and
exits 0.

The unmount fails while the disk is still in use after 5 seconds of
retries (a holder that is closing, such as fuse2fs writing back after
'fusermount3 -u', gets that long): the error names each holder
(a loop device attached to the disk and where it is mounted, a process
with the disk open, mapped or as its working directory, a mount on the
disk) and what frees it, e.g. 'umount /mnt/root' for a loop mount.

MOUNTPOINT is the directory (or file) given to 'imgfuse mount'. Given the
disk inside it, or a path where nothing is mounted, unmount says so and
names the imgfuse mounts there are; given another kind of mount, it
refuses to touch it.`

func newUnmountCmd() *cobra.Command {
	var timeout time.Duration
	cmd := &cobra.Command{
		Use:     "unmount [flags] MOUNTPOINT",
		Aliases: []string{"umount"},
		Short:   "Unmount and wait until the image is flushed and closed",
		Long:    unmountLong,
		Args:    exactArgs("MOUNTPOINT"),
		RunE: func(cmd *cobra.Command, args []string) error {
			if timeout <= 0 {
				return imgtool.Usagef("--timeout must be positive")
			}
			return mounts.Unmount(args[0], timeout, cmd.ErrOrStderr())
		},
	}
	cmd.Flags().DurationVar(&timeout, "timeout", 60*time.Second, "how long to wait for the server to flush and exit")
	return cmd
}
