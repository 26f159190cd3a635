package cache

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"math/rand/v2"
	"slices"
	"sync"
	"testing"
	"unsafe"

	"imgfuse/coroutine"
)

const tsize = 512

// fakeFile is a Backend over an in-memory file. It records every call in a
// log shared between caches, so tests can assert the order of writes and
// syncs across caches.
type fakeFile struct {
	name string
	mu   sync.Mutex
	log  *opLog
	// data holds written tables by offset; unwritten tables read as
	// pattern(off).
	data map[int64][]byte
	// fail, if set for an op ("R", "W", "S"), is returned instead of
	// doing it, once per entry in the slice.
	fail map[string][]error
	// yield makes every call suspend the coroutine and be completed by
	// another goroutine, as AIO completions are.
	yield bool
	// flaky, if set, is asked before each call whether it fails.
	flaky func() bool
}

type opLog struct {
	mu  sync.Mutex
	ops []string
}

func (l *opLog) add(s string) {
	l.mu.Lock()
	l.ops = append(l.ops, s)
	l.mu.Unlock()
}

func (l *opLog) take() []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	ops := l.ops
	l.ops = nil
	return ops
}

func newFake(name string, log *opLog) *fakeFile {
	return &fakeFile{name: name, log: log, data: map[int64][]byte{}, fail: map[string][]error{}}
}

// pattern is the initial content of the table at off: its offset, so a
// table read into the wrong slot shows.
func pattern(off int64) []byte {
	p := make([]byte, tsize)
	for i := 0; i < tsize; i += 8 {
		binary.LittleEndian.PutUint64(p[i:], uint64(off))
	}
	return p
}

