package driverstest

import (
	"bytes"
	"fmt"
	"math/rand"
	"os"
	"sync"
	"testing"

	"imgfuse/coroutine"
	"imgfuse/drivers"
)

// memDriver is a trivially correct in-memory driver: the suite must pass on
// it. It reports 64 KiB blocks of zeros as holes so that BlockStatus
// returns more than one extent.
type memDriver struct {
	mu       sync.Mutex
	b        []byte
	readOnly bool
}

func (m *memDriver) Size() int64 { m.mu.Lock(); defer m.mu.Unlock(); return int64(len(m.b)) }

func (m *memDriver) ReadAt(co *coroutine.Co, p []byte, off int64) (int, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	return copy(p, m.b[off:]), nil
}

func (m *memDriver) WriteAt(co *coroutine.Co, p []byte, off int64) (int, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.readOnly {
		return 0, fmt.Errorf("mem: %w", drivers.ErrReadOnly)
	}
	return copy(m.b[off:], p), nil
}

func (m *memDriver) Flush(co *coroutine.Co) error { return nil }

func (m *memDriver) Discard(co *coroutine.Co, off, n int64) error {
	return m.WriteZeroes(co, off, n, true)
}

func (m *memDriver) WriteZeroes(co *coroutine.Co, off, n int64, unmap bool) error {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.readOnly {
		return fmt.Errorf("mem: %w", drivers.ErrReadOnly)
	}
	clear(m.b[off : off+n])
	return nil
}

func (m *memDriver) BlockStatus(co *coroutine.Co, off int64) (drivers.Extent, error) {
	m.mu.Lock()
	defer m.mu.Unlock()
	const blk = 64 << 10
	end := min((off/blk+1)*blk, int64(len(m.b)))
	flags := drivers.ExtentZero
	if bytes.IndexFunc(m.b[off:end], func(c rune) bool { return c != 0 }) >= 0 {
		flags = drivers.ExtentData
	}
	return drivers.Extent{Off: off, Len: end - off, Flags: flags}, nil
}

func (m *memDriver) Truncate(co *coroutine.Co, size int64) error {
	if m.readOnly {
		return fmt.Errorf("mem: %w", drivers.ErrReadOnly)
	}
	return nil
}

func (m *memDriver) Close() error { return nil }

func TestSuiteOnMemDriver(t *testing.T) {
	for _, size := range []int64{512, 1 << 20, 4194704} {
		ref := make([]byte, size)
		rand.New(rand.NewSource(size)).Read(ref[:size/2])
		open := func(t *testing.T) (drivers.Driver, []byte) {
			return &memDriver{b: bytes.Clone(ref)}, ref
		}
		openRO := func(t *testing.T) (drivers.Driver, []byte) {
			return &memDriver{b: bytes.Clone(ref), readOnly: true}, ref
		}
		t.Run(fmt.Sprint(size), func(t *testing.T) {
			Run(t, open)
			RunWritable(t, open)
			t.Run("ReadOnly", func(t *testing.T) { RunReadOnly(t, openRO) })
		})
	}
}

func TestRandomRange(t *testing.T) {
	rng := rand.New(rand.NewSource(1))
	for _, size := range []int64{1, 512, 4194704, 64 << 20} {
		var atEnd, crossing, long int
		for i := 0; i < 5000; i++ {
			off, n := randomRange(rng, size)
			if off < 0 || n < 1 || off+n > size || n > maxRead {
				t.Fatalf("size %d: range [%d, +%d) out of bounds", size, off, n)
			}
			if off+n == size {
				atEnd++
			}
			if off/65536 != (off+n-1)/65536 {
				crossing++
			}
			if n > 2<<20 {
				long++
			}
		}
		if atEnd == 0 {
			t.Errorf("size %d: no range ends at the end of the disk", size)
		}
		if size >= 64<<20 && (crossing < 500 || long == 0) {
			t.Errorf("size %d: %d ranges cross a 64 KiB boundary, %d are over 2 MiB", size, crossing, long)
		}
	}
}

// TestCatalogue builds every catalogue image and checks that the recipes
// do what they say: qemu-img accepts the image and the zero ranges are
// zeros in the reference.
func TestCatalogue(t *testing.T) {
	RequireTools(t, "qemu-img", "qemu-io")
	const size = 8 << 20
	for _, img := range Catalogue(size) {
		t.Run(img.Name, func(t *testing.T) {
			t.Parallel()
			dir := t.TempDir()
			path := img.Build(t, dir, size)
			Cmd(t, "qemu-img", "check", "-q", path)
			ref, err := os.ReadFile(ConvertRef(t, path, img.Snapshot, dir))
			if err != nil {
				t.Fatal(err)
			}
			if len(ref) != size && img.Name != "odd-size" {
				t.Errorf("reference is %d bytes, want %d", len(ref), size)
			}
			if bytes.Count(ref, []byte{0}) == len(ref) {
				t.Errorf("reference is all zeros")
			}
			for _, z := range img.Zeros {
				if i := bytes.IndexFunc(ref[z[0]:z[0]+z[1]], func(c rune) bool { return c != 0 }); i >= 0 {
					t.Errorf("zero range [%d, +%d) has a non-zero byte at %d", z[0], z[1], z[0]+int64(i))
				}
			}
		})
	}
}
