package fusefs

import (
	"errors"
	"syscall"

	"github.com/hanwen/go-fuse/v2/fuse"

	"imgfuse/drivers"
)

// toErrno is the one place where errors cross the FUSE boundary.
func toErrno(err error) fuse.Status {
	var errno syscall.Errno
	switch {
	case err == nil:
		return fuse.OK
	case errors.Is(err, drivers.ErrReadOnly):
		return fuse.EROFS
	case errors.Is(err, drivers.ErrNoSpace):
		return fuse.Status(syscall.ENOSPC)
	case errors.Is(err, drivers.ErrCorrupt):
		return fuse.EIO
	case errors.Is(err, drivers.ErrUnsupported):
		return fuse.Status(syscall.EOPNOTSUPP)
	case errors.As(err, &errno):
		if errno == 0 || errno == syscall.ENOSYS {
			// ENOSYS from fsync or flush would switch them off in the
			// kernel for good; an errno of 0 would claim success.
			return fuse.EIO
		}
		return fuse.Status(errno)
	default:
		return fuse.EIO
	}
}

// toFlushErrno is toErrno for fsync and flush, whose callers must learn
// that data may be lost: anything but the errors fsync(2) documents for it
// (ENOSPC, EDQUOT, EROFS) becomes EIO. ENOSYS in particular would make the
// kernel stop sending FSYNC/FLUSH and report success from then on, and
// EOPNOTSUPP would read as "this file needs no fsync".
func toFlushErrno(err error) fuse.Status {
	switch s := toErrno(err); s {
	case fuse.OK, fuse.EIO, fuse.EROFS, fuse.Status(syscall.ENOSPC), fuse.Status(syscall.EDQUOT):
		return s
	}
	return fuse.EIO
}
