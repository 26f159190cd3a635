package qcow2

import (
	"path/filepath"
	"syscall"
	"testing"

	"imgfuse/drivers"
	"imgfuse/drivers/driverstest"
)

// TestAllocated: Allocated is about the data the chain stores — 0 for an
// empty 1 TiB image, the size for a full one, the data written and not
// the L2 tables that map it, the sum of the layers of a chain, the data
// file's data — read-only and read-write, and it never exceeds the size.
func TestAllocated(t *testing.T) {
	requireQemu(t)
	t.Parallel()
	dir := t.TempDir()
	// create makes dir/name of size with qemu-img create's other args.
	create := func(t *testing.T, name, size string, args ...string) string {
		p := filepath.Join(dir, name)
		cmdIn(t, dir, "qemu-img", append(append([]string{"create", "-q"}, args...), p, size)...)
		return p
	}
	// within checks that the estimate is in [lo, hi] and the size.
	within := func(t *testing.T, d *image, lo, hi int64) {
		t.Helper()
		a := d.Allocated()
		t.Logf("Allocated %d", a)
		if a < lo || a > hi || a > d.Size() {
			t.Errorf("Allocated %d, want [%d, %d] (size %d)", a, lo, hi, d.Size())
		}
	}

	t.Run("empty-1TiB", func(t *testing.T) {
		img := create(t, "empty.qcow2", "1T", "-f", "qcow2")
		d := openRW(t, img, drivers.OpenOptions{})
		within(t, d, 0, 0)
		if err := d.Close(); err != nil {
			t.Fatal(err)
		}
		within(t, openTest(t, img, drivers.OpenOptions{}), 0, 0)
	})

	t.Run("scattered-writes", func(t *testing.T) {
		// 4 KiB clusters: an L2 table maps 2 MiB, so each write lands
		// in a fresh table as large as the data it maps.
		img := create(t, "scattered.qcow2", "64M", "-f", "qcow2", "-o", "cluster_size=4096")
		d := openRW(t, img, drivers.OpenOptions{})
		const writes = 32
		for i := range int64(writes) {
			if _, err := writeAt(d, make([]byte, 4096), i*2<<20+4096); err != nil {
				t.Fatal(err)
			}
		}
		if err := flush(d); err != nil {
			t.Fatal(err)
		}
		if n := d.l2Tables.Load(); n != writes {
			t.Errorf("%d L2 tables counted, want %d", n, writes)
		}
		within(t, d, writes*4096, writes*4096+2*4096)
		if err := d.Close(); err != nil {
			t.Fatal(err)
		}
		within(t, openTest(t, img, drivers.OpenOptions{}), writes*4096, writes*4096+2*4096)
	})

	t.Run("full", func(t *testing.T) {
		img := create(t, "full.qcow2", "8M", "-f", "qcow2")
		driverstest.QemuIO(t, img, "write -P 0x5a 0 8M")
		within(t, openTest(t, img, drivers.OpenOptions{}), 8<<20, 8<<20)
	})

	t.Run("chain", func(t *testing.T) {
		// A sparse raw base with 3 MiB of data, a qcow2 layer with 1 MiB
		// elsewhere, an empty top layer: 4 MiB in all.
		base := create(t, "base.raw", "16M", "-f", "raw")
		cmdIn(t, dir, "qemu-io", "-f", "raw", "-c", "write -P 1 0 3M", base)
		mid := create(t, "mid.qcow2", "16M", "-f", "qcow2", "-b", "base.raw", "-F", "raw")
		driverstest.QemuIO(t, mid, "write -P 2 8M 1M")
		top := create(t, "top.qcow2", "16M", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2")
		d := openTest(t, top, drivers.OpenOptions{})
		within(t, d, 4<<20, 4<<20+64<<10)
		// NoBacking shows the top layer alone: nothing.
		within(t, openTest(t, top, drivers.OpenOptions{NoBacking: true}), 0, 0)
		// A layer over a full base is full, whatever it holds itself.
		full := create(t, "fullbase.qcow2", "8M", "-f", "qcow2")
		driverstest.QemuIO(t, full, "write -P 3 0 8M")
		over := create(t, "over.qcow2", "8M", "-f", "qcow2", "-b", "fullbase.qcow2", "-F", "qcow2")
		driverstest.QemuIO(t, over, "write -P 4 1M 1M")
		within(t, openTest(t, over, drivers.OpenOptions{}), 8<<20, 8<<20)
	})

	t.Run("data-file", func(t *testing.T) {
		img := create(t, "ext.qcow2", "16M", "-f", "qcow2", "-o", "data_file=ext.data")
		cmdIn(t, dir, "qemu-io", "-f", "qcow2", "-c", "write -P 7 4M 2M", img)
		within(t, openTest(t, img, drivers.OpenOptions{}), 2<<20, 2<<20+64<<10)
	})
}

// TestAllocatedCounts: the metadata Allocated subtracts, as recorded at
// open, for the image qemu-img lays out: header, L1 table, refcount table,
// and one refcount block per 2 GiB of file with 64 KiB clusters and 16-bit
// refcounts.
func TestAllocatedCounts(t *testing.T) {
	requireQemu(t)
	t.Parallel()
	img := filepath.Join(t.TempDir(), "img.qcow2")
	qemuImg(t, "create", "-q", "-f", "qcow2", img, "1T")
	d := openTest(t, img, drivers.OpenOptions{})
	const cs = 64 << 10
	if want := int64(cs + 2048*8 + cs); d.metaFixed != want {
		t.Errorf("metaFixed %d, want %d (header, 2048 L1 entries, one reftable cluster)", d.metaFixed, want)
	}
	if d.refBlockCover != 2<<30 {
		t.Errorf("refBlockCover %d, want 2 GiB", d.refBlockCover)
	}
	if n := d.l2Tables.Load(); n != 0 {
		t.Errorf("an empty image has %d L2 tables", n)
	}
	var st syscall.Stat_t
	if err := syscall.Stat(img, &st); err != nil {
		t.Fatal(err)
	}
	// 208 KiB of file, all of it metadata.
	if a := d.Allocated(); a != 0 || st.Blocks*512 < 3*cs {
		t.Errorf("Allocated %d of a file of %d bytes (%d allocated)", a, st.Size, st.Blocks*512)
	}
}
