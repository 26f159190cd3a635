package aio

import (
	"fmt"
	"io"
	"sync"
	"unsafe"

	"golang.org/x/sys/unix"

	"imgfuse/coroutine"
)

// maxIO bounds one iocb's length, below the kernel's MAX_RW_COUNT
// (INT_MAX rounded down to a page), so a huge request is split rather than
// silently shortened.
const maxIO = 1 << 30

// maxBounce bounds the bounce buffer of one unaligned piece: an unaligned
// request larger than this is done in sequential pieces, so a misaligned
// multi-megabyte buffer does not double its memory.
const maxBounce = 1 << 20

// bouncePoolSize is the size of pooled bounce buffers; larger ones are
// allocated per request. FUSE requests are 4 KiB–1 MiB and usually aligned,
// so the bounce path mostly serves sub-block metadata writes.
const bouncePoolSize = 64 << 10

var bouncePool = sync.Pool{New: func() any {
	b := AlignedBuffer(bouncePoolSize)
	return &b
}}

func (f *File) getBounce(n int) []byte {
	if n <= bouncePoolSize && f.memAlign <= 4096 {
		b := *bouncePool.Get().(*[]byte)
		return b[:n]
	}
	return alignedBuffer(n, max(f.memAlign, 4096))
}

func putBounce(b []byte) {
	if cap(b) == bouncePoolSize {
		b = b[:bouncePoolSize]
		bouncePool.Put(&b)
	}
}

func (f *File) alignDown(off int64) int64 { return off &^ int64(f.align-1) }
func (f *File) alignUp(off int64) int64 {
	return (off + int64(f.align-1)) &^ int64(f.align-1)
}

// aligned reports whether p at off can go to the kernel without a bounce.
func (f *File) aligned(p []byte, off int64) bool {
	a := int64(f.align - 1)
	return off&a == 0 && int64(len(p))&a == 0 &&
		uintptr(unsafe.Pointer(unsafe.SliceData(p)))&uintptr(f.memAlign-1) == 0
}

// PreadCo reads len(p) bytes at off into p from a coroutine: it submits the
// request, yields, and is woken by the completion reaper. Bytes past the end
// of the file read as zeros.
func (f *File) PreadCo(co *coroutine.Co, p []byte, off int64) error {
	return f.pread(co, p, off)
}

// PwriteCo writes all of p at off from a coroutine.
func (f *File) PwriteCo(co *coroutine.Co, p []byte, off int64) error {
	return f.pwrite(co, p, off)
}

// FdatasyncCo flushes the file's data (and the metadata needed to read it)
// to stable storage, from a coroutine.
func (f *File) FdatasyncCo(co *coroutine.Co) error {
	return f.fdatasync(co)
}

// Pread is PreadCo for callers outside coroutines: with the direct engine
// it runs the read as a coroutine on one of the process's loops
// (coroutine.Run), the one way to do AIO; the fallback engine preads in
// place. It blocks the calling goroutine and must not be called from a
// coroutine.
func (f *File) Pread(p []byte, off int64) error {
	if !f.direct {
		return f.pread(nil, p, off)
	}
	var err error
	coroutine.Run(func(co *coroutine.Co) { err = f.pread(co, p, off) })
	return err
}

// Pwrite is PwriteCo for callers outside coroutines, as Pread is.
func (f *File) Pwrite(p []byte, off int64) error {
	if !f.direct {
		return f.pwrite(nil, p, off)
	}
	var err error
	coroutine.Run(func(co *coroutine.Co) { err = f.pwrite(co, p, off) })
	return err
}

// Fdatasync is FdatasyncCo for callers outside coroutines, as Pread is.
func (f *File) Fdatasync() error {
	if !f.direct {
		return f.fdatasync(nil)
	}
	var err error
	coroutine.Run(func(co *coroutine.Co) { err = f.fdatasync(co) })
	return err
}

// PreadAlignedCo is the raw driver's fast path: if off, len(p) and &p[0]
// meet Align and MemAlign, it reads like PreadCo, straight into one iocb
// with no bounce and no splitting, and reports ok; otherwise it reports ok
// == false having done nothing. The fallback engine has no alignment needs
// and always serves the read.
func (f *File) PreadAlignedCo(co *coroutine.Co, p []byte, off int64) (ok bool, err error) {
	if f.direct && !f.aligned(p, off) {
		return false, nil
	}
	return true, f.pread(co, p, off)
}

// In the functions below, co may be nil only for the fallback engine (and
// truncate/fallocate): the caller is then a plain goroutine, and every wait
// blocks it instead of yielding. The direct engine always has a co: its
// I/O is submitted by the coroutine's loop.

