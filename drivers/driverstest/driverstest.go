package driverstest

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"math/rand"
	"os"
	"strconv"
	"sync"
	"testing"
	"time"
	"unsafe"

	"imgfuse/coroutine"
	"imgfuse/drivers"
)

// OpenFunc opens a fresh driver for one subtest and returns it with the
// bytes of its whole virtual disk. The suite closes the driver.
type OpenFunc = func(t *testing.T) (d drivers.Driver, ref []byte)

// boundaries are the alignments whose edges random reads are steered
// across: sector, page, default cluster, largest cluster.
var boundaries = []int64{512, 4096, 64 << 10, 2 << 20}

const maxRead = 3 << 20

// Seed returns the seed for the random tests: DRIVERSTEST_SEED if set,
// otherwise the clock. It registers a cleanup that prints the seed if t
// failed, so that the failure can be replayed.
func Seed(t testing.TB) int64 {
	t.Helper()
	seed := time.Now().UnixNano()
	if s := os.Getenv("DRIVERSTEST_SEED"); s != "" {
		v, err := strconv.ParseInt(s, 10, 64)
		if err != nil {
			t.Fatalf("DRIVERSTEST_SEED=%q: %v", s, err)
		}
		seed = v
	}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("random seed: DRIVERSTEST_SEED=%d", seed)
		}
	})
	return seed
}

