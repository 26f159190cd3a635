package blocktab

import (
	"encoding/binary"
	"fmt"

	"imgfuse/aio"
	"imgfuse/cache"
	"imgfuse/coroutine"
)

// EntrySize is the width of every entry: 32 bits.
const EntrySize = 4

// ChunkSize is how much of a table one cache slot holds: 1024 entries.
const ChunkSize = 4096

// MinChunks is the fewest chunks a table's cache holds, whatever the
// budget: an operation pins one chunk at a time, and a few keep a
// sequential scan from evicting what the next request needs.
const MinChunks = 4

// Table is a table of n 32-bit entries at file offset off.
type Table struct {
	// Immutable after New.
	f     *aio.File
	off   int64
	n     int64
	order binary.ByteOrder
	// mu is the owning image's metadata lock: it protects c.
	mu *coroutine.CoMutex
	c  *cache.Cache
}

// New returns the table of n entries at off in f, in byte order order,
// cached in at most cacheBytes of chunks (at least MinChunks, at most the
// whole table). mu is the owning image's metadata lock.
func New(f *aio.File, name string, off, n int64, order binary.ByteOrder, cacheBytes int64, mu *coroutine.CoMutex) *Table {
	t := &Table{f: f, off: off, n: n, order: order, mu: mu}
	chunks := (n*EntrySize + ChunkSize - 1) / ChunkSize
	slots := min(max(cacheBytes/ChunkSize, MinChunks), max(chunks, 1))
	t.c = cache.New(name, int(slots), ChunkSize, backend{t})
	return t
}

// Len is the number of entries.
func (t *Table) Len() int64 { return t.n }

// Offset is the file offset of entry 0.
func (t *Table) Offset() int64 { return t.off }

// End is the file offset just past the last entry.
func (t *Table) End() int64 { return t.off + t.n*EntrySize }

// chunkOf returns the file offset of the chunk holding entry i and the
// entry's byte offset inside it.
func (t *Table) chunkOf(i int64) (int64, int) {
	b := i * EntrySize
	return t.off + b/ChunkSize*ChunkSize, int(b % ChunkSize)
}

// GetLocked returns entry i, 0 <= i < Len(). The caller holds the metadata
// lock.
func (t *Table) GetLocked(co *coroutine.Co, i int64) (uint32, error) {
	t.mu.AssertHeld(co)
	if i < 0 || i >= t.n {
		return 0, fmt.Errorf("entry %d of a table of %d", i, t.n)
	}
	coff, in := t.chunkOf(i)
	tb, err := t.c.Get(co, coff)
	if err != nil {
		return 0, err
	}
	v := t.order.Uint32(tb.Bytes()[in:])
	t.c.Put(tb)
	return v, nil
}

// SetLocked sets entry i to v and writes it to the file before returning;
// on error the entry keeps its old value. The caller holds the metadata
// lock.
func (t *Table) SetLocked(co *coroutine.Co, i int64, v uint32) error {
	t.mu.AssertHeld(co)
	if i < 0 || i >= t.n {
		return fmt.Errorf("entry %d of a table of %d", i, t.n)
	}
	coff, in := t.chunkOf(i)
	tb, err := t.c.Get(co, coff)
	if err != nil {
		return err
	}
	defer t.c.Put(tb)
	e := tb.Bytes()[in : in+EntrySize]
	var buf [EntrySize]byte
	t.order.PutUint32(buf[:], v)
	if err := t.f.PwriteCo(co, buf[:], t.off+i*EntrySize); err != nil {
		return err
	}
	copy(e, buf[:])
	return nil
}

// scanChunk is how much of the table ScanAll reads at once.
const scanChunk = 64 << 10

// ScanAll calls fn with every entry in order, reading the table in pieces
// of 64 KiB (so a huge table costs no more memory than that); it stops at
// fn's first error. It must not be called from a coroutine.
func (t *Table) ScanAll(fn func(i int64, v uint32) error) error {
	buf := aio.AlignedBuffer(scanChunk)
	for first := int64(0); first < t.n; first += scanChunk / EntrySize {
		cnt := min(t.n-first, scanChunk/EntrySize)
		p := buf[:cnt*EntrySize]
		if err := t.f.Pread(p, t.off+first*EntrySize); err != nil {
			return err
		}
		for k := int64(0); k < cnt; k++ {
			if err := fn(first+k, t.order.Uint32(p[k*EntrySize:])); err != nil {
				return err
			}
		}
	}
	return nil
}

// backend reads chunks for the cache. Bytes of the last chunk past the
// table's end read as zeros and are never file data to the cache.
type backend struct{ t *Table }

func (b backend) ReadTable(co *coroutine.Co, off int64, p []byte) error {
	n := min(int64(len(p)), b.t.End()-off)
	clear(p[n:])
	return b.t.f.PreadCo(co, p[:n], off)
}

// WriteTable is never called: entries are written through and chunks
// never marked dirty.
func (b backend) WriteTable(co *coroutine.Co, off int64, p []byte) error {
	return fmt.Errorf("blocktab: table chunk at %#x written back: chunks are never dirty", off)
}

func (b backend) Sync(co *coroutine.Co) error { return b.t.f.FdatasyncCo(co) }
