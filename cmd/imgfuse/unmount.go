package main

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/spf13/cobra"
	"golang.org/x/sys/unix"
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

// busyWait is how long unmount retries a busy mount before it names the
// holders and fails.
const busyWait = 5 * time.Second

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
				return usagef("--timeout must be positive")
			}
			return unmount(args[0], timeout, cmd.ErrOrStderr())
		},
	}
	cmd.Flags().DurationVar(&timeout, "timeout", 60*time.Second, "how long to wait for the server to flush and exit")
	return cmd
}

// unmount implements `imgfuse unmount`; notes receives informational
// messages that are not errors.
func unmount(mountpoint string, timeout time.Duration, notes io.Writer) error {
	mp, err := resolveMountpoint(mountpoint)
	if err != nil {
		return fmt.Errorf("unmount %s: %w", mountpoint, err)
	}
	e, mounted, err := findMount(mp)
	if err != nil {
		return fmt.Errorf("unmount %s: %w", mountpoint, err)
	}
	dir := stateDir()
	st, stErr := readState(dir, mp)
	staleCleared := false
	if stErr == nil && !daemonRunning(st.PID) {
		// Left by a server that was killed: it cannot clean up, so
		// its state file and temporary overlay go here.
		if ov := removeStaleState(dir, mp, st); ov != "" {
			fmt.Fprintf(notes, "imgfuse: note: removed the temporary overlay %s of the dead server (pid %d)\n", ov, st.PID)
		}
		// The log outlives the server (and its state file): it is
		// where the reason for its death may be.
		if st.Log != "" {
			if _, err := os.Stat(st.Log); err == nil {
				fmt.Fprintf(notes, "imgfuse: note: the dead server's log, which may say why it died: %s\n", st.Log)
			}
		}
		stErr, staleCleared = os.ErrNotExist, true
	}
	if !mounted {
		if staleCleared {
			fmt.Fprintf(notes, "imgfuse: note: %s is not mounted; removed the state its dead server (pid %d) left\n", mountpoint, st.PID)
			return nil
		}
		return notMounted(mountpoint, mp)
	}
	if !isImgfuseMount(e) {
		return fmt.Errorf("%s is %s %s mount (%s), not imgfuse's; use umount(8)", mountpoint, article(e.FSType), e.FSType, e.Source)
	}

	if uid, ok := mountOwner(e); ok && os.Geteuid() != 0 && uid != os.Geteuid() {
		// fusermount3 would say the entry is not in /etc/mtab.
		return fmt.Errorf("unmount %s: it was mounted by another user (uid %d); only that user or root can unmount it", mountpoint, uid)
	}
	if isDeadMount(mp) {
		if err := lazyUnmount(mp); err != nil {
			return fmt.Errorf("detach dead mount %s: %w", mountpoint, err)
		}
		fmt.Fprintf(notes, "imgfuse: note: %s was a dead mount (its server had exited without unmounting); "+
			"detached it. Check the image with 'qemu-img check' if it was written to.\n", mountpoint)
		return nil
	}

	// A file of the mount can stay open a while after its user is done
	// with it: a process that forked meanwhile holds a copy until it
	// execs, a loop device lets go of an autoclear'd file a moment after
	// the umount, and fuse2fs goes on writing its filesystem back after
	// 'fusermount3 -u' has returned. So a busy mount gets retries for
	// busyWait before we call it in use.
	err = unmountFS(mp)
	for deadline := time.Now().Add(busyWait); errors.Is(err, syscall.EBUSY) && time.Now().Before(deadline); {
		time.Sleep(100 * time.Millisecond)
		err = unmountFS(mp)
	}
	if err != nil {
		if errors.Is(err, syscall.EBUSY) {
			return fmt.Errorf("unmount %s: target is busy: %s", mountpoint, busyReason(e, mountpoint))
		}
		return fmt.Errorf("unmount %s: %w", mountpoint, err)
	}
	if stErr != nil {
		fmt.Fprintf(notes, "imgfuse: note: no server state found for %s; not waiting for it to exit\n", mountpoint)
		return nil
	}
	if err := waitExit(st.PID, timeout, mountpoint); err != nil {
		return err
	}
	return serverCloseError(dir, mp, st.PID, mountpoint)
}

// resolveMountpoint is canonicalPath without touching a file of an imgfuse
// mount: when the parent directory of p is one (p is its disk, or a
// partition), p is not resolved further.
func resolveMountpoint(p string) (string, error) {
	abs, err := filepath.Abs(p)
	if err != nil {
		return "", err
	}
	if dir, err := filepath.EvalSymlinks(filepath.Dir(abs)); err == nil {
		if e, ok, _ := findMount(dir); ok && isImgfuseMount(e) {
			return filepath.Join(dir, filepath.Base(abs)), nil
		}
	}
	return canonicalPath(abs)
}