func open(t *testing.T, fn OpenFunc) (drivers.Driver, []byte) {
	t.Helper()
	d, ref := fn(t)
	if d == nil {
		t.Fatal("open returned a nil driver")
	}
	t.Cleanup(func() {
		if err := d.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	return d, ref
}

// ReadAt reads p at off through d in a coroutine of its own.
func ReadAt(d drivers.Driver, p []byte, off int64) (n int, err error) {
	coroutine.Run(func(co *coroutine.Co) { n, err = d.ReadAt(co, p, off) })
	return n, err
}

// WriteAt writes p at off through d in a coroutine of its own.
func WriteAt(d drivers.Driver, p []byte, off int64) (n int, err error) {
	coroutine.Run(func(co *coroutine.Co) { n, err = d.WriteAt(co, p, off) })
	return n, err
}

// checkRead reads [off, off+n) and compares it with ref; it returns a
// description of the first difference or error, or "".
func checkRead(d drivers.Driver, ref []byte, off, n int64) string {
	buf := make([]byte, n)
	got, err := ReadAt(d, buf, off)
	if err != nil {
		return fmt.Sprintf("ReadAt(len %d, off %d): n=%d err=%v", n, off, got, err)
	}
	if int64(got) != n {
		return fmt.Sprintf("ReadAt(len %d, off %d): short read n=%d without error", n, off, got)
	}
	return diff(buf, ref[off:off+n], off)
}

// diff describes where got and want first differ; off is the disk offset
// of their first byte.
func diff(got, want []byte, off int64) string {
	if bytes.Equal(got, want) {
		return ""
	}
	i := 0
	for i < len(got) && got[i] == want[i] {
		i++
	}
	j := i
	for j < len(got) && got[j] != want[j] {
		j++
	}
	end := min(i+16, len(got))
	return fmt.Sprintf("range [%d, +%d): first difference at disk offset %d (a run of %d differing bytes): got % x, want % x",
		off, len(got), off+int64(i), j-i, got[i:end], want[i:end])
}

// randomRange picks a read range: lengths log-uniform from 1 byte to
// 3 MiB, offsets anywhere, often steered across an alignment boundary or
// to end exactly at the end of the disk.
func randomRange(rng *rand.Rand, size int64) (off, n int64) {
	n = int64(1) << uint(rng.Intn(22)) // 1 B .. 2 MiB
	n += rng.Int63n(n)                 // .. up to 4 MiB
	n = min(n, maxRead, size)
	switch rng.Intn(4) {
	case 0: // anywhere
		off = rng.Int63n(size - n + 1)
	case 1: // ending exactly at the end of the disk
		off = size - n
	default: // straddling a boundary
		b := boundaries[rng.Intn(len(boundaries))]
		if b >= size {
			off = rng.Int63n(size - n + 1)
			break
		}
		edge := b * (1 + rng.Int63n(size/b))
		if edge >= size {
			edge = b
		}
		off = edge - 1 - rng.Int63n(min(n, edge))
		if off+n > size {
			off = size - n
		}
	}
	return off, n
}

// Run runs the read-side conformance suite. open is called once per
// subtest.
func Run(t *testing.T, fn OpenFunc) {
	t.Run("Size", func(t *testing.T) {
		d, ref := open(t, fn)
		if got := d.Size(); got != int64(len(ref)) {
			t.Fatalf("Size() = %d, want %d", got, len(ref))
		}
	})
	t.Run("FullRead", func(t *testing.T) {
		d, ref := open(t, fn)
		size := int64(len(ref))
		// One read of the whole disk, then the same in 1 MiB + 1 pieces
		// so that the pieces are misaligned with everything.
		if msg := checkRead(d, ref, 0, size); msg != "" {
			t.Fatal(msg)
		}
		step := int64(1<<20 + 1)
		for off := int64(0); off < size; off += step {
			if msg := checkRead(d, ref, off, min(step, size-off)); msg != "" {
				t.Fatal(msg)
			}
		}
	})
	t.Run("RandomReads", func(t *testing.T) {
		d, ref := open(t, fn)
		size := int64(len(ref))
		rng := rand.New(rand.NewSource(Seed(t)))
		for i := 0; i < 150; i++ {
			off, n := randomRange(rng, size)
			if msg := checkRead(d, ref, off, n); msg != "" {
				t.Fatalf("read %d: %s", i, msg)
			}
		}
	})
	t.Run("ConcurrentReads", func(t *testing.T) {
		d, ref := open(t, fn)
		size := int64(len(ref))
		seed := Seed(t)
		const workers, reads = 16, 12
		var wg sync.WaitGroup
		errs := make(chan string, workers)
		for w := 0; w < workers; w++ {
			wg.Add(1)
			go func(w int) {
				defer wg.Done()
				rng := rand.New(rand.NewSource(seed + int64(w)))
				for i := 0; i < reads; i++ {
					off, n := randomRange(rng, size)
					n = min(n, 512<<10)
					if msg := checkRead(d, ref, off, n); msg != "" {
						errs <- fmt.Sprintf("worker %d read %d: %s", w, i, msg)
						return
					}
				}
			}(w)
		}
		wg.Wait()
		close(errs)
		for msg := range errs {
			t.Error(msg)
		}
	})
	t.Run("BlockStatus", func(t *testing.T) {
		d, ref := open(t, fn)
		checkBlockStatus(t, d, ref)
	})
	t.Run("ReaderAt", func(t *testing.T) {
		d, ref := open(t, fn)
		checkReaderAt(t, d, ref)
	})
	t.Run("DirectReader", func(t *testing.T) {
		d, ref := open(t, fn)
		dr, ok := d.(drivers.DirectReader)
		if !ok {
			t.Skip("driver has no direct-read fast path")
		}
		served := CheckDirect(t, dr, ref, Seed(t))
		t.Logf("%d direct reads served by the fast path", served)
	})
}

// AlignedBuffer returns n bytes whose address is a multiple of align (a
// power of two), as O_DIRECT needs.
func AlignedBuffer(n, align int) []byte {
	b := make([]byte, n+align)
	shift := (align - int(uintptr(unsafe.Pointer(unsafe.SliceData(b))))&(align-1)) & (align - 1)
	return b[shift : shift+n : shift+n]
}

// CheckDirect drives the coroutine-free fast path from 8 goroutines (never
// from a coroutine): aligned and unaligned requests, aligned and unaligned
// buffers. A request the fast path takes must return exactly the reference
// bytes; one it declines must have been left untouched. It returns how many
// requests the fast path served.
func CheckDirect(t *testing.T, dr drivers.DirectReader, ref []byte, seed int64) int {
	size := int64(len(ref))
	var mu sync.Mutex
	served := 0
	var wg sync.WaitGroup
	for w := 0; w < 8; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			rng := rand.New(rand.NewSource(seed + int64(w)))
			for i := 0; i < 40; i++ {
				align := int64(512 << uint(rng.Intn(4))) // 512 .. 4096
				var off, n int64
				if rng.Intn(4) == 0 {
					off, n = randomRange(rng, size)
					n = min(n, 1<<20)
				} else {
					if size < align {
						continue
					}
					n = align * (1 + rng.Int63n(min(size/align, 256)))
					off = align * rng.Int63n(size/align-n/align+1)
				}
				var buf []byte
				if rng.Intn(4) == 0 {
					buf = AlignedBuffer(int(n)+1, 4096)[1:] // misaligned
				} else {
					buf = AlignedBuffer(int(n), 4096)
				}
				for j := range buf {
					buf[j] = 0xa5
				}
				var got int
				var ok bool
				var err error
				coroutine.Run(func(co *coroutine.Co) { got, ok, err = dr.ReadDirect(co, buf, off) })
				if !ok {
					if err != nil || got != 0 {
						t.Errorf("ReadDirect(len %d, off %d) declined but returned %d, %v", n, off, got, err)
					}
					continue
				}
				if err != nil {
					t.Errorf("ReadDirect(len %d, off %d): %v", n, off, err)
					return
				}
				if int64(got) != n {
					t.Errorf("ReadDirect(len %d, off %d) = %d bytes without an error", n, off, got)
					return
				}
				if msg := diff(buf, ref[off:off+n], off); msg != "" {
					t.Errorf("ReadDirect: %s", msg)
					return
				}
				mu.Lock()
				served++
				mu.Unlock()
			}
		}(w)
	}
	wg.Wait()
	return served
}

