package raw

import (
	"bytes"
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"os"
	"path/filepath"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"imgfuse/aio"
	"imgfuse/coroutine"
	"imgfuse/drivers"
	"imgfuse/internal/testenv"
)

// imageSize is deliberately not a multiple of any alignment.
const imageSize = 3<<20 + 100

func pattern(n int, seed uint64) []byte {
	r := rand.New(rand.NewPCG(seed, ^seed))
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(r.Uint32())
	}
	return b
}

// newImage writes a raw image of data and returns its path.
func newImage(t *testing.T, data []byte) string {
	t.Helper()
	path := filepath.Join(t.TempDir(), "disk.raw")
	if err := os.WriteFile(path, data, 0o600); err != nil {
		t.Fatal(err)
	}
	return path
}

func openT(t *testing.T, path string, opts drivers.OpenOptions) *Driver {
	t.Helper()
	d, err := Open(path, opts)
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	t.Cleanup(func() { d.Close() })
	return d
}

// ioModes runs a test with and without O_DIRECT.
var ioModes = []struct {
	name string
	opts drivers.OpenOptions
}{
	{"direct", drivers.OpenOptions{}},
	{"buffered", drivers.OpenOptions{NoDirectIO: true}},
}

func readAt(d drivers.Driver, p []byte, off int64) (n int, err error) {
	coroutine.Run(func(co *coroutine.Co) { n, err = d.ReadAt(co, p, off) })
	return
}

func writeAt(d drivers.Driver, p []byte, off int64) (n int, err error) {
	coroutine.Run(func(co *coroutine.Co) { n, err = d.WriteAt(co, p, off) })
	return
}

func run(fn func(co *coroutine.Co) error) (err error) {
	coroutine.Run(func(co *coroutine.Co) { err = fn(co) })
	return
}

func TestFormat(t *testing.T) {
	var f drivers.Format = Format{}
	if f.Name() != "raw" {
		t.Errorf("Name = %q", f.Name())
	}
	for _, h := range [][]byte{nil, {}, []byte("QFI\xfb\x00\x00\x00\x03"), make([]byte, drivers.ProbeSize)} {
		if got := f.Probe(drivers.ProbeInput{Head: h, Tail: h}); got != 1 {
			t.Errorf("Probe(%q) = %d, want 1", h, got)
		}
	}
	if _, err := f.Open(filepath.Join(t.TempDir(), "missing"), drivers.OpenOptions{}); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("Open of a missing file: %v", err)
	}
	path := newImage(t, make([]byte, 4096))
	if _, err := f.Open(path, drivers.OpenOptions{Snapshot: "s1"}); !errors.Is(err, drivers.ErrUnsupported) {
		t.Errorf("Open with a snapshot: %v, want ErrUnsupported", err)
	}
}

func TestReadWrite(t *testing.T) {
	for _, mode := range ioModes {
		t.Run(mode.name, func(t *testing.T) {
			model := pattern(imageSize, 1)
			path := newImage(t, model)
			d := openT(t, path, mode.opts)
			if d.Size() != imageSize {
				t.Fatalf("Size = %d, want %d", d.Size(), imageSize)
			}
			for _, w := range []struct {
				name string
				off  int64
				n    int
			}{
				{"aligned", 4096, 8192},
				{"unaligned", 1000, 3000},
				{"one byte", 70000, 1},
				{"large", 512 << 10, 1 << 20},
				{"tail", imageSize - 700, 700},
			} {
				p := pattern(w.n, uint64(w.off))
				if n, err := writeAt(d, p, w.off); n != w.n || err != nil {
					t.Fatalf("%s: WriteAt = %d, %v", w.name, n, err)
				}
				copy(model[w.off:], p)
			}
			for _, r := range []struct {
				name string
				off  int64
				n    int
			}{
				{"whole", 0, imageSize},
				{"aligned", 8192, 4096},
				{"unaligned", 999, 3003},
				{"tail", imageSize - 1000, 1000},
				{"empty", imageSize, 0},
			} {
				p := make([]byte, r.n)
				if n, err := readAt(d, p, r.off); n != r.n || err != nil {
					t.Fatalf("%s: ReadAt = %d, %v", r.name, n, err)
				}
				if !bytes.Equal(p, model[r.off:r.off+int64(r.n)]) {
					t.Errorf("%s: data differs", r.name)
				}
			}
			if err := run(d.Flush); err != nil {
				t.Fatalf("Flush: %v", err)
			}
			if err := d.Close(); err != nil {
				t.Fatalf("Close: %v", err)
			}
			got, err := os.ReadFile(path)
			if err != nil || !bytes.Equal(got, model) {
				t.Errorf("file after Close differs from the model (%d bytes, %v)", len(got), err)
			}
		})
	}
}

