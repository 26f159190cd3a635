package testenv

import (
	"bytes"
	"os"
	"testing"

	"golang.org/x/sys/unix"
)

// URingParam is the fuse module's FUSE-over-io_uring switch. imgfuse never
// sets it; tests and bench/run turn it on while they need it.
const URingParam = "/sys/module/fuse/parameters/enable_uring"

// URingLock coordinates the processes that turn URingParam on (test
// binaries running in parallel, bench/run): each holds a shared flock on it
// while it needs the switch on; the first one records the switch's value
// in it, and the last one to finish puts that value back. A newcomer joins
// the holders without waiting for them to finish: only when nobody holds
// the lock does it take it exclusively to record and turn on the switch
// (joinURing; bench/run's uring_on does the same).
const URingLock = "/run/imgfuse-enable-uring.lock"

// EnableFUSEURing turns FUSE-over-io_uring on for the test (see
// URingLock), or skips it (Skip) where the kernel lacks it or the test
// is not root.
func EnableFUSEURing(t testing.TB) {
	t.Helper()
	if _, err := os.Stat(URingParam); err != nil {
		Skip(t, "this kernel has no FUSE-over-io_uring: %v", err)
	}
	if os.Geteuid() != 0 {
		Skip(t, "turning on %s needs root", URingParam)
	}
	f, err := os.OpenFile(URingLock, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	fd := int(f.Fd())
	if err := joinURing(fd); err != nil {
		f.Close()
		t.Fatalf("turning on FUSE-over-io_uring: %v", err)
	}
	t.Cleanup(func() {
		defer f.Close()
		if err := leaveURing(fd); err != nil {
			t.Errorf("restoring %s: %v", URingParam, err)
		}
	})
}

// joinURing leaves fd with a shared flock on URingLock and the switch on:
// the first holder records the switch's value and turns it on under an
// exclusive lock; a later one, finding the lock held, joins the holders
// if the switch is on and recorded (what the exclusive holders change is
// stable while anyone holds it shared), and tries again if the last
// holder restored the switch meanwhile.
func joinURing(fd int) error {
	for {
		if unix.Flock(fd, unix.LOCK_EX|unix.LOCK_NB) == nil {
			was, err := os.ReadFile(URingLock)
			if err == nil && len(bytes.TrimSpace(was)) == 0 {
				var cur []byte
				if cur, err = os.ReadFile(URingParam); err == nil {
					err = os.WriteFile(URingLock, cur, 0o600)
				}
			}
			if err == nil {
				err = os.WriteFile(URingParam, []byte("Y"), 0)
			}
			if err != nil {
				return err
			}
			return unix.Flock(fd, unix.LOCK_SH)
		}
		if err := unix.Flock(fd, unix.LOCK_SH); err != nil {
			return err
		}
		was, _ := os.ReadFile(URingLock)
		cur, _ := os.ReadFile(URingParam)
		if len(bytes.TrimSpace(was)) > 0 && string(bytes.TrimSpace(cur)) == "Y" {
			return nil
		}
		if err := unix.Flock(fd, unix.LOCK_UN); err != nil {
			return err
		}
	}
}

// leaveURing is joinURing's counterpart: the last holder (the one that
// gets the lock exclusively) puts the recorded value back and clears the
// record; the caller then closes fd.
func leaveURing(fd int) error {
	if unix.Flock(fd, unix.LOCK_EX|unix.LOCK_NB) != nil {
		return nil // others still need it; the last one restores
	}
	was, err := os.ReadFile(URingLock)
	if err != nil || len(bytes.TrimSpace(was)) == 0 {
		return err
	}
	if err := os.WriteFile(URingParam, bytes.TrimSpace(was), 0); err != nil {
		return err
	}
	return os.Truncate(URingLock, 0)
}
