package aio

import (
	"fmt"

	"golang.org/x/sys/unix"

	"imgfuse/coroutine"
)

// TruncateCo sets the file size from a coroutine. With the direct engine it
// waits for, and excludes, every write in flight (see rangeLock).
func (f *File) TruncateCo(co *coroutine.Co, size int64) error { return f.truncate(co, size) }

// Truncate is TruncateCo for callers outside coroutines: it blocks the
// calling goroutine and must not be called from a coroutine.
func (f *File) Truncate(size int64) error { return f.truncate(nil, size) }

// FallocateCo is fallocate(2) with mode (unix.FALLOC_FL_*: PUNCH_HOLE,
// ZERO_RANGE, KEEP_SIZE, ...) on [off, off+n), from a coroutine. With the
// direct engine it excludes writes at or past alignDown(off) meanwhile.
func (f *File) FallocateCo(co *coroutine.Co, mode uint32, off, n int64) error {
	return f.fallocate(co, mode, off, n)
}

// Fallocate is FallocateCo for callers outside coroutines: it blocks the
// calling goroutine and must not be called from a coroutine.
func (f *File) Fallocate(mode uint32, off, n int64) error { return f.fallocate(nil, mode, off, n) }

// blocking runs a system call that may wait for the device (ftruncate,
// fallocate, fdatasync: milliseconds on ext4) off the coroutine's loop
// (coroutine.RunInWorker), or in place for a plain caller.
func (f *File) blocking(co *coroutine.Co, fn func() error) error {
	if co == nil {
		return fn()
	}
	var err error
	coroutine.RunInWorker(co, func() { err = fn() })
	return err
}

func (f *File) truncate(co *coroutine.Co, size int64) error {
	if f.readOnly {
		return fmt.Errorf("aio: ftruncate %s: %w", f.name, ErrReadOnly)
	}
	if err := f.begin(); err != nil {
		return err
	}
	defer f.end()
	var err error
	if f.direct && !f.blockDev {
		lk, old := f.rl.acquire(co, 0, 0, true)
		err = f.blocking(co, func() error { return ftruncate(f.fd, size) })
		newSize := size
		if err != nil {
			newSize = old
		}
		f.rl.release(lk, newSize)
	} else {
		err = f.blocking(co, func() error { return ftruncate(f.fd, size) })
	}
	if err != nil {
		return fmt.Errorf("aio: ftruncate %s to %#x: %w", f.name, size, err)
	}
	return nil
}

func (f *File) fallocate(co *coroutine.Co, mode uint32, off, n int64) error {
	if f.readOnly {
		return fmt.Errorf("aio: fallocate %s: %w", f.name, ErrReadOnly)
	}
	if err := f.begin(); err != nil {
		return err
	}
	defer f.end()
	do := func() error {
		for {
			err := unix.Fallocate(f.fd, mode, off, n)
			if err != unix.EINTR {
				return err
			}
		}
	}
	var err error
	if f.direct && !f.blockDev {
		// Without KEEP_SIZE the size may change: hold everything from
		// the first touched block on, and re-read the size after.
		lk, old := f.rl.acquire(co, f.alignDown(off), 0, true)
		err = f.blocking(co, do)
		newSize := old
		if s, serr := f.Size(); serr == nil {
			newSize = s
		}
		f.rl.release(lk, newSize)
	} else {
		err = f.blocking(co, do)
	}
	if err != nil {
		return fmt.Errorf("aio: fallocate %s mode %#x [%#x, +%#x): %w", f.name, mode, off, n, err)
	}
	return nil
}

// Seek is lseek(2) on the descriptor, for SEEK_DATA and SEEK_HOLE (the
// descriptor's own position is not used by any other method). It does not
// wait for I/O and may be called from anywhere.
func (f *File) Seek(off int64, whence int) (int64, error) {
	if err := f.begin(); err != nil {
		return 0, err
	}
	defer f.end()
	r, err := unix.Seek(f.fd, off, whence)
	if err != nil {
		return 0, fmt.Errorf("aio: lseek %s %#x whence %d: %w", f.name, off, whence, err)
	}
	return r, nil
}

// FcntlFlock is fcntl(2) with a record-lock command on the descriptor: use
// F_OFD_GETLK / F_OFD_SETLK (open file description locks, which no other
// descriptor's close drops) for QEMU's image-locking protocol. F_OFD_SETLKW
// blocks the thread.
func (f *File) FcntlFlock(cmd int, lk *unix.Flock_t) error {
	if err := f.begin(); err != nil {
		return err
	}
	defer f.end()
	if err := unix.FcntlFlock(uintptr(f.fd), cmd, lk); err != nil {
		return fmt.Errorf("aio: fcntl %s cmd %d: %w", f.name, cmd, err)
	}
	return nil
}