func TestOutOfRange(t *testing.T) {
	d := openT(t, newImage(t, make([]byte, imageSize)), drivers.OpenOptions{})
	for _, tc := range []struct {
		name string
		off  int64
		n    int
	}{
		{"crossing the end", imageSize - 10, 20},
		{"past the end", imageSize + 4096, 1},
		{"negative", -1, 1},
	} {
		if n, err := writeAt(d, make([]byte, tc.n), tc.off); n != 0 || !errors.Is(err, drivers.ErrNoSpace) {
			t.Errorf("%s: WriteAt = %d, %v; want ErrNoSpace", tc.name, n, err)
		}
		if n, err := readAt(d, make([]byte, tc.n), tc.off); n != 0 || !errors.Is(err, syscall.EINVAL) {
			t.Errorf("%s: ReadAt = %d, %v; want EINVAL", tc.name, n, err)
		}
		var ok bool
		coroutine.Run(func(co *coroutine.Co) { _, ok, _ = d.ReadDirect(co, aio.AlignedBuffer(tc.n), tc.off) })
		if ok {
			t.Errorf("%s: ReadDirect served an out-of-range read", tc.name)
		}
	}
	if err := run(func(co *coroutine.Co) error { return d.WriteZeroes(co, imageSize-1, 2, false) }); !errors.Is(err, drivers.ErrNoSpace) {
		t.Errorf("WriteZeroes past the end: %v", err)
	}
}

func TestReadOnly(t *testing.T) {
	data := pattern(imageSize, 2)
	d := openT(t, newImage(t, data), drivers.OpenOptions{ReadOnly: true})
	if n, err := writeAt(d, []byte{1}, 0); n != 0 || !errors.Is(err, drivers.ErrReadOnly) {
		t.Errorf("WriteAt = %d, %v; want ErrReadOnly", n, err)
	}
	for name, op := range map[string]func(co *coroutine.Co) error{
		"Discard":     func(co *coroutine.Co) error { return d.Discard(co, 0, 4096) },
		"WriteZeroes": func(co *coroutine.Co) error { return d.WriteZeroes(co, 0, 4096, true) },
		"Truncate":    func(co *coroutine.Co) error { return d.Truncate(co, 8192) },
	} {
		if err := run(op); !errors.Is(err, drivers.ErrReadOnly) {
			t.Errorf("%s = %v, want ErrReadOnly", name, err)
		}
	}
	if err := run(d.Flush); err != nil {
		t.Errorf("Flush on a read-only image: %v", err)
	}
	p := make([]byte, imageSize)
	if _, err := readAt(d, p, 0); err != nil || !bytes.Equal(p, data) {
		t.Errorf("read: %v", err)
	}
}