// Extents walks BlockStatus over the whole disk, checking that each extent
// starts where asked, is non-empty and stays inside the disk.
func Extents(t testing.TB, d drivers.Driver) []drivers.Extent {
	t.Helper()
	size := d.Size()
	var exts []drivers.Extent
	for off := int64(0); off < size; {
		if len(exts) > 1<<20 {
			t.Fatalf("BlockStatus: more than %d extents before offset %d of %d", 1<<20, off, size)
		}
		var e drivers.Extent
		var err error
		coroutine.Run(func(co *coroutine.Co) { e, err = d.BlockStatus(co, off) })
		if err != nil {
			t.Fatalf("BlockStatus(%d): %v", off, err)
		}
		if e.Off != off {
			t.Fatalf("BlockStatus(%d) returned an extent at %d", off, e.Off)
		}
		if e.Len <= 0 {
			t.Fatalf("BlockStatus(%d) returned length %d", off, e.Len)
		}
		if e.Off+e.Len > size {
			t.Fatalf("BlockStatus(%d) = [%d, +%d) runs past the disk size %d", off, e.Off, e.Len, size)
		}
		exts = append(exts, e)
		off += e.Len
	}
	return exts
}

func checkBlockStatus(t *testing.T, d drivers.Driver, ref []byte) {
	exts := Extents(t, d)
	var data int64
	for _, e := range exts {
		r := ref[e.Off : e.Off+e.Len]
		// Zero ranges read as zeros; so do ranges no layer stores data
		// for (a hole in every layer has nothing else to read).
		if e.Flags&drivers.ExtentZero != 0 || e.Flags&drivers.ExtentData == 0 {
			if i := bytes.IndexFunc(r, func(c rune) bool { return c != 0 }); i >= 0 {
				t.Errorf("extent [%d, +%d) flags %#x: byte at %d is %#x, want zero",
					e.Off, e.Len, e.Flags, e.Off+int64(i), r[i])
			}
		}
		if e.Flags&drivers.ExtentData != 0 {
			data += e.Len
		}
	}
	// A disk whose reference holds non-zero bytes must report some data.
	if data == 0 && bytes.IndexFunc(ref, func(c rune) bool { return c != 0 }) >= 0 {
		t.Errorf("BlockStatus reports no data, but the disk holds non-zero bytes")
	}
	t.Logf("%d extents, %d bytes of data", len(exts), data)
	checkAllocated(t, d)
}

