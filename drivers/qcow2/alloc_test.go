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