func TestZeroes(t *testing.T) {
	for _, tc := range []struct {
		name  string
		off   int64
		n     int64
		unmap bool
		op    string
	}{
		{"discard unaligned over chunks", 1000, 2<<20 + 300, false, "discard"},
		{"write zeroes aligned", 4096, 8192, false, "zeroes"},
		{"write zeroes unmap to the end", imageSize - 5000, 5000, true, "zeroes"},
		{"empty", 4096, 0, false, "discard"},
		{"zeros written unaligned over chunks", 1000, 2<<20 + 300, false, "write"},
		{"zeros written to the end", imageSize - 5000, 5000, false, "write"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			model := pattern(imageSize, 3)
			d := openT(t, newImage(t, model), drivers.OpenOptions{})
			err := run(func(co *coroutine.Co) error {
				switch tc.op {
				case "discard":
					return d.Discard(co, tc.off, tc.n)
				case "write":
					// The fallback for filesystems without
					// fallocate modes.
					return d.writeZeroes(co, tc.off, tc.n)
				}
				return d.WriteZeroes(co, tc.off, tc.n, tc.unmap)
			})
			if err != nil {
				t.Fatal(err)
			}
			clear(model[tc.off : tc.off+tc.n])
			p := make([]byte, imageSize)
			if _, err := readAt(d, p, 0); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(p, model) {
				t.Error("disk differs from the model")
			}
		})
	}
}

