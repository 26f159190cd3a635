package fusefs

import (
	"github.com/hanwen/go-fuse/v2/fuse"

	"fmt"
	"sync"
	"syscall"

	"imgfuse/coroutine"
	"imgfuse/drivers"
)

// memDriver is an in-memory drivers.Driver that records what reaches it.
type memDriver struct {
	mu sync.Mutex
	// data is the disk, protected by mu.
	data []byte
	// extents, if set, is what BlockStatus answers from (sorted, covering
	// the disk); otherwise everything is data.
	extents []drivers.Extent
	// Call records, protected by mu.
	writes      []span
	discards    []span
	zeroes      []span
	flushes     int
	truncates   []int64
	blockStatus int
	// readErr, if set, fails every ReadAt; protected by mu.
	readErr error
	// flushErr, if set, fails every Flush; protected by mu.
	flushErr error
	// growable makes a write past the end grow the disk, as a driver
	// opened with OpenOptions.Growable does. Set before mounting.
	growable bool
}

type span struct{ off, n int64 }

func newMemDriver(data []byte) *memDriver { return &memDriver{data: data} }

func (m *memDriver) Size() int64 {
	m.mu.Lock()
	defer m.mu.Unlock()
	return int64(len(m.data))
}

func (m *memDriver) check(off, n int64) error {
	if off < 0 || n < 0 || off+n > int64(len(m.data)) {
		return fmt.Errorf("mem: [%d,+%d) outside %d: %w", off, n, len(m.data), drivers.ErrNoSpace)
	}
	return nil
}

func (m *memDriver) ReadAt(co *coroutine.Co, p []byte, off int64) (int, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := m.check(off, int64(len(p))); err != nil {
		return 0, err
	}
	if m.readErr != nil {
		return 0, m.readErr
	}
	return copy(p, m.data[off:]), nil
}

func (m *memDriver) WriteAt(co *coroutine.Co, p []byte, off int64) (int, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	// Growth stops at 1 GiB: the disk is in memory.
	if end := off + int64(len(p)); m.growable && off >= 0 && end > int64(len(m.data)) && end <= 1<<30 {
		m.data = append(m.data, make([]byte, end-int64(len(m.data)))...)
	}
	if err := m.check(off, int64(len(p))); err != nil {
		return 0, err
	}
	m.writes = append(m.writes, span{off, int64(len(p))})
	return copy(m.data[off:], p), nil
}

func (m *memDriver) Flush(co *coroutine.Co) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.flushes++
	return m.flushErr
}

func (m *memDriver) zero(off, n int64) error {
	if err := m.check(off, n); err != nil {
		return err
	}
	clear(m.data[off : off+n])
	return nil
}

func (m *memDriver) Discard(co *coroutine.Co, off, n int64) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.discards = append(m.discards, span{off, n})
	return m.zero(off, n)
}

func (m *memDriver) WriteZeroes(co *coroutine.Co, off, n int64, unmap bool) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.zeroes = append(m.zeroes, span{off, n})
	return m.zero(off, n)
}

func (m *memDriver) BlockStatus(co *coroutine.Co, off int64) (drivers.Extent, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.blockStatus++
	size := int64(len(m.data))
	if off < 0 || off >= size {
		return drivers.Extent{}, syscall.EINVAL
	}
	if m.extents == nil {
		return drivers.Extent{Off: off, Len: size - off, Flags: drivers.ExtentData}, nil
	}
	for _, e := range m.extents {
		if off >= e.Off && off < e.Off+e.Len {
			return drivers.Extent{Off: off, Len: e.Off + e.Len - off, Flags: e.Flags}, nil
		}
	}
	return drivers.Extent{}, fmt.Errorf("mem: no extent at %d: %w", off, drivers.ErrCorrupt)
}

func (m *memDriver) Truncate(co *coroutine.Co, size int64) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	m.truncates = append(m.truncates, size)
	if size <= int64(len(m.data)) {
		m.data = m.data[:size]
	} else {
		m.data = append(m.data, make([]byte, size-int64(len(m.data)))...)
	}
	return nil
}

func (m *memDriver) Close() error { return nil }

func (m *memDriver) snapshot() []byte {
	m.mu.Lock()
	defer m.mu.Unlock()
	return append([]byte(nil), m.data...)
}

// testReq calls handlers of a diskFS as a request would: in a coroutine
// on one of the process's loops.
type testReq struct{ fs *diskFS }

func onLoop(fs *diskFS) testReq { return testReq{fs} }

func (t testReq) Open(c <-chan struct{}, in *fuse.OpenIn, out *fuse.OpenOut) (st fuse.Status) {
	coroutine.Run(func(co *coroutine.Co) { st = (&reqFS{t.fs, co}).Open(c, in, out) })
	return st
}

func (t testReq) Fallocate(c <-chan struct{}, in *fuse.FallocateIn) (st fuse.Status) {
	coroutine.Run(func(co *coroutine.Co) { st = (&reqFS{t.fs, co}).Fallocate(c, in) })
	return st
}

func (t testReq) Write(c <-chan struct{}, in *fuse.WriteIn, data []byte) (n uint32, st fuse.Status) {
	coroutine.Run(func(co *coroutine.Co) { n, st = (&reqFS{t.fs, co}).Write(c, in, data) })
	return n, st
}

// directMemDriver adds the fast read path, taken for requests
// aligned to 4096 bytes, and counts its use.
type directMemDriver struct {
	*memDriver
	directMu sync.Mutex
	direct   int // protected by directMu
}

var _ drivers.DirectReader = (*directMemDriver)(nil)

func (m *directMemDriver) ReadDirect(_ *coroutine.Co, p []byte, off int64) (int, bool, error) {
	if off%4096 != 0 || len(p)%4096 != 0 {
		return 0, false, nil
	}
	m.directMu.Lock()
	m.direct++
	m.directMu.Unlock()
	m.mu.Lock()
	defer m.mu.Unlock()
	if err := m.check(off, int64(len(p))); err != nil {
		return 0, true, err
	}
	return copy(p, m.data[off:]), true, nil
}

func (m *directMemDriver) directReads() int {
	m.directMu.Lock()
	defer m.directMu.Unlock()
	return m.direct
}