func (f *fakeFile) op(co *coroutine.Co, kind string, off int64, fn func()) error {
	if f.yield {
		coroutine.RunInWorker(co, func() {})
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if kind == "S" {
		f.log.add(f.name + " S")
	} else {
		f.log.add(fmt.Sprintf("%s %s %#x", f.name, kind, off))
	}
	if f.flaky != nil && f.flaky() {
		return errIO
	}
	if errs := f.fail[kind]; len(errs) > 0 {
		f.fail[kind] = errs[1:]
		if errs[0] != nil {
			return errs[0]
		}
	}
	fn()
	return nil
}

func (f *fakeFile) ReadTable(co *coroutine.Co, off int64, p []byte) error {
	return f.op(co, "R", off, func() {
		if d, ok := f.data[off]; ok {
			copy(p, d)
		} else {
			copy(p, pattern(off))
		}
	})
}

func (f *fakeFile) WriteTable(co *coroutine.Co, off int64, p []byte) error {
	return f.op(co, "W", off, func() { f.data[off] = slices.Clone(p) })
}

func (f *fakeFile) Sync(co *coroutine.Co) error {
	return f.op(co, "S", 0, func() {})
}

func (f *fakeFile) contents(off int64) []byte {
	f.mu.Lock()
	defer f.mu.Unlock()
	if d, ok := f.data[off]; ok {
		return d
	}
	return pattern(off)
}

// run runs fn in a coroutine and fails the test if the cache's bookkeeping
// is inconsistent afterwards.
func run(t *testing.T, c *Cache, fn func(co *coroutine.Co)) {
	t.Helper()
	coroutine.Run(fn)
	if err := c.verify(); err != nil {
		t.Fatal(err)
	}
}

func mustGet(t *testing.T, co *coroutine.Co, c *Cache, off int64) *Table {
	t.Helper()
	tb, err := c.Get(co, off)
	if err != nil {
		t.Fatalf("Get(%#x): %v", off, err)
	}
	if tb.Offset() != off {
		t.Fatalf("Get(%#x) returned table at %#x", off, tb.Offset())
	}
	if tb.c == c && !tb.dirty && !bytes.Equal(tb.Bytes(), c.b.(*fakeFile).contents(off)) {
		t.Fatalf("Get(%#x): clean table differs from the file", off)
	}
	return tb
}

func checkOps(t *testing.T, log *opLog, want ...string) {
	t.Helper()
	if got := log.take(); !slices.Equal(got, want) {
		t.Fatalf("backend calls:\n got  %q\n want %q", got, want)
	}
}

func TestNewGeometry(t *testing.T) {
	for _, tc := range []struct{ tables, size int }{{0, 512}, {1, 0}, {1, 100}, {-1, 4096}} {
		func() {
			defer func() {
				if recover() == nil {
					t.Errorf("New(%d, %d) did not panic", tc.tables, tc.size)
				}
			}()
			New("x", tc.tables, tc.size, nil)
		}()
	}
}

func TestAligned(t *testing.T) {
	for _, size := range []int{512, 2048, 4096, 65536} {
		c := New("x", 5, size, nil)
		if c.TableSize() != size {
			t.Fatalf("TableSize = %d, want %d", c.TableSize(), size)
		}
		run(t, c, func(co *coroutine.Co) {
			for i := range c.tables {
				tb, err := c.GetEmpty(co, int64(i*size))
				if err != nil {
					t.Fatal(err)
				}
				c.Put(tb)
			}
		})
		for i := range c.tables {
			d := c.tables[i].Bytes()
			if len(d) != size || cap(d) != size {
				t.Fatalf("table %d: len %d cap %d, want %d", i, len(d), cap(d), size)
			}
			if a := uintptr(unsafe.Pointer(unsafe.SliceData(d))); a%uintptr(min(size, 4096)) != 0 {
				t.Fatalf("table %d of size %d at %#x: misaligned", i, size, a)
			}
		}
	}
}

// TestLazyMemory: a cache allocates table memory only as slots are used,
// a chunk at a time.
func TestLazyMemory(t *testing.T) {
	c := New("x", 512, 65536, nil) // 32 MiB if allocated up front
	if n := c.Allocated(); n != 0 {
		t.Fatalf("a new cache holds %d bytes of tables, want 0", n)
	}
	run(t, c, func(co *coroutine.Co) {
		for i := range 5 {
			tb, err := c.GetEmpty(co, int64(i)<<16)
			if err != nil {
				t.Fatal(err)
			}
			c.Put(tb)
		}
	})
	if n := c.Allocated(); n != slabBytes*2 {
		t.Fatalf("5 tables of 64 KiB used: %d bytes allocated, want two chunks (%d)", n, 2*slabBytes)
	}
}

// TestLRU checks hits, misses and the eviction order.
func TestLRU(t *testing.T) {
	log := &opLog{}
	f := newFake("c", log)
	c := New("c", 3, tsize, f)
	run(t, c, func(co *coroutine.Co) {
		for _, off := range []int64{0x1000, 0x2000, 0x3000} {
			c.Put(mustGet(t, co, c, off))
		}
		checkOps(t, log, "c R 0x1000", "c R 0x2000", "c R 0x3000")

		// A hit does no I/O and makes 0x1000 the most recently used.
		c.Put(mustGet(t, co, c, 0x1000))
		checkOps(t, log)

		// LRU order is now 0x2000, 0x3000, 0x1000.
		c.Put(mustGet(t, co, c, 0x4000)) // evicts 0x2000
		c.Put(mustGet(t, co, c, 0x3000)) // hit
		c.Put(mustGet(t, co, c, 0x1000)) // hit
		checkOps(t, log, "c R 0x4000")
		c.Put(mustGet(t, co, c, 0x2000)) // miss, evicts 0x4000
		checkOps(t, log, "c R 0x2000")
		c.Put(mustGet(t, co, c, 0x3000))
		c.Put(mustGet(t, co, c, 0x1000))
		checkOps(t, log)
		c.Put(mustGet(t, co, c, 0x4000))
		checkOps(t, log, "c R 0x4000")
	})
}

func TestPinnedNeverEvicted(t *testing.T) {
	log := &opLog{}
	f := newFake("c", log)
	c := New("c", 3, tsize, f)
	run(t, c, func(co *coroutine.Co) {
		a := mustGet(t, co, c, 0x1000)
		b := mustGet(t, co, c, 0x2000)
		// Pin b twice: one Put must not unpin it.
		b2 := mustGet(t, co, c, 0x2000)
		if b2 != b {
			t.Fatal("second Get of a pinned table returned another table")
		}
		c.Put(b2)
		for i := range int64(20) {
			c.Put(mustGet(t, co, c, 0x10000+i*tsize))
		}
		log.take()
		if got := mustGet(t, co, c, 0x1000); got != a {
			t.Fatal("pinned table was evicted")
		}
		if got := mustGet(t, co, c, 0x2000); got != b {
			t.Fatal("twice-pinned table was evicted")
		}
		checkOps(t, log)
		if !bytes.Equal(a.Bytes(), pattern(0x1000)) || !bytes.Equal(b.Bytes(), pattern(0x2000)) {
			t.Fatal("pinned table's contents changed")
		}
		for _, tb := range []*Table{a, a, b, b} {
			c.Put(tb)
		}
	})
}

func TestAllPinned(t *testing.T) {
	log := &opLog{}
	c := New("c", 2, tsize, newFake("c", log))
	run(t, c, func(co *coroutine.Co) {
		a := mustGet(t, co, c, 0x1000)
		b := mustGet(t, co, c, 0x2000)
		for _, get := range []func(*coroutine.Co, int64) (*Table, error){c.Get, c.GetEmpty} {
			if _, err := get(co, 0x3000); !errors.Is(err, ErrAllPinned) {
				t.Fatalf("Get with all tables pinned: %v, want ErrAllPinned", err)
			}
		}
		// A hit still works.
		c.Put(mustGet(t, co, c, 0x1000))
		c.Put(a)
		c.Put(mustGet(t, co, c, 0x3000))
		c.Put(b)
	})
}

func TestGetEmpty(t *testing.T) {
	log := &opLog{}
	f := newFake("c", log)
	c := New("c", 2, tsize, f)
	run(t, c, func(co *coroutine.Co) {
		a := mustGet(t, co, c, 0x1000)
		c.Put(a)
		// A cached table is zeroed too: a new table replaces it.
		for _, off := range []int64{0x1000, 0x2000} {
			tb, err := c.GetEmpty(co, off)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(tb.Bytes(), make([]byte, tsize)) {
				t.Fatalf("GetEmpty(%#x): not zeroed", off)
			}
			tb.Bytes()[0] = 7
			c.MarkDirty(tb)
			c.Put(tb)
		}
		checkOps(t, log, "c R 0x1000")
		if err := c.Flush(co); err != nil {
			t.Fatal(err)
		}
		checkOps(t, log, "c W 0x1000", "c W 0x2000", "c S")
	})
	want := make([]byte, tsize)
	want[0] = 7
	if !bytes.Equal(f.contents(0x2000), want) {
		t.Fatal("GetEmpty table written wrongly")
	}
}

func TestDirtyWriteBackOnEviction(t *testing.T) {
	log := &opLog{}
	f := newFake("c", log)
	c := New("c", 1, tsize, f)
	run(t, c, func(co *coroutine.Co) {
		a := mustGet(t, co, c, 0x1000)
		a.Bytes()[5] = 0xaa
		c.MarkDirty(a)
		c.MarkDirty(a) // idempotent
		c.Put(a)
		c.Put(mustGet(t, co, c, 0x2000))
		checkOps(t, log, "c R 0x1000", "c W 0x1000", "c R 0x2000")
		if f.contents(0x1000)[5] != 0xaa {
			t.Fatal("evicted dirty table not written back")
		}
		// Clean eviction writes nothing.
		c.Put(mustGet(t, co, c, 0x3000))
		checkOps(t, log, "c R 0x3000")
		// Nothing dirty: Write does nothing, Flush only syncs.
		if err := c.Write(co); err != nil {
			t.Fatal(err)
		}
		if err := c.Flush(co); err != nil {
			t.Fatal(err)
		}
		checkOps(t, log, "c S")
	})
}

// dirty pins the table at off, changes it and unpins it.
func dirty(t *testing.T, co *coroutine.Co, c *Cache, off int64, v byte) {
	t.Helper()
	tb := mustGet(t, co, c, off)
	tb.Bytes()[0] = v
	c.MarkDirty(tb)
	c.Put(tb)
}

// TestDependency: an L2-like cache depending on a refcount-like cache
// writes refcounts, then syncs, then writes L2 — on Write, on Flush and on
// eviction — and the dependency is dropped once satisfied.
func TestDependency(t *testing.T) {
	for _, tc := range []struct {
		name string
		// trigger makes l2 write its dirty table 0x20000.
		trigger func(co *coroutine.Co, l2 *Cache) error
		want    []string
	}{
		{"Write", func(co *coroutine.Co, l2 *Cache) error { return l2.Write(co) },
			[]string{"rc W 0x10000", "rc S", "l2 W 0x20000"}},
		{"Flush", func(co *coroutine.Co, l2 *Cache) error { return l2.Flush(co) },
			[]string{"rc W 0x10000", "rc S", "l2 W 0x20000", "l2 S"}},
		{"evict", func(co *coroutine.Co, l2 *Cache) error {
			tb, err := l2.Get(co, 0x30000)
			if err == nil {
				l2.Put(tb)
			}
			return err
		}, []string{"rc W 0x10000", "rc S", "l2 W 0x20000", "l2 R 0x30000"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			log := &opLog{}
			rc := New("rc", 2, tsize, newFake("rc", log))
			l2 := New("l2", 1, tsize, newFake("l2", log))
			run(t, l2, func(co *coroutine.Co) {
				dirty(t, co, rc, 0x10000, 1)
				dirty(t, co, l2, 0x20000, 2)
				if err := l2.SetDependency(co, rc); err != nil {
					t.Fatal(err)
				}
				log.take()
				if err := tc.trigger(co, l2); err != nil {
					t.Fatal(err)
				}
				checkOps(t, log, tc.want...)
				// Satisfied: the next L2 write needs no refcount flush.
				dirty(t, co, l2, l2.tables[0].off, 3)
				if err := l2.Write(co); err != nil {
					t.Fatal(err)
				}
				checkOps(t, log, fmt.Sprintf("l2 W %#x", l2.tables[0].off))
			})
		})
	}
}

func TestSetDependencyNoChains(t *testing.T) {
	log := &opLog{}
	a := New("a", 1, tsize, newFake("a", log))
	b := New("b", 1, tsize, newFake("b", log))
	c := New("c", 1, tsize, newFake("c", log))
	run(t, a, func(co *coroutine.Co) {
		if err := a.SetDependency(co, a); err == nil {
			t.Fatal("a cache may not depend on itself")
		}
		dirty(t, co, a, 0x1000, 1)
		dirty(t, co, b, 0x2000, 1)
		dirty(t, co, c, 0x3000, 1)
		log.take()
		if err := b.SetDependency(co, a); err != nil {
			t.Fatal(err)
		}
		checkOps(t, log)
		// c -> b while b -> a: b's dependency is flushed now, so no
		// chain (and never a cycle) forms.
		if err := c.SetDependency(co, b); err != nil {
			t.Fatal(err)
		}
		checkOps(t, log, "a W 0x1000", "a S")
		// Switching c's dependency from b to a flushes b first.
		if err := c.SetDependency(co, a); err != nil {
			t.Fatal(err)
		}
		checkOps(t, log, "b W 0x2000", "b S")
		// Now b -> c would have c -> a flushed first; a is clean.
		if err := b.SetDependency(co, c); err != nil {
			t.Fatal(err)
		}
		checkOps(t, log, "a S")
		if err := b.Flush(co); err != nil {
			t.Fatal(err)
		}
		checkOps(t, log, "b S") // b is clean: nothing of c is needed
	})
}

func TestDependOnFlush(t *testing.T) {
	log := &opLog{}
	c := New("c", 2, tsize, newFake("c", log))
	run(t, c, func(co *coroutine.Co) {
		c.DependOnFlush()
		// Nothing dirty: no sync yet, the barrier stays pending.
		if err := c.Write(co); err != nil {
			t.Fatal(err)
		}
		checkOps(t, log)
		dirty(t, co, c, 0x1000, 1)
		dirty(t, co, c, 0x2000, 1)
		log.take()
		if err := c.Write(co); err != nil {
			t.Fatal(err)
		}
		checkOps(t, log, "c S", "c W 0x1000", "c W 0x2000")
		dirty(t, co, c, 0x1000, 2)
		if err := c.Write(co); err != nil {
			t.Fatal(err)
		}
		checkOps(t, log, "c W 0x1000")
	})
}

func TestDiscard(t *testing.T) {
	log := &opLog{}
	f := newFake("c", log)
	c := New("c", 2, tsize, f)
	run(t, c, func(co *coroutine.Co) {
		c.Discard(0x5000) // not cached: no-op
		dirty(t, co, c, 0x1000, 9)
		dirty(t, co, c, 0x2000, 9)
		c.Discard(0x1000)
		if c.ndirty != 1 {
			t.Fatalf("%d dirty tables after Discard, want 1", c.ndirty)
		}
		log.take()
		if err := c.Flush(co); err != nil {
			t.Fatal(err)
		}
		checkOps(t, log, "c W 0x2000", "c S")
		// The discarded slot is reused first: 0x2000 stays cached.
		c.Put(mustGet(t, co, c, 0x3000))
		c.Put(mustGet(t, co, c, 0x2000))
		checkOps(t, log, "c R 0x3000")
		// A discarded table is read again.
		c.Put(mustGet(t, co, c, 0x1000))
		checkOps(t, log, "c R 0x1000")
	})
	if f.contents(0x1000)[0] != 0 {
		t.Fatal("discarded dirty table was written")
	}
}

func TestInvalidate(t *testing.T) {
	log := &opLog{}
	f := newFake("c", log)
	c := New("c", 3, tsize, f)
	run(t, c, func(co *coroutine.Co) {
		c.Put(mustGet(t, co, c, 0x1000))
		dirty(t, co, c, 0x2000, 1)
		if err := c.Invalidate(); err == nil {
			t.Fatal("Invalidate with a dirty table succeeded")
		}
		if err := c.Flush(co); err != nil {
			t.Fatal(err)
		}
		a := mustGet(t, co, c, 0x1000)
		if err := c.Invalidate(); err == nil {
			t.Fatal("Invalidate with a pinned table succeeded")
		}
		c.Put(a)
		log.take()
		c.Put(mustGet(t, co, c, 0x1000)) // still cached after the failures
		checkOps(t, log)
		// The file changes behind the cache's back (a reopen).
		f.data[0x1000] = bytes.Repeat([]byte{0x42}, tsize)
		if err := c.Invalidate(); err != nil {
			t.Fatal(err)
		}
		a = mustGet(t, co, c, 0x1000)
		checkOps(t, log, "c R 0x1000")
		if a.Bytes()[0] != 0x42 {
			t.Fatal("Invalidate kept the stale table")
		}
		c.Put(a)
	})
}

var errIO = errors.New("injected I/O error")

func TestBackendErrors(t *testing.T) {
	log := &opLog{}
	f := newFake("c", log)
	c := New("c", 1, tsize, f)
	run(t, c, func(co *coroutine.Co) {
		// A failed read leaves nothing cached.
		f.fail["R"] = []error{errIO}
		if _, err := c.Get(co, 0x1000); !errors.Is(err, errIO) {
			t.Fatalf("Get with a failing read: %v", err)
		}
		c.Put(mustGet(t, co, c, 0x1000))
		checkOps(t, log, "c R 0x1000", "c R 0x1000")

		// A failed write leaves the table dirty; Write retries it.
		dirty(t, co, c, 0x1000, 5)
		f.fail["W"] = []error{errIO}
		if err := c.Write(co); !errors.Is(err, errIO) {
			t.Fatalf("Write with a failing backend: %v", err)
		}
		if !c.tables[0].dirty || c.ndirty != 1 {
			t.Fatal("table not dirty after a failed write")
		}
		// A failed write-back on eviction fails the Get and keeps the
		// victim cached and dirty.
		f.fail["W"] = []error{errIO}
		if _, err := c.Get(co, 0x2000); !errors.Is(err, errIO) {
			t.Fatalf("Get evicting with a failing write: %v", err)
		}
		if c.index.lookup(0x1000) == nil || !c.tables[0].dirty {
			t.Fatal("victim lost after a failed write-back")
		}
		checkOps(t, log, "c W 0x1000", "c W 0x1000")
		// A failed Write fails Flush without a sync.
		f.fail["W"] = []error{errIO}
		if err := c.Flush(co); !errors.Is(err, errIO) {
			t.Fatalf("Flush with a failing write: %v", err)
		}
		checkOps(t, log, "c W 0x1000")
		// A failing sync fails Flush.
		f.fail["S"] = []error{errIO}
		if err := c.Flush(co); !errors.Is(err, errIO) {
			t.Fatalf("Flush with a failing sync: %v", err)
		}
		checkOps(t, log, "c W 0x1000", "c S")
		if f.contents(0x1000)[0] != 5 {
			t.Fatal("retried write lost the data")
		}
	})
}

func TestDependencyErrors(t *testing.T) {
	log := &opLog{}
	rf := newFake("rc", log)
	rc := New("rc", 1, tsize, rf)
	l2 := New("l2", 1, tsize, newFake("l2", log))
	run(t, l2, func(co *coroutine.Co) {
		dirty(t, co, rc, 0x10000, 1)
		dirty(t, co, l2, 0x20000, 2)
		if err := l2.SetDependency(co, rc); err != nil {
			t.Fatal(err)
		}
		l2.DependOnFlush()
		log.take()
		// The refcount write fails: no L2 write may happen.
		rf.fail["W"] = []error{errIO}
		if err := l2.Write(co); !errors.Is(err, errIO) {
			t.Fatalf("Write with a failing dependency: %v", err)
		}
		checkOps(t, log, "rc W 0x10000")
		// The sync fails: still no L2 write.
		rf.fail["S"] = []error{errIO}
		if err := l2.Write(co); !errors.Is(err, errIO) {
			t.Fatalf("Write with a failing dependency sync: %v", err)
		}
		checkOps(t, log, "rc W 0x10000", "rc S")
		if err := l2.Write(co); err != nil {
			t.Fatal(err)
		}
		// The dependency's sync also satisfied DependOnFlush.
		checkOps(t, log, "rc S", "l2 W 0x20000")

		// A failing DependOnFlush sync blocks the write and stays
		// pending.
		l2.DependOnFlush()
		dirty(t, co, l2, 0x20000, 3)
		l2.b.(*fakeFile).fail["S"] = []error{errIO}
		if err := l2.Write(co); !errors.Is(err, errIO) {
			t.Fatalf("Write with a failing barrier sync: %v", err)
		}
		if err := l2.Write(co); err != nil {
			t.Fatal(err)
		}
		checkOps(t, log, "l2 S", "l2 S", "l2 W 0x20000")
	})
}

// TestInterleaved runs coroutines on several goroutines that share two
// caches under one CoMutex, with a backend whose every call yields and is
// completed on another goroutine. Each table holds a counter; the final
// file must hold exactly the number of increments made.
func TestInterleaved(t *testing.T) {
	const (
		goroutines = 4
		iters      = 200
		tables     = 16
	)
	log := &opLog{}
	rf, lf := newFake("rc", log), newFake("l2", log)
	rf.yield, lf.yield = true, true
	rc := New("rc", 2, tsize, rf)
	l2 := New("l2", 3, tsize, lf)
	var lock coroutine.CoMutex
	var wg sync.WaitGroup
	for g := range goroutines {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r := rand.New(rand.NewPCG(uint64(g), 1))
			for range iters {
				coroutine.Run(func(co *coroutine.Co) {
					lock.Lock(co)
					defer lock.Unlock(co)
					off := int64(r.IntN(tables)) * tsize
					for _, c := range []*Cache{rc, l2} {
						tb, err := c.Get(co, off)
						if err != nil {
							t.Error(err)
							return
						}
						p := tb.Bytes()
						binary.LittleEndian.PutUint64(p[8:], binary.LittleEndian.Uint64(p[8:])+1)
						c.MarkDirty(tb)
						c.Put(tb)
					}
					if r.IntN(10) == 0 {
						if err := l2.SetDependency(co, rc); err != nil {
							t.Error(err)
						}
					}
				})
			}
		}()
	}
	wg.Wait()
	coroutine.Run(func(co *coroutine.Co) {
		for _, c := range []*Cache{l2, rc} {
			if err := c.Flush(co); err != nil {
				t.Fatal(err)
			}
			if err := c.verify(); err != nil {
				t.Fatal(err)
			}
		}
	})
	for _, f := range []*fakeFile{rf, lf} {
		var sum uint64
		for i := range int64(tables) {
			p := f.contents(i * tsize)
			sum += binary.LittleEndian.Uint64(p[8:]) - uint64(i*tsize)
			if binary.LittleEndian.Uint64(p) != uint64(i*tsize) {
				t.Fatalf("%s table %#x holds another table's data", f.name, i*tsize)
			}
		}
		if sum != goroutines*iters {
			t.Fatalf("%s: %d increments in the file, want %d", f.name, sum, goroutines*iters)
		}
	}
}

