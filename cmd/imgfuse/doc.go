// Command imgfuse mounts a qcow2 or raw disk image as one regular file
// through FUSE. It is only the command line: flags, daemonizing, signals,
// state files, exit codes and output formatting. Everything about image
// formats lives in the drivers (imgfuse/drivers/...), everything about FUSE
// in imgfuse/fusefs; this package never interprets image bytes.
//
// Commands: mount, unmount, status, info, check, map, create, demo,
// version, completion (see `imgfuse help`). info, check and map print qemu-img's
// JSON (--output=json) and take qemu-img's flags (-f, -U); check exits as
// qemu-img check does.
//
// Exit codes (exit.go, defined once, mapped from the driver sentinels by
// exitCode): 0 success; 1 runtime error not listed; 2 usage error; 3 the
// image cannot be opened; 4 lock conflict; 5 unsupported feature; 6
// corrupt image; 7 mount failure; 8 final flush failure. 3-8 refine 1. The
// mount daemon sends its error to the parent as "E<code> <message>" so the
// parent exits with the daemon's code. Errors are printed to stderr
// prefixed "imgfuse: ", one line, naming the image once (open.go strips
// the drivers' repeated path prefixes; open_test.go provokes every open
// error with mount, info, check and map and holds each message to that).
// Mountpoint problems (missing, not empty without --nonempty — a
// directory with files or a non-empty regular file —, already a mount, a
// file of the image's own chain) are 7, like a refused FUSE mount: the
// command line was well formed, the place to mount is not. A file of the
// chain (the image, its data file, a backing file) is found by device and
// inode from a lock-free read-only open of the chain in the parent
// (drivers.FileLister), before any daemon starts; --nonempty does not
// lift that refusal.
//
// Daemonizing (daemon.go). A Go process cannot fork, so `mount` re-execs
// /proc/self/exe with IMGFUSE_DAEMON_READY_FD=3 and the write end of a pipe
// as fd 3, in a new session (setsid) with stdio on /dev/null or the --log
// file. The child opens the image, mounts, records its state file and
// writes "ok\n" — or its error text — to the pipe. The parent exits 0 only
// on "ok"; otherwise it reaps (or kills) the child, detaches any mount the
// child left, and prints the reason. Before either, the child may write
// warning lines ("W warning: ...\n"), which the parent prints on stderr:
// the one-line warning of a read-only mount of a damaged image
// (drivers.Damaged) reaches the user's terminal from a detached daemon as
// from --foreground. The child is started from a thread
// with PR_SET_IO_FLUSHER set (when permitted) so that every thread of the
// server inherits it: a FUSE server behind a loop device must not block in
// memory reclaim that waits for its own I/O.
//
// Without root. Every command works as a normal user: the mount goes
// through fusermount3 (fusefs), `unmount` uses fusermount3 -u (and -u -z
// for a dead mount) instead of umount2, PR_SET_IO_FLUSHER and the abort of
// a dead connection are skipped (they need privileges), passthrough is
// off with the kernel's reason. When fusermount3 refuses the mount, the
// error is its own message (fusefs.FusermountError), reported as "mount
// MNT: fusermount3: ..." with exit code 7; in daemon mode the child sends
// it through the readiness pipe like any other error, and the parent puts
// back the user's spelling of MNT (userSpelling).
//
// Serving (mount.go). SIGINT/SIGTERM unmount; if the mount is busy (a loop
// device holds the disk) the server logs who holds it (holders.go) and
// keeps serving, because dropping it would fail the loop device's I/O. When the FUSE server stops
// for any reason (our unmount, an external umount/fusermount3 -u), the
// driver is flushed and then closed — closed even if the flush failed, so
// the descriptors and image locks go — the state file removed, and the
// process exits. A failed flush or close is logged, makes the exit status
// 1, and is left in the state file (close-error) for `unmount`, which waits
// for the exit, to report with exit status 1. Signal handlers are installed
// before mounting.
//
// Writability (mount.go, mountReadOnly): every format is writable unless
// --read-only, --snapshot or --force-share. A driver that will not write
// an image (qcow2 with the corrupt bit) fails a writable open; the error
// then says whether a read-only open works. --growable and
// --lazy-refcounts go to drivers.OpenOptions (and --growable to
// fusefs.Options); with a read-only mount they are usage errors. Without
// --format (or with auto) serve probes the format and sets
// drivers.OpenOptions.Probed, so a raw image refuses writes that would
// make it probe as qcow2 next time; the driver's one notice about it goes
// to the daemon log through OpenOptions.Logf.
//
// The image path is checked with aio.OpenHead before anything else: a
// FIFO, device, directory or socket fails at once with its kind instead of
// blocking the open (a FIFO) or mounting an endless disk (/dev/zero).
//
// Busy mounts (holders.go). When umount says EBUSY, `unmount` (and the
// server, logging) names each holder and its fix: loop devices whose
// /sys/block/loop*/loop/backing_file is under the mount, with the mounts
// made from them; processes whose /proc/PID/fd, cwd or root links point
// under it or whose maps show its device number; mounts on the disk. It
// reads only /proc, /sys and the mount table: a stat or open inside a busy
// FUSE mount from the process that serves it would wait for itself.
// unmount resolves MOUNTPOINT without looking inside an imgfuse mount, so
// that 'unmount MNT/disk' can point at MNT instead.
//
// The mount table is read with github.com/moby/sys/mountinfo
// (mountinfo.go): its parser handles the octal escapes and optional fields
// the hand-written one did, and the end-to-end tests use the same.
//
// Formats (formats.go): qcow2, raw, vdi, vpc, and the formats of
// drivers/foreign (every other format qemu-img probes: vmdk, vhdx, luks, ...),
// which open nothing; they are in the probe list so that such a file is
// refused by name (checkFormat, before anything is opened: one line, exit
// 5, for mount, info, check and map) rather than exposed as a raw disk,
// and --format lists only the formats with a driver.
// --debug without --log is refused for a detached server, whose stderr is
// /dev/null.
//
// State files: /run/imgfuse (root) or $XDG_RUNTIME_DIR/imgfuse, else
// /run/user/UID/imgfuse if that runtime directory exists, else
// /tmp/imgfuse-UID (never $TMPDIR: every command of a user must find the
// same directory); a directory another user owns or may write is refused
// (checkStateDir), since unmount trusts the pids and overlay names in it.
// One JSON file per mount named by the SHA-256 of the canonical
// mountpoint, holding the server's pid, image, format, access,
// passthrough state, serving mode, overlay and pid file. `unmount` uses
// it to wait until the image is closed, checking /proc/PID/cmdline so that
// a recycled pid is not waited for; `status` lists them, checked against
// mountinfo and /proc/PID.
//
// Errors a mount returns (fusefs counts every EIO) are published in its
// state file (io-errors, last-io-error), rewritten from serve's loop when
// fusefs signals them, at most every 250 ms; status shows them with the
// server's log. Without --log, the parent opens the default log,
// STATEDIR/HASH.log (daemonlog.go), as the daemon's stdout and stderr and
// names it with the hidden --default-log flag; the daemon rotates it at
// 1 MiB to HASH.log.1, re-pointing fds 1 and 2 at the new file so that a
// runtime panic lands there too. It is kept after the daemon exits and
// started afresh by the next mount at the same mountpoint.
//
// Throw-away writes (overlay.go): --overlay opens the image read-only
// (QEMU's read-only locks: consistent read held, write and resize refused
// to others, the same as the backing chain of any qcow2 image and as a
// read-only QEMU user, so other readers coexist), creates a qcow2 overlay
// over it with qcow2.Create in $TMPDIR or /var/tmp (QEMU's choice for its
// temporary overlays: disk-backed, writable by every user) and serves the
// overlay writable. The server removes it on every way out; a SIGKILLed
// server's overlay is named in its state file and removed by `unmount`
// of the dead mount. --overlay-keep FILE keeps the overlay at FILE.
//
// --pidfile: written (temporary file + rename) after the mount answers and
// before the parent is told so; removed on exit if it still holds our pid.
//
// Concurrency: the only goroutines are the FUSE server's (in fusefs) and,
// in serve, one that turns srv.Wait into a channel; no state is shared
// between them here.
package main
