package main

import (
	"fmt"
	"strings"

	"github.com/spf13/cobra"

	"imgfuse/imgtool"
	"imgfuse/session"
)

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

IMAGE may be an http://, https:// or s3:// URL: the image is fetched
lazily, only what is read, into a cache shared by mounts (--cache-dir,
--cache-max; 'imgfuse cache ls|prune'), and mounted read-only unless
--overlay or --overlay-keep is given. --prefetch fetches it whole in the
background. A 404, a malformed URL, a refused connection or an untrusted
certificate exit 3; reads that cannot be served fail with EIO.

--pidfile FILE: the server writes its pid to FILE once the mount answers
and removes FILE when it exits.

Encrypted images are refused (exit 5). A LUKS container, though, is
exposed as its raw encrypted bytes with --format raw, for cryptsetup to
open the disk. An image in a format imgfuse recognises but cannot read
(QED, qcow version 1, Parallels, DMG, cloop, Bochs)
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

func newMountCmd(o *session.Options) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "mount [flags] IMAGE MOUNTPOINT",
		Short: "Expose a disk image as a file on MOUNTPOINT",
		Long:  mountLong,
		Example: `  imgfuse mount disk.qcow2 /mnt/img
  sudo mount -o loop /mnt/img/disk /mnt/root
  imgfuse mount --read-only disk.qcow2 /mnt/img
  imgfuse mount --snapshot before-upgrade disk.qcow2 /mnt/img
  imgfuse mount --overlay --pidfile /run/img.pid base.qcow2 /mnt/img   # writes thrown away
  imgfuse mount https://images.example/debian-13.qcow2 /mnt/img        # read-only, lazy`,
		Args: exactArgs("IMAGE", "MOUNTPOINT"),
		RunE: func(cmd *cobra.Command, args []string) error {
			o.Image, o.Mountpoint = args[0], args[1]
			if err := o.CheckFlags(); err != nil {
				return err
			}
			stderr := cmd.ErrOrStderr()
			o.Warn = func(msg string) { fmt.Fprintf(stderr, "imgfuse: %s\n", msg) }
			if err := o.Validate(); err != nil {
				return err
			}
			if o.Foreground {
				return session.RunForeground(o, stderr)
			}
			return session.Start(o)
		},
	}
	f := cmd.Flags()
	f.BoolVarP(&o.ReadOnly, "read-only", "r", false, "expose the disk read-only (open(O_RDWR) fails with EROFS)")
	f.BoolVar(&o.Foreground, "foreground", false, "serve in the foreground until unmounted or interrupted")
	f.StringVarP(&o.Format, "format", "f", "auto", "image format: "+strings.Join(imgtool.FormatChoices(), "|"))
	f.StringVar(&o.Snapshot, "snapshot", "", "expose internal snapshot `NAME|ID` (read-only) instead of the active disk")
	f.StringVar(&o.Name, "name", "", "file name of the disk in a directory MOUNTPOINT (default \"disk\")")
	f.BoolVar(&o.AllowOther, "allow-other", false, "let other users reach the mount (needs user_allow_other in /etc/fuse.conf)")
	f.BoolVar(&o.NoDirectIO, "no-direct-io", false, "open the image without O_DIRECT (for filesystems that refuse it, e.g. tmpfs)")
	f.BoolVarP(&o.ForceShare, "force-share", "U", false, "take no image locks, as qemu-img -U: mount an image another process may be writing (implies --read-only)")
	f.BoolVar(&o.Growable, "growable", false, "let a write past the end of the disk grow it instead of failing with ENOSPC")
	f.BoolVar(&o.NoPassthrough, "no-passthrough", false, "never let the kernel serve a raw image's reads itself (FUSE passthrough); every read then goes through imgfuse")
	f.BoolVar(&o.IOURing, "io-uring", false, "serve FUSE requests through io_uring (FUSE-over-io_uring, Linux 6.14+) where the kernel offers it (the fuse module's enable_uring parameter); through /dev/fuse otherwise. 'imgfuse status' shows which")
	f.BoolVar(&o.LazyRefcounts, "lazy-refcounts", false, "qcow2 v3: use lazy refcounts for this mount (fewer metadata writes; a crash then needs a refcount rebuild, done by the next writable mount)")
	f.StringVar(&o.CacheSize, "cache-size", "", "most memory for each image's metadata cache, e.g. 8M or 256M (qcow2 L2 tables; default: enough to map the disk, at most 32M)")
	f.BoolVar(&o.Debug, "debug", false, "log every FUSE request (needs --log FILE, or --foreground to log to stderr)")
	f.StringVar(&o.LogFile, "log", "", "append the daemon's messages to `FILE` instead of its default log (named by 'imgfuse status')")
	f.BoolVar(&o.Overlay, "overlay", false, "send writes to a temporary qcow2 overlay, deleted on exit; IMAGE stays unchanged (like qemu-nbd -s)")
	f.StringVar(&o.OverlayKeep, "overlay-keep", "", "like --overlay, but create the overlay at `FILE` (must not exist) and keep it")
	f.BoolVar(&o.NonEmpty, "nonempty", false, "mount on a directory or regular file MOUNTPOINT that is not empty, hiding what it holds while mounted")
	f.BoolVar(&o.Prefetch, "prefetch", false, "remote image: fetch it whole into the cache in the background ('imgfuse status' shows the progress)")
	f.StringVar(&o.PIDFile, "pidfile", "", "write the server's pid to `FILE` once the mount answers; removed on exit")
	return cmd
}