// TestRandom applies a seeded random sequence of operations to a cache and
// to a model (the file plus a map of what each table must hold), with
// backend calls failing at random, checking every table read against the
// model and the file after every successful flush.
func TestRandom(t *testing.T) {
	for _, failPct := range []int{0, 10} {
		t.Run(fmt.Sprintf("fail%d%%", failPct), func(t *testing.T) {
			testRandom(t, failPct)
		})
	}
}

func testRandom(t *testing.T, failPct int) {
	seed := rand.Uint64()
	r := rand.New(rand.NewPCG(seed, 0))
	log := &opLog{}
	f := newFake("c", log)
	f.flaky = func() bool { return r.IntN(100) < failPct }
	c := New("c", 4, tsize, f)
	model := map[int64]byte{} // off -> byte 0 as the cache should show it
	want := func(off int64) byte {
		if v, ok := model[off]; ok {
			return v
		}
		return pattern(off)[0]
	}
	pinned := map[int64]*Table{}
	fail := func(step int, format string, args ...any) {
		t.Helper()
		t.Fatalf("seed %d step %d: %s", seed, step, fmt.Sprintf(format, args...))
	}
	run(t, c, func(co *coroutine.Co) {
		for step := range 3000 {
			off := int64(r.IntN(12)) * tsize
			switch op := r.IntN(10); {
			case op < 5: // get, check, maybe modify
				tb, err := c.Get(co, off)
				if errors.Is(err, ErrAllPinned) && len(pinned) == 4 {
					continue
				}
				if errors.Is(err, errIO) {
					continue
				}
				if err != nil {
					fail(step, "%v", err)
				}
				if tb.Bytes()[0] != want(off) {
					fail(step, "table %#x holds %d, want %d", off, tb.Bytes()[0], want(off))
				}
				if r.IntN(2) == 0 {
					v := byte(r.Uint32())
					tb.Bytes()[0] = v
					model[off] = v
					c.MarkDirty(tb)
				}
				if pinned[off] == nil && r.IntN(4) == 0 {
					pinned[off] = tb
				} else {
					c.Put(tb)
				}
			case op < 7: // unpin something
				for o, tb := range pinned {
					c.Put(tb)
					delete(pinned, o)
					break
				}
			case op == 7:
				if pinned[off] == nil {
					c.Discard(off)
					// The table is no longer metadata: it reads
					// back as whatever the file holds.
					model[off] = f.contents(off)[0]
				}
			default:
				err := c.Flush(co)
				if errors.Is(err, errIO) {
					continue
				}
				if err != nil {
					fail(step, "%v", err)
				}
				if c.ndirty != 0 {
					fail(step, "%d dirty tables after Flush", c.ndirty)
				}
				// Everything is clean: the file holds every table.
				for o, v := range model {
					if f.contents(o)[0] != v {
						fail(step, "file table %#x holds %d, want %d", o, f.contents(o)[0], v)
					}
				}
			}
			if err := c.verify(); err != nil {
				fail(step, "%v", err)
			}
		}
		for _, tb := range pinned {
			c.Put(tb)
		}
	})
}

