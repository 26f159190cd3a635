package raw

import (
	"bytes"
	"errors"
	"math/rand/v2"
	"os"
	"path/filepath"
	"syscall"
	"testing"

	"imgfuse/aio"
	"imgfuse/coroutine"
	"imgfuse/drivers"
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
		if got := f.Probe(h); got != 1 {
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
		if _, ok, _ := d.ReadDirect(aio.AlignedBuffer(tc.n), tc.off); ok {
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
// blocks on a filesystem that can punch holes.
func TestDiscardPunchesHoles(t *testing.T) {
	path := newImage(t, pattern(imageSize, 6))
	d := openT(t, path, drivers.OpenOptions{})
	blocks := func() int64 {
		var st syscall.Stat_t
		if err := syscall.Stat(path, &st); err != nil {
			t.Fatal(err)
		}
		return st.Blocks * 512
	}
	before := blocks()
	if err := run(func(co *coroutine.Co) error { return d.Discard(co, 0, 2<<20) }); err != nil {
		t.Fatal(err)
	}
	if freed := before - blocks(); freed < 1<<20 {
		t.Skipf("discard freed %d bytes: the filesystem under %s cannot punch holes", freed, path)
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
	d := openT(t, newImage(t, make([]byte, imageSize)), drivers.OpenOptions{})
	if err := run(func(co *coroutine.Co) error { return d.Truncate(co, imageSize) }); err != nil {
		t.Errorf("Truncate to the same size: %v", err)
	}
	for _, size := range []int64{0, imageSize + 4096} {
		if err := run(func(co *coroutine.Co) error { return d.Truncate(co, size) }); !errors.Is(err, drivers.ErrUnsupported) {
			t.Errorf("Truncate(%d) = %v, want ErrUnsupported", size, err)
		}
	}
	if d.Size() != imageSize {
		t.Errorf("Size changed to %d", d.Size())
	}
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
				n, ok, err := d.ReadDirect(p, tc.off)
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
