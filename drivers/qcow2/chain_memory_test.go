package qcow2

import (
	"bytes"
	"errors"
	"fmt"
	"path/filepath"
	"runtime"
	"testing"

	"imgfuse/drivers"
	"imgfuse/drivers/driverstest"
)

// buildWideChain makes a chain of 8 qcow2 layers, each with 512-byte
// clusters and a 16 GiB disk, so each has a 4 MiB L1 table, mostly zeros
// (qemu-img writes it out: 128 GiB would give the largest allowed, 32 MiB,
// at 15 s and 32 MiB of disk a layer); layers 0, 3 and 7 hold 4 KiB of
// byte 0x40+i at i GiB.
func buildWideChain(t *testing.T, dir string) string {
	t.Helper()
	prev := ""
	for i := range 8 {
		name := fmt.Sprintf("l%d.qcow2", i)
		args := []string{"create", "-q", "-f", "qcow2", "-o", "cluster_size=512"}
		if prev != "" {
			args = append(args, "-b", prev, "-F", "qcow2")
		}
		qemuImgIn(t, dir, append(args, name, "16G")...)
		if hasData(i) {
			driverstest.QemuIO(t, filepath.Join(dir, name), fmt.Sprintf("write -P %#x %dG 4k", 0x40+i, i))
		}
		prev = name
	}
	top := filepath.Join(dir, prev)
	if l1 := fileBE64(t, top, 32) & 0xffffffff; l1*8 != 4<<20 {
		t.Fatalf("L1 table of %d bytes, want 4 MiB", l1*8)
	}
	return top
}

func hasData(layer int) bool { return layer == 0 || layer == 3 || layer == 7 }

// heapAfter returns how much the live heap grew while open was done,
// with the result still open; the caller closes it.
func heapAfter(t *testing.T, open func() drivers.Driver) (drivers.Driver, int64) {
	t.Helper()
	var a, b runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&a)
	d := open()
	runtime.GC()
	runtime.ReadMemStats(&b)
	return d, int64(b.HeapAlloc) - int64(a.HeapAlloc)
}

// TestChainMetadataMemory (issue 7, defect 4): a chain of 8 layers with
// large L1 tables is served with one copy of the top layer's table at
// most (the layers below read theirs in pieces) and L2 caches filled only
// as far as the tables read, and a chain over the metadata budget is
// refused with ErrUnsupported instead of filling memory.
func TestChainMetadataMemory(t *testing.T) {
	requireQemu(t)
	top := buildWideChain(t, t.TempDir())
	read := func(d drivers.Driver) {
		for i := range 8 {
			p := make([]byte, 4096)
			if _, err := readAt(d, p, int64(i)<<30); err != nil {
				t.Fatal(err)
			}
			want := byte(0)
			if hasData(i) {
				want = byte(0x40 + i)
			}
			if !bytes.Equal(p, bytes.Repeat([]byte{want}, 4096)) {
				t.Fatalf("layer %d's data reads wrong", i)
			}
		}
	}
	for _, c := range []struct {
		name  string
		ro    bool
		bound int64
	}{
		// Before: 8 × (4 MiB of L1 + a 32 MiB L2 cache slab), and
		// 8 × (32 + 32) MiB with 32 MiB L1 tables. Now: the L1 table
		// of a writable top layer, the tables read, and the caches'
		// slot bookkeeping (at most 65536 slots of 512-byte L2 tables
		// in the top two layers, ~5 MiB each).
		{"read-only", true, 24 << 20},
		{"writable top", false, 4<<20 + 24<<20},
	} {
		d, grew := heapAfter(t, func() drivers.Driver {
			d, err := Format{}.Open(top, drivers.OpenOptions{ReadOnly: c.ro, Formats: testFormats})
			if err != nil {
				t.Fatal(err)
			}
			read(d)
			return d
		})
		t.Logf("%s: the open chain holds %d KiB of heap", c.name, grew>>10)
		if grew > c.bound {
			t.Errorf("%s: the open chain holds %d MiB of heap, want at most %d MiB", c.name, grew>>20, c.bound>>20)
		}
		if err := d.Close(); err != nil {
			t.Fatal(err)
		}
	}

	defer func(v int64) { maxChainMetadata = v }(maxChainMetadata)
	maxChainMetadata = 8 << 20
	d, err := Format{}.Open(top, drivers.OpenOptions{Formats: testFormats})
	if err == nil {
		d.Close()
		t.Fatal("a writable open over the metadata budget succeeded")
	}
	if !errors.Is(err, drivers.ErrUnsupported) {
		t.Fatalf("open over the metadata budget: %v, want ErrUnsupported", err)
	}
}