// TestIndex checks the hash index against a map through random inserts and
// removals, at full load (every table cached).
func TestIndex(t *testing.T) {
	for _, n := range []int{1, 2, 7, 64} {
		var x index
		x.init(n, 4096)
		tables := make([]Table, n)
		for i := range tables {
			tables[i].off = -1
		}
		model := map[int64]*Table{}
		r := rand.New(rand.NewPCG(uint64(n), 2))
		for range 20000 {
			off := int64(r.IntN(4*n)) * 4096
			if t0, ok := model[off]; ok {
				x.remove(off)
				t0.off = -1
				delete(model, off)
			} else if len(model) < n {
				for i := range tables {
					if tables[i].off == -1 {
						tables[i].off = off
						x.insert(&tables[i])
						model[off] = &tables[i]
						break
					}
				}
			}
			for o := int64(0); o < int64(4*n)*4096; o += 4096 {
				if got := x.lookup(o); got != model[o] {
					t.Fatalf("n=%d: lookup(%#x) = %p, want %p", n, o, got, model[o])
				}
			}
		}
	}
}

func BenchmarkGetPutHit(b *testing.B) {
	c := New("c", 1024, 4096, newFake("c", &opLog{}))
	coroutine.Run(func(co *coroutine.Co) {
		for i := range int64(1024) {
			tb, err := c.Get(co, i*4096)
			if err != nil {
				b.Fatal(err)
			}
			c.Put(tb)
		}
		b.ReportAllocs()
		b.ResetTimer()
		var off int64
		for b.Loop() {
			tb, err := c.Get(co, off)
			if err != nil {
				b.Fatal(err)
			}
			c.Put(tb)
			off = (off + 4096*7) & (1024*4096 - 1)
		}
	})
}
