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