// notMounted explains why mountpoint (resolved: mp) cannot be unmounted:
// it is the disk of an imgfuse mount, or nothing is mounted there; the
// imgfuse mounts that exist are listed.
func notMounted(mountpoint, mp string) error {
	if e, ok, _ := findMount(filepath.Dir(mp)); ok && isImgfuseMount(e) {
		parent := filepath.Dir(mountpoint)
		if parent == "." {
			parent = e.Mountpoint
		}
		what := "the disk"
		if n, ok := strings.CutPrefix(filepath.Base(mp), "part"); ok && n != "" && strings.Trim(n, "0123456789") == "" {
			what = "a partition of the disk" // fusefs names them partN
		}
		return fmt.Errorf("%s is %s of the imgfuse mount at %s; run: imgfuse unmount %s", mountpoint, what, parent, shellQuote(parent))
	}
	ours, err := readMounts(func(m *mountEntry) (skip, stop bool) { return !isImgfuseMount(m), false })
	switch {
	case err != nil:
		return fmt.Errorf("%s is not mounted", mountpoint)
	case len(ours) == 0:
		return fmt.Errorf("%s is not mounted; there are no imgfuse mounts", mountpoint)
	}
	var names []string
	for _, m := range ours {
		names = append(names, m.Mountpoint)
	}
	return fmt.Errorf("%s is not mounted; the imgfuse mounts are: %s", mountpoint, strings.Join(names, ", "))
}

// busyReason names what keeps the mount e busy and how to free it, with
// paths under the mount spelled from mountpoint.
func busyReason(e *mountEntry, mountpoint string) string {
	mounts, _ := readMounts(nil)
	s := holderScan{proc: "/proc", sys: "/sys", self: os.Getpid(), mounts: mounts}
	hs := s.busyHolders(e, func(p string) string {
		return filepath.Join(mountpoint, strings.TrimPrefix(p, e.Mountpoint))
	})
	if len(hs) == 0 {
		return "the disk is still in use, but by no process or loop device visible here " +
			"(another mount namespace?); 'fuser -vm " + shellQuote(mountpoint) + "' may tell"
	}
	return describeHolders(hs)
}

// serverCloseError returns the flush or close error that the server pid
// recorded in its state file before exiting, if any, and removes the file.
func serverCloseError(dir, mp string, pid int, mountpoint string) error {
	st, err := readState(dir, mp)
	if err != nil || st.PID != pid || st.CloseError == "" {
		return nil
	}
	os.Remove(statePath(dir, mp))
	return flushFailed(fmt.Errorf("unmounted %s, but its server failed to write the image back: %s", mountpoint, st.CloseError))
}

// isDeadMount reports whether the FUSE mount at mp has lost its server.
// statfs always reaches the server; stat may be answered from the kernel's
// attribute cache and succeed on a dead mount.
func isDeadMount(mp string) bool {
	var st unix.Statfs_t
	return errors.Is(unix.Statfs(mp, &st), syscall.ENOTCONN)
}

// waitExit waits until the server pid has flushed, closed and exited.
func waitExit(pid int, timeout time.Duration, mountpoint string) error {
	deadline := time.Now().Add(timeout)
	delay := 10 * time.Millisecond
	for daemonRunning(pid) {
		if time.Now().After(deadline) {
			return fmt.Errorf("unmounted %s, but its server (pid %d) has not exited after %v; it may still be flushing",
				mountpoint, pid, timeout)
		}
		time.Sleep(delay)
		delay = min(2*delay, 200*time.Millisecond)
	}
	return nil
}

// isImgfuseMount tells our mounts from others, so `imgfuse unmount` never
// unmounts, say, a tmpfs by mistake.
func isImgfuseMount(e *mountEntry) bool {
	return e.FSType == "fuse.imgfuse" || strings.HasPrefix(e.Source, "imgfuse")
}

// unmountFS is `umount` for root and `fusermount3 -u` for others.
func unmountFS(mp string) error {
	if os.Geteuid() == 0 {
		return unix.Unmount(mp, 0)
	}
	return fusermount("-u", mp)
}

// lazyUnmount detaches mp even though it does not answer (MNT_DETACH).
func lazyUnmount(mp string) error {
	if os.Geteuid() == 0 {
		return unix.Unmount(mp, unix.MNT_DETACH)
	}
	return fusermount("-uz", mp)
}

// fusermount runs fusermount3 (or fusermount) and maps its "busy" message
// back to EBUSY.
func fusermount(flag, mp string) error {
	bin, err := exec.LookPath("fusermount3")
	if err != nil {
		if bin, err = exec.LookPath("fusermount"); err != nil {
			return errors.New("fusermount3 not found (needed to unmount as non-root)")
		}
	}
	var out bytes.Buffer
	c := exec.Command(bin, flag, mp)
	c.Stdout, c.Stderr = &out, &out
	if err := c.Run(); err != nil {
		msg := strings.TrimSpace(out.String())
		if strings.Contains(msg, "busy") {
			return fmt.Errorf("%s: %w", msg, syscall.EBUSY)
		}
		if msg == "" {
			msg = err.Error()
		}
		return errors.New(msg)
	}
	return nil
}

// article is "an" before a filesystem type said with a vowel sound
// (ext4, xfs, overlay, iso9660), else "a" (tmpfs, btrfs).
func article(fstype string) string {
	if fstype != "" && strings.ContainsRune("aeioux", rune(fstype[0])) {
		return "an"
	}
	return "a"
}
