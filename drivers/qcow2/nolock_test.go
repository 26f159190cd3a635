package qcow2

import (
	"bytes"
	"os"
	"path/filepath"
	"sync/atomic"
	"testing"

	"imgfuse/coroutine"
	"imgfuse/drivers"
	"imgfuse/drivers/driverstest"
	"imgfuse/drivers/raw"
)

// lockProbeFormat opens raw backing files whose reads check that the
// overlay's metadata lock is free: a backing read is data I/O for the
// overlay (unallocated clusters, and the head and tail of a copy-on-write),
// which must never run under that lock.
type lockProbeFormat struct {
	raw.Format
	overlay *atomic.Pointer[image]
	reads   *atomic.Int64
	held    *atomic.Int64
}

func (f lockProbeFormat) Open(path string, opts drivers.OpenOptions) (drivers.Driver, error) {
	d, err := f.Format.Open(path, opts)
	if err != nil {
		return nil, err
	}
	return lockProbeDriver{d, f}, nil
}

type lockProbeDriver struct {
	drivers.Driver
	f lockProbeFormat
}

func (d lockProbeDriver) ReadAt(co *coroutine.Co, p []byte, off int64) (int, error) {
	if img := d.f.overlay.Load(); img != nil {
		d.f.reads.Add(1)
		if img.mu.TryLock(co) {
			img.mu.Unlock(co)
		} else {
			d.f.held.Add(1)
		}
	}
	return d.Driver.ReadAt(co, p, off)
}

// TestDataIOOutsideMetadataLock reads and partially writes an overlay
// whose backing file reports every read made while the overlay's metadata
// lock is held (by this coroutine or any other).
func TestDataIOOutsideMetadataLock(t *testing.T) {
	driverstest.RequireTools(t, "qemu-img")
	dir := t.TempDir()
	base := filepath.Join(dir, "base.raw")
	if err := os.WriteFile(base, bytes.Repeat([]byte{0x5a}, 4<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	ov := filepath.Join(dir, "ov.qcow2")
	driverstest.Cmd(t, "qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "raw", ov)

	probe := lockProbeFormat{overlay: new(atomic.Pointer[image]), reads: new(atomic.Int64), held: new(atomic.Int64)}
	d, err := Format{}.Open(ov, drivers.OpenOptions{Formats: []drivers.Format{Format{}, probe}})
	if err != nil {
		t.Fatal(err)
	}
	img := d.(*image)
	probe.overlay.Store(img)
	defer img.Close()

	// Partial-cluster writes copy their head and tail from the backing
	// file; reads of untouched clusters go to it.
	for i := int64(0); i < 8; i++ {
		if _, err := writeAt(img, []byte("imgfuse"), i*(512<<10)+100); err != nil {
			t.Fatal(err)
		}
	}
	buf := make([]byte, 4<<20)
	if _, err := readAt(img, buf, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(buf[:100], bytes.Repeat([]byte{0x5a}, 100)) || string(buf[100:107]) != "imgfuse" {
		t.Fatalf("read back % x", buf[:110])
	}
	if probe.reads.Load() == 0 {
		t.Fatal("no read reached the backing file: the probe saw nothing")
	}
	if n := probe.held.Load(); n > 0 {
		t.Errorf("%d of %d backing reads ran under the overlay's metadata lock", n, probe.reads.Load())
	}
}
