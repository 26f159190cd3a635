package fusefs

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"syscall"
	"testing"

	"github.com/hanwen/go-fuse/v2/fuse"

	"imgfuse/drivers"
)

func TestToErrno(t *testing.T) {
	wrap := func(err error) error { return fmt.Errorf("qcow2: L2 table at 0x50000: %w", err) }
	for _, tc := range []struct {
		err  error
		want fuse.Status
	}{
		{nil, fuse.OK},
		{wrap(drivers.ErrReadOnly), fuse.EROFS},
		{wrap(drivers.ErrNoSpace), fuse.Status(syscall.ENOSPC)},
		{wrap(drivers.ErrCorrupt), fuse.EIO},
		{wrap(drivers.ErrUnsupported), fuse.Status(syscall.EOPNOTSUPP)},
		{wrap(drivers.ErrLocked), fuse.EIO},
		{wrap(syscall.ENOSPC), fuse.Status(syscall.ENOSPC)},
		{&os.PathError{Op: "pread", Path: "x", Err: syscall.EIO}, fuse.EIO},
		{wrap(syscall.ENOSYS), fuse.EIO},
		{syscall.Errno(0), fuse.EIO},
		{errors.New("anything else"), fuse.EIO},
	} {
		if got := toErrno(tc.err); got != tc.want {
			t.Errorf("toErrno(%v) = %v, want %v", tc.err, got, tc.want)
		}
	}
}

func TestToFlushErrno(t *testing.T) {
	wrap := func(err error) error { return fmt.Errorf("qcow2: flush: %w", err) }
	for _, tc := range []struct {
		err  error
		want fuse.Status
	}{
		{nil, fuse.OK},
		{wrap(syscall.EIO), fuse.EIO},
		{wrap(syscall.ENOSPC), fuse.Status(syscall.ENOSPC)},
		{wrap(syscall.EDQUOT), fuse.Status(syscall.EDQUOT)},
		{wrap(drivers.ErrReadOnly), fuse.EROFS},
		{wrap(drivers.ErrNoSpace), fuse.Status(syscall.ENOSPC)},
		{wrap(syscall.ENOSYS), fuse.EIO},
		{wrap(syscall.EOPNOTSUPP), fuse.EIO},
		{wrap(drivers.ErrUnsupported), fuse.EIO},
		{wrap(drivers.ErrCorrupt), fuse.EIO},
		{wrap(syscall.EINVAL), fuse.EIO},
		{errors.New("anything else"), fuse.EIO},
	} {
		if got := toFlushErrno(tc.err); got != tc.want {
			t.Errorf("toFlushErrno(%v) = %v, want %v", tc.err, got, tc.want)
		}
	}
}

// TestDriverErrorsReachCaller checks errors cross the mount as errno.
func TestDriverErrorsReachCaller(t *testing.T) {
	d := newMemDriver(make([]byte, diskSize))
	d.readErr = fmt.Errorf("mem: bad L2 entry: %w", drivers.ErrCorrupt)
	mp := t.TempDir()
	mountT(t, mp, d, Options{})
	f, err := os.Open(filepath.Join(mp, "disk"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.ReadAt(make([]byte, 4096), 0); !errors.Is(err, syscall.EIO) {
		t.Errorf("read of a corrupt disk = %v, want EIO", err)
	}
	for name, op := range map[string]func() error{
		"create": func() error { _, err := os.Create(filepath.Join(mp, "new")); return err },
		"mkdir":  func() error { return os.Mkdir(filepath.Join(mp, "dir"), 0o755) },
		"remove": func() error { return os.Remove(filepath.Join(mp, "disk")) },
		"rename": func() error { return os.Rename(filepath.Join(mp, "disk"), filepath.Join(mp, "x")) },
	} {
		if err := op(); !errors.Is(err, syscall.EPERM) {
			t.Errorf("%s = %v, want EPERM", name, err)
		}
	}
}
