package main

import (
	"time"

	"github.com/spf13/cobra"

	"imgfuse/imgtool"
	"imgfuse/mounts"
)

const unmountLong = `Unmount an imgfuse MOUNTPOINT and wait until its server has flushed and
closed the image. If the flush or close failed, say so and exit 8: data
written through the mount may be missing from the image. --timeout bounds
the whole wait, the retries of a busy mount included.

A plain 'umount MOUNTPOINT' (or 'fusermount3 -u') returns before the
server has closed the image, so a qemu-img run right after it may find the
image still locked; 'imgfuse unmount' returns once the lock is released.

--lazy detaches the mount at once, as 'umount -l': MOUNTPOINT is free
again, processes that have the disk open keep using it, and the server
flushes and closes the image (releasing its locks) when the last of them
closes it. unmount --lazy waits for that briefly (2 seconds), reporting a
failed flush as above; after that it says the disk is still in use and
exits 0.

A dead mount (its server was killed; every access fails with "Transport
endpoint is not connected") is detached lazily, with a note; the state
its server left is removed, with its temporary --overlay file. If the
mount is already gone but such state remains, unmount removes it and
exits 0.

Without --lazy the unmount fails while the disk is still in use after 5
seconds of retries, or --timeout if shorter (a holder that is closing,
such as fuse2fs writing back after 'fusermount3 -u', gets that long):
the error names each holder
(a loop device attached to the disk and where it is mounted, a process
with the disk open, mapped or as its working directory, a mount on the
disk) and what frees it, e.g. 'umount /mnt/root' for a loop mount.

MOUNTPOINT is the directory (or file) given to 'imgfuse mount'. Given the
disk inside it, or a path where nothing is mounted, unmount says so and
names your imgfuse mounts; given another kind of mount, it refuses to
touch it; given another user's imgfuse mount (as a user other than
root), it says whose it is.`

func newUnmountCmd() *cobra.Command {
	var o mounts.UnmountOptions
	cmd := &cobra.Command{
		Use:     "unmount [flags] MOUNTPOINT",
		Aliases: []string{"umount"},
		Short:   "Unmount and wait until the image is flushed and closed",
		Long:    unmountLong,
		Args:    exactArgs("MOUNTPOINT"),
		RunE: func(cmd *cobra.Command, args []string) error {
			if o.Timeout <= 0 {
				return imgtool.Usagef("--timeout must be positive")
			}
			return mounts.Unmount(args[0], o, cmd.ErrOrStderr())
		},
	}
	cmd.Flags().DurationVar(&o.Timeout, "timeout", 60*time.Second, "how long to wait in all: for a busy mount to be free, then for the server to flush and exit")
	cmd.Flags().BoolVarP(&o.Lazy, "lazy", "l", false, "detach at once, as umount -l; the server closes the image when the last process using the disk closes it")
	return cmd
}
