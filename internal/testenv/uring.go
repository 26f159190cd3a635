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
// in it, and the last one to finish puts that value back.
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
	if err := unix.Flock(fd, unix.LOCK_EX); err != nil {
		f.Close()
		t.Fatal(err)
	}
	was, _ := os.ReadFile(URingLock)
	if len(bytes.TrimSpace(was)) == 0 {
		cur, err := os.ReadFile(URingParam)
		if err == nil {
			err = os.WriteFile(URingLock, cur, 0o600)
		}
		if err != nil {
			f.Close()
			t.Fatal(err)
		}
	}
	if err := os.WriteFile(URingParam, []byte("Y"), 0); err != nil {
		f.Close()
		t.Fatalf("turning on FUSE-over-io_uring: %v", err)
	}
	if err := unix.Flock(fd, unix.LOCK_SH); err != nil {
		f.Close()
		t.Fatal(err)
	}
	t.Cleanup(func() {
		defer f.Close()
		if unix.Flock(fd, unix.LOCK_EX|unix.LOCK_NB) != nil {
			return // others still need it; the last one restores
		}
		was, err := os.ReadFile(URingLock)
		if err == nil && len(bytes.TrimSpace(was)) > 0 {
			if err := os.WriteFile(URingParam, bytes.TrimSpace(was), 0); err != nil {
				t.Errorf("restoring %s: %v", URingParam, err)
			}
			_ = os.Truncate(URingLock, 0)
		}
	})
}