func (f *File) pread(co *coroutine.Co, p []byte, off int64) error {
	if len(p) == 0 {
		return nil
	}
	if off < 0 {
		return fmt.Errorf("aio: pread %s at %d: %w", f.name, off, unix.EINVAL)
	}
	if err := f.begin(); err != nil {
		return err
	}
	defer f.end()
	fetched, err := f.fill(co, off, int64(len(p)))
	if err != nil {
		return fmt.Errorf("aio: pread %s [%#x, +%#x): %w", f.name, off, len(p), err)
	}
	switch {
	case fetched && f.fresh != nil:
		err = f.readFresh(p, off)
	case f.direct:
		err = f.readDirect(co, p, off)
	default:
		err = f.fallback(co, false, p, off)
	}
	if err != nil {
		return fmt.Errorf("aio: pread %s [%#x, +%#x): %w", f.name, off, len(p), err)
	}
	return nil
}

func (f *File) pwrite(co *coroutine.Co, p []byte, off int64) error {
	if f.readOnly {
		return fmt.Errorf("aio: pwrite %s: %w", f.name, ErrReadOnly)
	}
	if len(p) == 0 {
		return nil
	}
	if off < 0 {
		return fmt.Errorf("aio: pwrite %s at %d: %w", f.name, off, unix.EINVAL)
	}
	if err := f.begin(); err != nil {
		return err
	}
	defer f.end()
	var err error
	if f.direct {
		err = f.writeDirect(co, p, off)
	} else {
		err = f.fallback(co, true, p, off)
	}
	if err != nil {
		return fmt.Errorf("aio: pwrite %s [%#x, +%#x): %w", f.name, off, len(p), err)
	}
	return nil
}

// fallback runs readSync or writeSync for the fallback engine. On a
// tmpfs/ramfs file (memBacked) the call only copies memory and runs in
// place, on the coroutine's loop: a 4 KiB pread costs ~1–2 µs, a 1 MiB one
// ~100 µs at most (see the package doc), less than a worker's two
// hand-offs. A file that refused O_DIRECT on a real filesystem may wait
// for its device: that call leaves the loop (coroutine.RunInWorker). The
// closure lives in a function of its own so that what it captures escapes
// to the heap only on that path.
func (f *File) fallback(co *coroutine.Co, write bool, p []byte, off int64) error {
	switch {
	case co != nil && !f.memBacked:
		return f.syncInWorker(co, write, p, off)
	case write:
		return f.writeSync(p, off)
	default:
		return f.readSync(p, off)
	}
}

func (f *File) syncInWorker(co *coroutine.Co, write bool, p []byte, off int64) error {
	var err error
	coroutine.RunInWorker(co, func() {
		if write {
			err = f.writeSync(p, off)
		} else {
			err = f.readSync(p, off)
		}
	})
	return err
}

func (f *File) fdatasync(co *coroutine.Co) error {
	if err := f.begin(); err != nil {
		return err
	}
	defer f.end()
	if f.direct && !f.noAioSync.Load() {
		_, err := f.submit(co, iocbCmdFdsync, nil, 0)
		if err != unix.EINVAL {
			if err != nil {
				return fmt.Errorf("aio: fdatasync %s: %w", f.name, err)
			}
			return nil
		}
		// Many filesystems have no asynchronous fsync; remember it.
		f.noAioSync.Store(true)
	}
	// Milliseconds of blocking: off the loop.
	err := f.blocking(co, func() error {
		for {
			err := unix.Fdatasync(f.fd)
			if err != unix.EINTR {
				return err
			}
		}
	})
	if err != nil {
		return fmt.Errorf("aio: fdatasync %s: %w", f.name, err)
	}
	return nil
}

// submit sends one request through the AIO engine of co's loop and waits
// for it. It returns the byte count or the request's errno.
func (f *File) submit(co *coroutine.Co, op uint16, buf []byte, off int64) (int, error) {
	e, err := engineOf(co)
	if err != nil {
		return 0, err
	}
	r := requestPool.Get().(*request)
	r.cb = iocb{
		opcode: op,
		fildes: uint32(f.fd),
		buf:    uint64(uintptr(unsafe.Pointer(unsafe.SliceData(buf)))),
		nbytes: uint64(len(buf)),
		offset: off,
	}
	r.buf = buf
	e.do(co, r)
	res := r.res
	r.buf = nil
	r.co = nil
	requestPool.Put(r)
	if res < 0 {
		return 0, unix.Errno(-res)
	}
	return int(res), nil
}

// readDirect fills p from off through the AIO engine, bouncing unaligned
// pieces, and zero-fills what lies past the end of the file.
func (f *File) readDirect(co *coroutine.Co, p []byte, off int64) error {
	for len(p) > 0 {
		var n, want int
		var err error
		if f.aligned(p, off) {
			want = min(len(p), maxIO)
			n, err = f.submit(co, iocbCmdPread, p[:want], off)
		} else {
			want, n, err = f.readBounced(co, p, off)
		}
		if err != nil {
			return err
		}
		if n < want {
			// Short: end of file, or (rarely) a partial transfer.
			size, err := f.Size()
			if err != nil {
				return err
			}
			if off+int64(n) >= size {
				clear(p[n:])
				return nil
			}
			if n == 0 {
				return fmt.Errorf("read returned 0 bytes at %#x before the end of file at %#x: %w",
					off, size, io.ErrUnexpectedEOF)
			}
		}
		p = p[n:]
		off += int64(n)
	}
	return nil
}

