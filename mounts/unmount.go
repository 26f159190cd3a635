package mounts

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

	"golang.org/x/sys/unix"

	"imgfuse/imgtool"
)

// BusyWait is how long unmount retries a busy mount before it names the
// holders and fails.
const BusyWait = 5 * time.Second

// UnmountOptions are the flags of `imgfuse unmount`.
type UnmountOptions struct {
	// Timeout bounds the whole wait: the retries of a busy mount (at
	// most BusyWait of it) and the wait for the server to exit.
	Timeout time.Duration
	// Lazy detaches the mount at once, as umount -l: it disappears from
	// the mount table, and the server flushes and closes the image (and
	// releases its locks) once the last process using the disk closes
	// it. Unmount waits for that up to LazyWait (and Timeout), not
	// longer: a holder may keep it for ever.
	Lazy bool
}

// LazyWait is how long `unmount --lazy` waits for a server that nothing
// holds any more to exit, so that its close error is still reported.
const LazyWait = 2 * time.Second

// Unmount implements `imgfuse unmount`; notes receives informational
// messages that are not errors.
func Unmount(mountpoint string, o UnmountOptions, notes io.Writer) error {
	deadline := time.Now().Add(o.Timeout)
	fail := func(code int, err error) error {
		return &imgtool.Error{Op: "unmount", Path: mountpoint, Code: code, Err: err}
	}
	mp, err := resolveMountpoint(mountpoint)
	if err != nil {
		return fail(0, err)
	}
	e, mounted, err := Find(mp)
	if err != nil {
		return fail(0, err)
	}
	dir := StateDir()
	st, stErr := ReadState(dir, mp)
	staleCleared := false
	if stErr == nil && !ServerRunning(st.PID) {
		// Left by a server that was killed: it cannot clean up, so
		// its state file and temporary overlay go here.
		if ov := RemoveStale(dir, mp, st); ov != "" {
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
	if !IsImgfuse(e) {
		return &imgtool.Error{Op: "unmount", Path: mountpoint, Named: true,
			Err: fmt.Errorf("%s is %s %s mount (%s), not imgfuse's; use umount(8)", mountpoint, article(e.FSType), e.FSType, e.Source)}
	}

	if uid, ok := Owner(e); ok && os.Geteuid() != 0 && uid != os.Geteuid() {
		// fusermount3 would say the entry is not in /etc/mtab.
		return fail(0, fmt.Errorf("it was mounted by another user (uid %d); only that user or root can unmount it", uid))
	}
	if IsDead(mp) {
		if err := LazyUnmount(mp); err != nil {
			return &imgtool.Error{Op: "detach dead mount", Path: mountpoint, Err: err}
		}
		fmt.Fprintf(notes, "imgfuse: note: %s was a dead mount (its server had exited without unmounting); "+
			"detached it. Check the image with 'qemu-img check' if it was written to.\n", mountpoint)
		return nil
	}

	if o.Lazy {
		return lazyUnmount(mountpoint, mp, dir, st, stErr, deadline, notes)
	}

	// A file of the mount can stay open a while after its user is done
	// with it: a process that forked meanwhile holds a copy until it
	// execs, a loop device lets go of an autoclear'd file a moment after
	// the umount, and fuse2fs goes on writing its filesystem back after
	// 'fusermount3 -u' has returned. So a busy mount gets retries for
	// BusyWait (within the timeout) before we call it in use.
	err = unmountFS(mp)
	for busyEnd := minTime(time.Now().Add(BusyWait), deadline); errors.Is(err, syscall.EBUSY) && time.Now().Before(busyEnd); {
		time.Sleep(min(100*time.Millisecond, max(time.Until(busyEnd), time.Millisecond)))
		err = unmountFS(mp)
	}
	if errors.Is(err, syscall.EBUSY) {
		return fail(0, fmt.Errorf("target is busy: %s", BusyReason(e, mountpoint)))
	}
	if err != nil {
		return fail(0, err)
	}
	if stErr != nil {
		fmt.Fprintf(notes, "imgfuse: note: no server state found for %s; not waiting for it to exit\n", mountpoint)
		return nil
	}
	if err := waitExit(st.PID, deadline, o.Timeout, mountpoint); err != nil {
		return err
	}
	return serverCloseError(dir, mp, st.PID, mountpoint)
}

// lazyUnmount is Unmount with UnmountOptions.Lazy: detach mp, then wait
// up to LazyWait for its server (st, if stErr is nil) to close the image.
func lazyUnmount(mountpoint, mp, dir string, st State, stErr error, deadline time.Time, notes io.Writer) error {
	if err := LazyUnmount(mp); err != nil {
		return &imgtool.Error{Op: "unmount", Path: mountpoint, Err: err}
	}
	if stErr != nil {
		fmt.Fprintf(notes, "imgfuse: note: detached %s; no server state found, so not waiting for it to exit\n", mountpoint)
		return nil
	}
	end := minTime(time.Now().Add(LazyWait), deadline)
	for delay := 10 * time.Millisecond; ServerRunning(st.PID); delay = min(2*delay, 200*time.Millisecond) {
		if time.Now().After(end) {
			fmt.Fprintf(notes, "imgfuse: note: detached %s; the disk is still in use, and its server (pid %d) "+
				"flushes and closes the image when the last process using it closes it\n", mountpoint, st.PID)
			return nil
		}
		time.Sleep(delay)
	}
	return serverCloseError(dir, mp, st.PID, mountpoint)
}

func minTime(a, b time.Time) time.Time {
	if a.Before(b) {
		return a
	}
	return b
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
		if e, ok, _ := Find(dir); ok && IsImgfuse(e) {
			return filepath.Join(dir, filepath.Base(abs)), nil
		}
	}
	return CanonicalPath(abs)
}

// notMounted explains why mountpoint (resolved: mp) cannot be unmounted:
// it is the disk of an imgfuse mount, or nothing is mounted there; the
// imgfuse mounts that exist are listed.
func notMounted(mountpoint, mp string) error {
	named := func(format string, args ...any) error {
		return &imgtool.Error{Op: "unmount", Path: mountpoint, Named: true, Err: fmt.Errorf(format, args...)}
	}
	if e, ok, _ := Find(filepath.Dir(mp)); ok && IsImgfuse(e) {
		parent := filepath.Dir(mountpoint)
		if parent == "." {
			parent = e.Mountpoint
		}
		what := "the disk"
		if n, ok := strings.CutPrefix(filepath.Base(mp), "part"); ok && n != "" && strings.Trim(n, "0123456789") == "" {
			what = "a partition of the disk" // fusefs names them partN
		}
		return named("%s is %s of the imgfuse mount at %s; run: imgfuse unmount %s", mountpoint, what, parent, imgtool.ShellQuote(parent))
	}
	// A user hears of their own mounts only.
	ours, err := Read(func(m *Entry) (skip, stop bool) { return !IsImgfuse(m) || !ownedByCaller(m), false })
	whose := ""
	if os.Geteuid() != 0 {
		whose = " of yours"
	}
	switch {
	case err != nil:
		return named("%s is not mounted", mountpoint)
	case len(ours) == 0:
		return named("%s is not mounted; there are no imgfuse mounts%s", mountpoint, whose)
	}
	var names []string
	for _, m := range ours {
		names = append(names, m.Mountpoint)
	}
	return named("%s is not mounted; the imgfuse mounts%s are: %s", mountpoint, whose, strings.Join(names, ", "))
}

// ownedByCaller reports whether the calling user may speak of mount m:
// root of every mount, a user of the mounts they made.
func ownedByCaller(m *Entry) bool {
	if os.Geteuid() == 0 {
		return true
	}
	uid, ok := Owner(m)
	return ok && uid == os.Geteuid()
}

// BusyReason names what keeps the mount e busy and how to free it, with
// paths under the mount spelled from mountpoint.
func BusyReason(e *Entry, mountpoint string) string {
	mounts, _ := Read(nil)
	s := holderScan{proc: "/proc", sys: "/sys", self: os.Getpid(), mounts: mounts}
	hs := s.busyHolders(e, func(p string) string {
		return filepath.Join(mountpoint, strings.TrimPrefix(p, e.Mountpoint))
	})
	if len(hs) == 0 {
		return "the disk is still in use, but by no process or loop device visible here " +
			"(another mount namespace?); 'fuser -vm " + imgtool.ShellQuote(mountpoint) + "' may tell"
	}
	return describeHolders(hs)
}

// serverCloseError returns the flush or close error that the server pid
// recorded in its state file before exiting, if any, and removes the file.
func serverCloseError(dir, mp string, pid int, mountpoint string) error {
	st, err := ReadState(dir, mp)
	if err != nil || st.PID != pid || st.CloseError == "" {
		return nil
	}
	os.Remove(StatePath(dir, mp))
	return &imgtool.Error{Op: "unmount", Path: mountpoint, Named: true, Code: imgtool.ExitFlush,
		Err: fmt.Errorf("unmounted %s, but its server failed to write the image back: %s", mountpoint, st.CloseError)}
}

// IsDead reports whether the FUSE mount at mp has lost its server.
// statfs always reaches the server; stat may be answered from the kernel's
// attribute cache and succeed on a dead mount.
func IsDead(mp string) bool {
	var st unix.Statfs_t
	return errors.Is(unix.Statfs(mp, &st), syscall.ENOTCONN)
}

// waitExit waits until the server pid has flushed, closed and exited, up
// to deadline (the end of the unmount's timeout).
func waitExit(pid int, deadline time.Time, timeout time.Duration, mountpoint string) error {
	delay := 10 * time.Millisecond
	for ServerRunning(pid) {
		if time.Now().After(deadline) {
			return &imgtool.Error{Op: "unmount", Path: mountpoint, Named: true,
				Err: fmt.Errorf("unmounted %s, but its server (pid %d) has not exited after %v; it may still be flushing",
					mountpoint, pid, timeout)}
		}
		time.Sleep(delay)
		delay = min(2*delay, 200*time.Millisecond)
	}
	return nil
}

// IsImgfuse tells our mounts from others, so `imgfuse unmount` never
// unmounts, say, a tmpfs by mistake.
func IsImgfuse(e *Entry) bool {
	return e.FSType == "fuse.imgfuse" || strings.HasPrefix(e.Source, "imgfuse")
}

// unmountFS is `umount` for root and `fusermount3 -u` for others.
func unmountFS(mp string) error {
	if os.Geteuid() == 0 {
		return unix.Unmount(mp, 0)
	}
	return fusermount("-u", mp)
}

// LazyUnmount detaches mp even though it does not answer (MNT_DETACH).
func LazyUnmount(mp string) error {
	if os.Geteuid() == 0 {
		return unix.Unmount(mp, unix.MNT_DETACH)
	}
	return fusermount("-uz", mp)
}

// fusermount runs fusermount3 (or fusermount). It exits 1 whatever went
// wrong; a mount still there and answering after a failed -u (whose
// owner the caller checked) is one in use, so that failure is EBUSY.
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
		if msg == "" {
			msg = fmt.Sprintf("%s %s %s: %v", filepath.Base(bin), flag, mp, err)
		}
		if e, ok, _ := Find(mp); ok && flag == "-u" && IsImgfuse(e) && !IsDead(mp) {
			return fmt.Errorf("%s: %w", msg, syscall.EBUSY)
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

// DetachIfOurs lazily unmounts mountpoint if an imgfuse mount sits there:
// the child died or was killed between mounting and reporting.
func DetachIfOurs(mountpoint string) {
	if e, ok, _ := Find(mountpoint); ok && IsImgfuse(e) {
		Abort(e)
		_ = LazyUnmount(mountpoint)
	}
}