// checkAllocated checks a drivers.Allocator's bounds: an estimate, but
// never negative nor more than the disk.
func checkAllocated(t *testing.T, d drivers.Driver) {
	a, ok := d.(drivers.Allocator)
	if !ok {
		return
	}
	if n := a.Allocated(); n < 0 || n > d.Size() {
		t.Errorf("Allocated() = %d, outside [0, %d]", n, d.Size())
	}
}

func checkReaderAt(t *testing.T, d drivers.Driver, ref []byte) {
	r := drivers.ReaderAt(d)
	size := int64(len(ref))
	type tc struct {
		name    string
		off     int64
		n       int
		wantN   int
		wantEOF bool // io.EOF required; otherwise nil or io.EOF allowed only when ending at size
		wantErr bool // some error required
	}
	tail := min(int64(3000), size)
	cases := []tc{
		{name: "start", off: 0, n: int(min(4096, size)), wantN: int(min(4096, size))},
		{name: "ends at size", off: size - tail, n: int(tail), wantN: int(tail)},
		{name: "crosses end", off: size - tail, n: int(tail) + 100, wantN: int(tail), wantEOF: true},
		{name: "at end", off: size, n: 10, wantN: 0, wantEOF: true},
		{name: "past end", off: size + 4096, n: 10, wantN: 0, wantEOF: true},
		{name: "empty at end", off: size, n: 0, wantN: 0},
		{name: "negative", off: -1, n: 10, wantN: 0, wantErr: true},
	}
	for _, c := range cases {
		buf := make([]byte, c.n)
		n, err := r.ReadAt(buf, c.off)
		if n != c.wantN {
			t.Errorf("%s: ReadAt(len %d, off %d) n = %d, want %d (err %v)", c.name, c.n, c.off, n, c.wantN, err)
			continue
		}
		switch {
		case c.wantEOF && !errors.Is(err, io.EOF):
			t.Errorf("%s: ReadAt(len %d, off %d) err = %v, want io.EOF", c.name, c.n, c.off, err)
		case c.wantErr && err == nil:
			t.Errorf("%s: ReadAt(len %d, off %d) err = nil, want an error", c.name, c.n, c.off)
		case !c.wantEOF && !c.wantErr && err != nil && !(err == io.EOF && c.off+int64(c.n) == size):
			t.Errorf("%s: ReadAt(len %d, off %d) err = %v", c.name, c.n, c.off, err)
		case n < c.n && err == nil:
			t.Errorf("%s: short read %d < %d without an error", c.name, n, c.n)
		}
		if n > 0 && c.off >= 0 {
			if msg := diff(buf[:n], ref[c.off:c.off+int64(n)], c.off); msg != "" {
				t.Errorf("%s: %s", c.name, msg)
			}
		}
	}
	// io.SectionReader on top must reproduce the whole disk.
	got, err := io.ReadAll(io.NewSectionReader(r, 0, size+512))
	if err != nil {
		t.Fatalf("io.ReadAll over the adapter: %v", err)
	}
	if int64(len(got)) != size {
		t.Fatalf("io.ReadAll over the adapter read %d bytes, want %d", len(got), size)
	}
	if msg := diff(got, ref, 0); msg != "" {
		t.Fatal(msg)
	}
}