// readBounced reads the first piece of p at off through a bounce buffer
// covering its aligned range. It returns how many bytes of p the piece
// covers (want) and how many of them the file had (n).
func (f *File) readBounced(co *coroutine.Co, p []byte, off int64) (want, n int, err error) {
	a0 := f.alignDown(off)
	end := min(off+int64(len(p)), a0+maxBounce)
	a1 := f.alignUp(end)
	b := f.getBounce(int(a1 - a0))
	defer putBounce(b)
	got, err := f.submit(co, iocbCmdPread, b, a0)
	if err != nil {
		return 0, 0, err
	}
	want = int(end - off)
	skip := int(off - a0)
	if got <= skip {
		return want, 0, nil
	}
	return want, copy(p[:want], b[skip:got]), nil
}

// writeDirect writes p at off through the AIO engine, holding the range
// lock over the aligned blocks it touches (see rangeLock).
func (f *File) writeDirect(co *coroutine.Co, p []byte, off int64) error {
	end := off + int64(len(p))
	a0, a1 := f.alignDown(off), f.alignUp(end)
	lk, size := f.rl.acquire(co, a0, a1, false)
	newSize := size
	err := f.writeLocked(co, p, off)
	if err == nil && a1 > size && !f.blockDev {
		// The O_DIRECT write left the file a1 long (whole blocks);
		// the logical size is the larger of the old size and end.
		newSize = max(size, end)
		if a1 != newSize {
			ns := newSize // captured here, not newSize: keep it off the heap
			err = f.blocking(co, func() error { return ftruncate(f.fd, ns) })
		}
	}
	if err != nil && lk.end == toEOF {
		// Whatever happened, the cached size must match the file.
		if s, serr := f.Size(); serr == nil {
			newSize = s
		}
	}
	f.rl.release(lk, newSize)
	return err
}

// writeLocked writes p at off; the caller holds the range lock over p's
// aligned blocks.
func (f *File) writeLocked(co *coroutine.Co, p []byte, off int64) error {
	if f.aligned(p, off) {
		return f.writeAligned(co, p, off)
	}
	align := int64(f.align)
	for len(p) > 0 {
		a0 := f.alignDown(off)
		end := min(off+int64(len(p)), a0+maxBounce)
		a1 := f.alignUp(end)
		b := f.getBounce(int(a1 - a0))
		// Read-modify-write of the partial edge blocks; reads past the
		// end of the file give zeros.
		var err error
		headRead := false
		if off != a0 {
			err = f.readDirect(co, b[:align], a0)
			headRead = true
		}
		if err == nil && end != a1 && !(headRead && a1-align == a0) {
			err = f.readDirect(co, b[len(b)-int(align):], a1-align)
		}
		if err == nil {
			copy(b[off-a0:], p[:end-off])
			err = f.writeAligned(co, b, a0)
		}
		putBounce(b)
		if err != nil {
			return err
		}
		p = p[end-off:]
		off = end
	}
	return nil
}

// writeAligned writes all of p at off; p and off meet the alignment.
func (f *File) writeAligned(co *coroutine.Co, p []byte, off int64) error {
	for len(p) > 0 {
		want := min(len(p), maxIO)
		n, err := f.submit(co, iocbCmdPwrite, p[:want], off)
		if err != nil {
			return err
		}
		if n == 0 || (n < want && !f.aligned(p[n:], off+int64(n))) {
			// A short direct write (ENOSPC underneath) that cannot
			// be resumed without a bounce.
			return fmt.Errorf("wrote %d of %d bytes at %#x: %w", n, want, off, io.ErrShortWrite)
		}
		p = p[n:]
		off += int64(n)
	}
	return nil
}

// readSync is the fallback engine's read: pread until p is full, zeros past
// the end of the file.
func (f *File) readSync(p []byte, off int64) error {
	for len(p) > 0 {
		n, err := unix.Pread(f.fd, p[:min(len(p), maxIO)], off)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return err
		}
		if n == 0 {
			// For a buffered descriptor pread returns 0 only at
			// the end of the file.
			clear(p)
			return nil
		}
		p = p[n:]
		off += int64(n)
	}
	return nil
}

// writeSync is the fallback engine's write.
func (f *File) writeSync(p []byte, off int64) error {
	for len(p) > 0 {
		n, err := unix.Pwrite(f.fd, p[:min(len(p), maxIO)], off)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return err
		}
		if n == 0 {
			return fmt.Errorf("pwrite wrote nothing at %#x: %w", off, io.ErrShortWrite)
		}
		p = p[n:]
		off += int64(n)
	}
	return nil
}

func ftruncate(fd int, size int64) error {
	for {
		err := unix.Ftruncate(fd, size)
		if err != unix.EINTR {
			return err
		}
	}
}
