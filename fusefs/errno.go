package fusefs

import (
	"errors"
	"fmt"
	"log"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

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

// IOError is one I/O error (EIO) a mount returned to a caller.
type IOError struct {
	Time time.Time
	// Op is the request: "read", "write", "flush", "fallocate",
	// "truncate" or "lseek".
	Op string
	// Offset is the disk offset the request was for (a partition's
	// requests are counted at their disk offset), -1 for a request
	// without one (flush).
	Offset int64
	// Cause is the driver's error text, at most maxCauseLen bytes.
	Cause string
}

// IOErrorStats is what Server.IOErrors reports: how many I/O errors the
// mount returned, and the last one (zero when Count is 0).
type IOErrorStats struct {
	Count uint64
	Last  IOError
}

// maxCauseLen bounds the text kept for the last error: a cause is one
// line naming a file and an offset, and a state file is rewritten with it.
const maxCauseLen = 512

// ioErrorLogEvery bounds the log to one line per this long after the
// first ioErrorLogBurst errors: a dd over a damaged range returns one EIO
// per request, and the log must stay small (the default log is bounded).
const (
	ioErrorLogEvery = time.Second
	ioErrorLogBurst = 10
)

// ioErrors counts the I/O errors a mount returns. The success path never
// touches it; an error costs an atomic add, a small lock and the error's
// text.
type ioErrors struct {
	count atomic.Uint64
	// notify gets a token (never blocking) after every error, so that
	// the server's owner can publish the count (Server.IOErrorNotify).
	notify chan struct{}
	logger *log.Logger

	// mu protects last, logged and suppressed. A leaf lock, held for a
	// copy and at most one log line.
	mu         sync.Mutex
	last       IOError
	logged     time.Time // when the last log line was written
	suppressed uint64    // errors not logged since then
}

func newIOErrors(logger *log.Logger) *ioErrors {
	return &ioErrors{notify: make(chan struct{}, 1), logger: logger}
}

// record counts err, returned for request op at disk offset off.
func (e *ioErrors) record(op string, off int64, err error) {
	n := e.count.Add(1)
	cause := err.Error()
	if len(cause) > maxCauseLen {
		cause = cause[:maxCauseLen]
	}
	now := time.Now()
	e.mu.Lock()
	e.last = IOError{Time: now, Op: op, Offset: off, Cause: cause}
	if e.logger != nil {
		if n <= ioErrorLogBurst || now.Sub(e.logged) >= ioErrorLogEvery {
			more := ""
			if e.suppressed > 0 {
				more = fmt.Sprintf(" (%d more since the last line)", e.suppressed)
			}
			where := op
			if off >= 0 {
				where = fmt.Sprintf("%s at disk offset %#x", op, off)
			}
			e.logger.Printf("I/O error %d: %s: %s%s", n, where, cause, more)
			e.logged, e.suppressed = now, 0
		} else {
			e.suppressed++
		}
	}
	e.mu.Unlock()
	select {
	case e.notify <- struct{}{}:
	default:
	}
}

// stats returns the count and the last error.
func (e *ioErrors) stats() IOErrorStats {
	e.mu.Lock()
	defer e.mu.Unlock()
	return IOErrorStats{Count: e.count.Load(), Last: e.last}
}

// fail is toErrno for a handler of request op at disk offset off (-1 for
// none): an error that reaches the caller as EIO is counted.
func (fs *diskFS) fail(op string, off int64, err error) fuse.Status {
	s := toErrno(err)
	if s == fuse.EIO {
		fs.errs.record(op, off, err)
	}
	return s
}

// failFlush is toFlushErrno for fsync and flush, counted as fail counts.
func (fs *diskFS) failFlush(err error) fuse.Status {
	s := toFlushErrno(err)
	if s == fuse.EIO {
		fs.errs.record("flush", -1, err)
	}
	return s
}