// RunWritable runs the write-side suite on a driver opened writable: a
// seeded random sequence of writes, zero-writes, discards and flushes is
// mirrored into a model of the disk; the touched range is read back after
// every step and the whole disk at the end. open is called once per subtest.
func RunWritable(t *testing.T, fn OpenFunc) {
	t.Run("RandomWrites", func(t *testing.T) {
		d, ref := open(t, fn)
		model := bytes.Clone(ref)
		size := int64(len(model))
		if d.Size() != size {
			t.Fatalf("Size() = %d, want %d", d.Size(), size)
		}
		rng := rand.New(rand.NewSource(Seed(t)))
		for i := 0; i < 120; i++ {
			off, n := randomRange(rng, size)
			n = min(n, 256<<10)
			var op string
			var err error
			switch k := rng.Intn(10); {
			case k < 6:
				op = "WriteAt"
				p := make([]byte, n)
				rng.Read(p)
				var wn int
				wn, err = WriteAt(d, p, off)
				if err == nil && int64(wn) != n {
					err = fmt.Errorf("wrote %d of %d bytes without an error", wn, n)
				}
				copy(model[off:], p)
			case k < 8:
				unmap := rng.Intn(2) == 0
				op = fmt.Sprintf("WriteZeroes(unmap=%v)", unmap)
				coroutine.Run(func(co *coroutine.Co) { err = d.WriteZeroes(co, off, n, unmap) })
				clear(model[off : off+n])
			case k < 9:
				op = "Discard"
				coroutine.Run(func(co *coroutine.Co) { err = d.Discard(co, off, n) })
				clear(model[off : off+n])
			default:
				op = "Flush"
				coroutine.Run(func(co *coroutine.Co) { err = d.Flush(co) })
			}
			if err != nil {
				t.Fatalf("step %d: %s(off %d, len %d): %v", i, op, off, n, err)
			}
			// Read back the touched range with some margin on each side.
			lo, hi := max(off-4097, 0), min(off+n+4097, size)
			if msg := checkRead(d, model, lo, hi-lo); msg != "" {
				t.Fatalf("step %d after %s(off %d, len %d): %s", i, op, off, n, msg)
			}
		}
		var err error
		coroutine.Run(func(co *coroutine.Co) { err = d.Flush(co) })
		if err != nil {
			t.Fatalf("Flush: %v", err)
		}
		if msg := checkRead(d, model, 0, size); msg != "" {
			t.Fatalf("final read: %s", msg)
		}
		checkBlockStatus(t, d, model)
	})
	t.Run("ConcurrentWrites", func(t *testing.T) {
		// Disjoint writes from 16 goroutines at once, each into its own
		// stripe, then the whole disk compared.
		d, ref := open(t, fn)
		model := bytes.Clone(ref)
		size := int64(len(model))
		seed := Seed(t)
		const workers = 16
		stripe := size / workers
		if stripe == 0 {
			t.Skip("disk too small for 16 stripes")
		}
		var wg sync.WaitGroup
		errs := make(chan string, workers)
		for w := 0; w < workers; w++ {
			rng := rand.New(rand.NewSource(seed + int64(w)))
			lo := int64(w) * stripe
			var ops [][2]int64
			for i := 0; i < 8; i++ {
				n := 1 + rng.Int63n(min(stripe, 128<<10))
				ops = append(ops, [2]int64{lo + rng.Int63n(stripe-n+1), n})
			}
			bufs := make([][]byte, len(ops))
			for i, o := range ops {
				bufs[i] = make([]byte, o[1])
				rng.Read(bufs[i])
				copy(model[o[0]:], bufs[i])
			}
			wg.Add(1)
			go func() {
				defer wg.Done()
				for i, o := range ops {
					if n, err := WriteAt(d, bufs[i], o[0]); err != nil || int64(n) != o[1] {
						errs <- fmt.Sprintf("WriteAt(off %d, len %d) = %d, %v", o[0], o[1], n, err)
						return
					}
				}
			}()
		}
		wg.Wait()
		close(errs)
		for msg := range errs {
			t.Error(msg)
		}
		if msg := checkRead(d, model, 0, size); msg != "" {
			t.Fatal(msg)
		}
	})
}

// RunReadOnly checks that a driver opened read-only refuses every kind of
// write with an error wrapping drivers.ErrReadOnly and that the disk is
// unchanged afterwards.
func RunReadOnly(t *testing.T, fn OpenFunc) {
	d, ref := open(t, fn)
	size := int64(len(ref))
	n := min(size, 4096)
	ops := []struct {
		name string
		fn   func(co *coroutine.Co) error
	}{
		{"WriteAt", func(co *coroutine.Co) error { _, err := d.WriteAt(co, make([]byte, n), 0); return err }},
		{"WriteZeroes", func(co *coroutine.Co) error { return d.WriteZeroes(co, 0, n, false) }},
		{"Discard", func(co *coroutine.Co) error { return d.Discard(co, 0, n) }},
		{"Truncate", func(co *coroutine.Co) error { return d.Truncate(co, size*2) }},
	}
	for _, op := range ops {
		var err error
		coroutine.Run(func(co *coroutine.Co) { err = op.fn(co) })
		if !errors.Is(err, drivers.ErrReadOnly) {
			t.Errorf("%s on a read-only driver: err = %v, want ErrReadOnly", op.name, err)
		}
	}
	if d.Size() != size {
		t.Errorf("Size() = %d after refused writes, want %d", d.Size(), size)
	}
	if msg := checkRead(d, ref, 0, size); msg != "" {
		t.Error(msg)
	}
}

