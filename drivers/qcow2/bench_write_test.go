package qcow2

import (
	"fmt"
	"math/rand"
	"path/filepath"
	"sync/atomic"
	"testing"

	"imgfuse/aio"
	"imgfuse/coroutine"
	"imgfuse/drivers"
)

// BenchmarkAllocatingWrite: 64 KiB cluster-aligned writes, each into a
// fresh cluster of a fresh image (allocation, refcount update, L2 update;
// every 8192 clusters an L2 table allocation too). Run with -benchmem.
func BenchmarkAllocatingWrite(b *testing.B) {
	requireQemu(b)
	const cs = 64 << 10
	img := filepath.Join(b.TempDir(), "img.qcow2")
	size := int64(max(b.N, 1)) * cs
	qemuImg(b, "create", "-q", "-f", "qcow2", img, fmt.Sprint(size))
	d := openRW(b, img, drivers.OpenOptions{})
	defer d.Close()
	p := aio.AlignedBuffer(cs)
	rand.New(rand.NewSource(1)).Read(p)
	b.SetBytes(cs)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		var err error
		coroutine.Run(func(co *coroutine.Co) { _, err = d.WriteAt(co, p, int64(i)*cs) })
		if err != nil {
			b.Fatal(err)
		}
	}
	b.StopTimer()
	if err := flush(d); err != nil {
		b.Fatal(err)
	}
}

// BenchmarkInPlaceWrite: 4 KiB random writes into allocated, COPIED
// clusters (preallocation=metadata): the lookup under the lock, then the
// data write, with no metadata I/O.
func BenchmarkInPlaceWrite(b *testing.B) {
	requireQemu(b)
	const size = 64 << 20
	img := filepath.Join(b.TempDir(), "img.qcow2")
	qemuImg(b, "create", "-q", "-f", "qcow2", "-o", "preallocation=metadata", img, fmt.Sprint(size))
	d := openRW(b, img, drivers.OpenOptions{})
	defer d.Close()
	p := aio.AlignedBuffer(4096)
	rng := rand.New(rand.NewSource(1))
	rng.Read(p)
	b.SetBytes(4096)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		off := rng.Int63n(size/4096) * 4096
		var err error
		coroutine.Run(func(co *coroutine.Co) { _, err = d.WriteAt(co, p, off) })
		if err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkInPlaceWriteParallel is BenchmarkInPlaceWrite from 32
// goroutines at once (each request in its own coroutine, as FUSE requests
// are): in-place writes share only the short lookup under the lock, so
// they overlap in the device.
func BenchmarkInPlaceWriteParallel(b *testing.B) {
	requireQemu(b)
	const size = 64 << 20
	img := filepath.Join(b.TempDir(), "img.qcow2")
	qemuImg(b, "create", "-q", "-f", "qcow2", "-o", "preallocation=metadata", img, fmt.Sprint(size))
	d := openRW(b, img, drivers.OpenOptions{})
	defer d.Close()
	b.SetBytes(4096)
	b.SetParallelism(16)
	var seed atomic.Int64
	b.ResetTimer()
	b.RunParallel(func(pb *testing.PB) {
		rng := rand.New(rand.NewSource(seed.Add(1)))
		p := aio.AlignedBuffer(4096)
		rng.Read(p)
		for pb.Next() {
			off := rng.Int63n(size/4096) * 4096
			var err error
			coroutine.Run(func(co *coroutine.Co) { _, err = d.WriteAt(co, p, off) })
			if err != nil {
				b.Error(err)
				return
			}
		}
	})
}
