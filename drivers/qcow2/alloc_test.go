//go:build !race

package qcow2

import (
	"fmt"
	"path/filepath"
	"testing"

	"imgfuse/aio"
	"imgfuse/coroutine"
	"imgfuse/drivers"
)

// TestHotPathsAllocateNothing holds the hot paths to zero heap allocations:
// a read whose L2 table is cached, and a write into an allocated, COPIED
// cluster (no metadata I/O), each inside one coroutine. An allocation per
// request costs GC work at 100k requests per second. (The race detector
// allocates on its own, hence the build tag.)
func TestHotPathsAllocateNothing(t *testing.T) {
	requireQemu(t)
	const size = 8 << 20
	img := filepath.Join(t.TempDir(), "img.qcow2")
	qemuImg(t, "create", "-q", "-f", "qcow2", "-o", "preallocation=metadata", img, fmt.Sprint(size))
	d := openRW(t, img, drivers.OpenOptions{})
	defer d.Close()
	p := aio.AlignedBuffer(4096)
	var err error
	var off int64
	read := func(co *coroutine.Co) { _, err = d.ReadAt(co, p, off) }
	write := func(co *coroutine.Co) { _, err = d.WriteAt(co, p, off) }
	for _, tc := range []struct {
		name string
		fn   func(*coroutine.Co)
	}{{"cached read", read}, {"in-place write", write}} {
		off = 0
		coroutine.Run(tc.fn) // warm the L2 cache and the pools
		if err != nil {
			t.Fatalf("%s: %v", tc.name, err)
		}
		allocs := testing.AllocsPerRun(200, func() {
			off = (off + 4096) % size
			coroutine.Run(tc.fn)
		})
		if err != nil {
			t.Fatalf("%s: %v", tc.name, err)
		}
		if allocs != 0 {
			t.Errorf("%s: %.1f heap allocations per request, want 0", tc.name, allocs)
		}
	}
}

// TestCacheSize: OpenOptions.CacheSize bounds the L2 cache (at least two
// tables), and the default maps the whole disk up to 32 MiB.
func TestCacheSize(t *testing.T) {
	requireQemu(t)
	img := filepath.Join(t.TempDir(), "big.qcow2")
	qemuImg(t, "create", "-q", "-f", "qcow2", img, "1T") // 2048 L2 tables of 64 KiB
	for _, tc := range []struct {
		limit int64
		want  int
	}{{0, 32 << 20 / 65536}, {1 << 20, 16}, {1, 2}, {1 << 40, 2048}} {
		d := openTest(t, img, drivers.OpenOptions{CacheSize: tc.limit})
		if got := d.l2.Tables(); got != tc.want {
			t.Errorf("CacheSize %d: %d L2 tables, want %d", tc.limit, got, tc.want)
		}
		d.Close()
	}
}