// RunConformance runs Run, RunReadOnly and RunWritable on n images, each
// read-only and writable, with O_DIRECT and, for the first buffered
// images, without: open returns the OpenFunc of image i with opts. Each
// case is named "NAME/direct=BOOL/read-only" or ".../writable".
func RunConformance(t *testing.T, names []string, buffered int, open func(i int, opts drivers.OpenOptions) OpenFunc) {
	for i, name := range names {
		for _, direct := range []bool{true, false} {
			if !direct && i >= buffered {
				continue // the buffered engine on a few images is enough
			}
			name := fmt.Sprintf("%s/direct=%v", name, direct)
			t.Run(name+"/read-only", func(t *testing.T) {
				t.Parallel()
				ro := open(i, drivers.OpenOptions{ReadOnly: true, NoDirectIO: !direct})
				Run(t, ro)
				RunReadOnly(t, ro)
			})
			t.Run(name+"/writable", func(t *testing.T) {
				t.Parallel()
				rw := open(i, drivers.OpenOptions{NoDirectIO: !direct})
				Run(t, rw)
				RunWritable(t, rw)
			})
		}
	}
}

// Poke reads a driver opened from fuzzed input at its start, middle and
// end and walks its first block-status extents: a damaged image may fail
// any of them, but never with a panic, a short read without an error or
// an extent that does not start where it was asked for.
func Poke(t testing.TB, d drivers.Driver) {
	t.Helper()
	buf := make([]byte, 64<<10)
	coroutine.Run(func(co *coroutine.Co) {
		for _, off := range []int64{0, d.Size() / 2, d.Size() - int64(len(buf))} {
			if off < 0 {
				continue
			}
			n := min(int64(len(buf)), d.Size()-off)
			if got, err := d.ReadAt(co, buf[:n], off); err == nil && got != int(n) {
				t.Fatalf("short read %d of %d without an error", got, n)
			}
		}
		for off, k := int64(0), 0; off < d.Size() && k < 16; k++ {
			st, err := d.BlockStatus(co, off)
			if err != nil {
				break
			}
			if st.Off != off || st.Len <= 0 {
				t.Fatalf("block status at %d: %+v", off, st)
			}
			off += st.Len
		}
	})
}

// ConcurrentWrites writes rounds of `writers` concurrent writes (and
// write-zeroes) of up to 300 KiB to disjoint stripes of d, several landing
// in one unallocated block so that they race to allocate it, applies them
// to model alike, and flushes d.
func ConcurrentWrites(t *testing.T, d drivers.Driver, model []byte, rounds, writers int) {
	t.Helper()
	rng := rand.New(rand.NewSource(Seed(t)))
	size := int64(len(model))
	stripe := size / int64(writers)
	for range rounds {
		done := make(chan error, writers)
		base := rng.Int63n(size)
		for k := range writers {
			off := (base + int64(k)*stripe) % size
			n := min(1+rng.Int63n(300<<10), stripe, size-off)
			p := bytes.Repeat([]byte{byte(rng.Intn(255) + 1)}, int(n))
			zero := rng.Intn(5) == 0
			if zero {
				clear(p)
			}
			copy(model[off:], p)
			go func() {
				var err error
				coroutine.Run(func(co *coroutine.Co) {
					if zero {
						err = d.WriteZeroes(co, off, n, true)
						return
					}
					_, err = d.WriteAt(co, p, off)
				})
				done <- err
			}()
		}
		for range writers {
			if err := <-done; err != nil {
				t.Fatal(err)
			}
		}
	}
	var err error
	coroutine.Run(func(co *coroutine.Co) { err = d.Flush(co) })
	if err != nil {
		t.Fatal(err)
	}
}