// TestDiscardPunchesHoles checks that a discard frees the image file's
// blocks (and reads back as zeros) on a filesystem that can punch holes.
// Whether it can is asked of the filesystem itself, on a scratch file next
// to the image: a driver that zeroes by writing, or not at all, fails.
func TestDiscardPunchesHoles(t *testing.T) {
	path := newImage(t, pattern(imageSize, 6))
	blocks := func(p string) int64 {
		var st syscall.Stat_t
		if err := syscall.Stat(p, &st); err != nil {
			t.Fatal(err)
		}
		return st.Blocks * 512
	}
	scratch := newImage(t, pattern(4<<20, 7))
	f, err := os.OpenFile(scratch, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	err = unix.Fallocate(int(f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, 0, 2<<20)
	f.Close()
	if err != nil {
		testenv.Skip(t, "the filesystem under %s cannot punch holes: %v", path, err)
	}
	testenv.SkipUnless(t, blocks(scratch) <= 2<<20, "the filesystem under %s punches holes without freeing blocks", path)

	d := openT(t, path, drivers.OpenOptions{})
	before := blocks(path)
	if err := run(func(co *coroutine.Co) error { return d.Discard(co, 0, 2<<20) }); err != nil {
		t.Fatal(err)
	}
	if freed := before - blocks(path); freed < 2<<20 {
		t.Errorf("discard of 2 MiB freed %d bytes of the image file", freed)
	}
	p := make([]byte, 2<<20)
	if _, err := readAt(d, p, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(p, make([]byte, len(p))) {
		t.Error("the discarded range does not read back as zeros")
	}
}

func TestBlockStatus(t *testing.T) {
	d := openT(t, newImage(t, make([]byte, imageSize)), drivers.OpenOptions{})
	for _, off := range []int64{0, 12345, imageSize - 1} {
		var e drivers.Extent
		err := run(func(co *coroutine.Co) (err error) { e, err = d.BlockStatus(co, off); return })
		want := drivers.Extent{Off: off, Len: imageSize - off, Flags: drivers.ExtentData}
		if err != nil || e != want {
			t.Errorf("BlockStatus(%d) = %+v, %v; want %+v", off, e, err, want)
		}
	}
	if err := run(func(co *coroutine.Co) (err error) { _, err = d.BlockStatus(co, imageSize); return }); err == nil {
		t.Error("BlockStatus at the end succeeded")
	}
}

func TestTruncate(t *testing.T) {
	for _, mode := range ioModes {
		t.Run(mode.name, func(t *testing.T) {
			model := pattern(imageSize, 7)
			path := newImage(t, model)
			d := openT(t, path, mode.opts)
			if err := run(func(co *coroutine.Co) error { return d.Truncate(co, imageSize) }); err != nil {
				t.Errorf("Truncate to the same size: %v", err)
			}
			// Shrinking is refused and changes nothing.
			for _, size := range []int64{0, imageSize - 1, -1} {
				err := run(func(co *coroutine.Co) error { return d.Truncate(co, size) })
				if !errors.Is(err, drivers.ErrUnsupported) {
					t.Errorf("Truncate(%d) = %v, want ErrUnsupported", size, err)
				}
			}
			if d.Size() != imageSize {
				t.Fatalf("Size changed to %d by a refused shrink", d.Size())
			}
			// Growing: twice, to an unaligned size and then further.
			for _, size := range []int64{imageSize + 1000, 8<<20 + 7} {
				if err := run(func(co *coroutine.Co) error { return d.Truncate(co, size) }); err != nil {
					t.Fatalf("Truncate(%d): %v", size, err)
				}
				if d.Size() != size {
					t.Fatalf("Size = %d after Truncate(%d)", d.Size(), size)
				}
				model = append(model, make([]byte, size-int64(len(model)))...)
			}
			// The grown range reads as zeros and is writable, up to
			// the last byte.
			size := int64(len(model))
			last := []byte{0xa5}
			if n, err := writeAt(d, last, size-1); n != 1 || err != nil {
				t.Fatalf("write of the last byte: %d, %v", n, err)
			}
			model[size-1] = 0xa5
			if _, err := writeAt(d, last, size); !errors.Is(err, drivers.ErrNoSpace) {
				t.Errorf("write past the grown end of a non-growable disk: %v, want ErrNoSpace", err)
			}
			got := make([]byte, size)
			if _, err := readAt(d, got, 0); err != nil || !bytes.Equal(got, model) {
				t.Fatalf("read after growth: %v (equal %v)", err, bytes.Equal(got, model))
			}
			var e drivers.Extent
			if err := run(func(co *coroutine.Co) (err error) { e, err = d.BlockStatus(co, size-1); return }); err != nil || e.Off+e.Len != size {
				t.Errorf("BlockStatus(%d) = %+v, %v: does not end at the new size", size-1, e, err)
			}
			if info := d.Info(); info.VirtualSize != size {
				t.Errorf("Info().VirtualSize = %d, want %d", info.VirtualSize, size)
			}
			if err := run(d.Flush); err != nil {
				t.Fatal(err)
			}
			if err := d.Close(); err != nil {
				t.Fatal(err)
			}
			file, err := os.ReadFile(path)
			if err != nil || !bytes.Equal(file, model) {
				t.Errorf("image file after growth: %d bytes (want %d), %v", len(file), size, err)
			}
		})
	}
}

func TestGrowable(t *testing.T) {
	for _, mode := range ioModes {
		t.Run(mode.name, func(t *testing.T) {
			model := pattern(imageSize, 8)
			path := newImage(t, model)
			opts := mode.opts
			opts.Growable = true
			d := openT(t, path, opts)
			for _, w := range []struct {
				name string
				off  int64
				n    int
			}{
				{"crossing the end", imageSize - 10, 20},
				{"at the end", imageSize + 10, 4096},
				{"past the end, leaving a gap", 5<<20 + 3, 777},
				{"aligned past the end", 6 << 20, 8192},
				{"inside", 4096, 100},
			} {
				p := pattern(w.n, uint64(w.off))
				if n, err := writeAt(d, p, w.off); n != w.n || err != nil {
					t.Fatalf("%s: WriteAt(%d, %d) = %d, %v", w.name, w.off, w.n, n, err)
				}
				if end := w.off + int64(w.n); end > int64(len(model)) {
					model = append(model, make([]byte, end-int64(len(model)))...)
				}
				copy(model[w.off:], p)
				if d.Size() != int64(len(model)) {
					t.Fatalf("%s: Size = %d, want %d", w.name, d.Size(), len(model))
				}
			}
			for _, off := range []int64{-1, math.MaxInt64 - 10} {
				if _, err := writeAt(d, make([]byte, 100), off); !errors.Is(err, drivers.ErrNoSpace) {
					t.Errorf("WriteAt(%d) = %v, want ErrNoSpace", off, err)
				}
			}
			got := make([]byte, len(model))
			if _, err := readAt(d, got, 0); err != nil || !bytes.Equal(got, model) {
				t.Fatalf("read back: %v (equal %v)", err, bytes.Equal(got, model))
			}
			if err := run(d.Flush); err != nil {
				t.Fatal(err)
			}
			if err := d.Close(); err != nil {
				t.Fatal(err)
			}
			if file, err := os.ReadFile(path); err != nil || !bytes.Equal(file, model) {
				t.Errorf("image file: %d bytes (want %d), %v", len(file), len(model), err)
			}
		})
	}
}

// TestConcurrentGrowth races growing writes, truncates, in-range writes and
// reads (run it with -race): every write must survive, and the size must
// end as the largest end asked for.
func TestConcurrentGrowth(t *testing.T) {
	for _, mode := range ioModes {
		t.Run(mode.name, func(t *testing.T) {
			const start = 64 << 10
			path := newImage(t, pattern(start, 9))
			opts := mode.opts
			opts.Growable = true
			d := openT(t, path, opts)
			seed := uint64(time.Now().UnixNano())
			t.Logf("seed %d", seed)
			const workers, steps = 8, 40
			type write struct {
				off int64
				p   []byte
			}
			writes := make([][]write, workers)
			var wantSize int64 = start
			var wg sync.WaitGroup
			errs := make(chan error, workers)
			for w := range workers {
				rng := rand.New(rand.NewPCG(seed, uint64(w)))
				wg.Add(1)
				go func() {
					defer wg.Done()
					for i := range steps {
						// Each worker owns the 512-byte slots
						// congruent to w modulo workers.
						slot := int64(rng.IntN(4096))*workers + int64(w)
						off := slot*512 + int64(rng.IntN(256))
						switch rng.IntN(4) {
						case 0:
							size := off + int64(rng.IntN(512))
							if err := run(func(co *coroutine.Co) error {
								err := d.Truncate(co, size)
								if errors.Is(err, drivers.ErrUnsupported) {
									return nil // someone grew it further
								}
								return err
							}); err != nil {
								errs <- fmt.Errorf("worker %d step %d: Truncate(%d): %v", w, i, size, err)
								return
							}
						case 1:
							p := make([]byte, 100)
							if size := d.Size(); size > 100 {
								if _, err := readAt(d, p, size-100); err != nil {
									errs <- fmt.Errorf("worker %d step %d: read at the end: %v", w, i, err)
									return
								}
							}
						default:
							p := pattern(1+rng.IntN(256), seed+uint64(w*steps+i))
							if _, err := writeAt(d, p, off); err != nil {
								errs <- fmt.Errorf("worker %d step %d: WriteAt(%d): %v", w, i, off, err)
								return
							}
							writes[w] = append(writes[w], write{off, p})
						}
					}
				}()
			}
			wg.Wait()
			close(errs)
			for err := range errs {
				t.Fatal(err)
			}
			model := make([]byte, d.Size())
			copy(model, pattern(start, 9))
			for w := range workers {
				for _, wr := range writes[w] {
					wantSize = max(wantSize, wr.off+int64(len(wr.p)))
				}
			}
			if d.Size() < wantSize {
				t.Fatalf("Size = %d, below the end of a write (%d)", d.Size(), wantSize)
			}
			// Slots are disjoint between workers, and in order within one.
			for w := range workers {
				for _, wr := range writes[w] {
					copy(model[wr.off:], wr.p)
				}
			}
			got := make([]byte, len(model))
			if _, err := readAt(d, got, 0); err != nil {
				t.Fatal(err)
			}
			if i := firstDiff(got, model); i >= 0 {
				t.Fatalf("disk differs from the model at %d", i)
			}
			if fi, err := os.Stat(path); err != nil || fi.Size() != d.Size() {
				t.Errorf("file size %v, %v; Size() = %d", fi.Size(), err, d.Size())
			}
		})
	}
}

func firstDiff(a, b []byte) int {
	for i := range min(len(a), len(b)) {
		if a[i] != b[i] {
			return i
		}
	}
	if len(a) != len(b) {
		return min(len(a), len(b))
	}
	return -1
}

func TestReadDirect(t *testing.T) {
	for _, mode := range ioModes {
		t.Run(mode.name, func(t *testing.T) {
			data := pattern(imageSize, 4)
			d := openT(t, newImage(t, data), mode.opts)
			for _, tc := range []struct {
				name     string
				off      int64
				n        int
				mustBeOK bool
			}{
				{"aligned", 65536, 65536, true},
				{"aligned 1 MiB", 1 << 20, 1 << 20, true},
				{"unaligned offset", 700, 100, false},
			} {
				p := aio.AlignedBuffer(tc.n)
				var n int
				var ok bool
				var err error
				coroutine.Run(func(co *coroutine.Co) { n, ok, err = d.ReadDirect(co, p, tc.off) })
				if tc.mustBeOK && !ok {
					t.Errorf("%s: ReadDirect declined an aligned read", tc.name)
				}
				if !ok {
					if n != 0 || err != nil {
						t.Errorf("%s: declined with n=%d err=%v", tc.name, n, err)
					}
					continue
				}
				if n != tc.n || err != nil || !bytes.Equal(p, data[tc.off:tc.off+int64(tc.n)]) {
					t.Errorf("%s: ReadDirect = %d, %v or wrong data", tc.name, n, err)
				}
			}
		})
	}
}

func TestInfo(t *testing.T) {
	path := newImage(t, pattern(imageSize, 5))
	d := openT(t, path, drivers.OpenOptions{ReadOnly: true})
	info := d.Info()
	if info.Filename != path || info.Format != "raw" || info.VirtualSize != imageSize ||
		info.FileSize <= 0 || info.Backing != nil {
		t.Errorf("Info = %+v", info)
	}
}

// TestAllocated: Allocated is the image file's own allocation, clamped to
// the disk size: 0 for a sparse file, what was written, what a discard
// left, and the size when the filesystem holds more than the file's
// length (space preallocated past the end).
func TestAllocated(t *testing.T) {
	const size = 16 << 20
	for _, m := range ioModes {
		t.Run(m.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "disk.raw")
			if err := os.WriteFile(path, nil, 0o600); err != nil {
				t.Fatal(err)
			}
			if err := os.Truncate(path, size); err != nil {
				t.Fatal(err)
			}
			d := openT(t, path, m.opts)
			var _ drivers.Allocator = d
			if a := d.Allocated(); a != 0 {
				t.Errorf("sparse file: Allocated %d, want 0", a)
			}
			if _, err := writeAt(d, pattern(4<<20, 1), 8<<20); err != nil {
				t.Fatal(err)
			}
			// The filesystem may round to its block size.
			if a := d.Allocated(); a < 4<<20 || a > 4<<20+64<<10 {
				t.Errorf("4 MiB written: Allocated %d", a)
			}
			if err := run(func(co *coroutine.Co) error { return d.Discard(co, 8<<20, 2<<20) }); err != nil {
				t.Fatal(err)
			}
			if a := d.Allocated(); a < 2<<20 || a > 2<<20+64<<10 {
				t.Errorf("2 of the 4 MiB discarded: Allocated %d", a)
			}
			// Space allocated past the end of the file counts in
			// st_blocks but not in the disk.
			if err := run(func(co *coroutine.Co) error { return d.WriteZeroes(co, 0, size, false) }); err != nil {
				t.Fatal(err)
			}
			f, err := os.OpenFile(path, os.O_RDWR, 0)
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			if err := unix.Fallocate(int(f.Fd()), unix.FALLOC_FL_KEEP_SIZE, size, 4<<20); err != nil {
				testenv.Skip(t, "fallocate past the end: %v", err)
			}
			var st syscall.Stat_t
			if err := syscall.Stat(path, &st); err != nil || st.Blocks*512 <= size {
				t.Fatalf("the file holds %d bytes, want more than %d: %v", st.Blocks*512, size, err)
			}
			if a := d.Allocated(); a != size {
				t.Errorf("fully allocated, with more past the end: Allocated %d, want %d", a, size)
			}
		})
	}
}
