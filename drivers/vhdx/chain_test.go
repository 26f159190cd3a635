package vhdx

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"testing"

	"imgfuse/drivers"
	"imgfuse/drivers/driverstest"
)

// chain builds base <- mid <- top (1 MiB blocks; mid named by a relative
// Windows path, top by a plain one), one block of mid partly present, and
// returns top and the disk it must read as.
func chain(t *testing.T, dir string) (string, []byte) {
	base, baseRef := build(t, vhdxImage{"base", []string{"-o", "block_size=1M"}, "8M", []string{"write -P 0x10 0 8M"}}, dir)
	os.MkdirAll(filepath.Join(dir, "sub"), 0o755)
	mid, midRef := driverstest.QemuImage(t, "vhdx", filepath.Join(dir, "sub"), "mid.vhdx", []string{"-o", "block_size=1M,block_state_zero=off"}, "8M",
		"write -P 0x20 1M 2M", "write -P 0x21 6M 4k")
	top, topRef := build(t, vhdxImage{"top", []string{"-o", "block_size=1M,block_state_zero=off"}, "8M", []string{"write -P 0x30 2M 1M", "write -P 0x31 5M 512"}}, dir)
	makeDiff(t, mid, base, `..\base.vhdx`, guid{})
	makeDiff(t, top, mid, `sub/mid.vhdx`, guid{})
	makePartial(t, mid, 1, 100, 50) // sectors [1M+50K, 1M+75K) back to base
	want := bytes.Clone(baseRef)
	for blk := 0; blk < 8; blk++ {
		lo, hi := blk<<20, (blk+1)<<20
		switch {
		case blk == 2 || blk == 5: // top's blocks
			copy(want[lo:hi], topRef[lo:hi])
		case blk == 1:
			copy(want[lo:hi], midRef[lo:hi])
			copy(want[lo+100*512:lo+150*512], baseRef[lo+100*512:])
		case blk == 6:
			copy(want[lo:hi], midRef[lo:hi])
		}
	}
	return top, want
}

// TestDifferencing reads a three-image chain (relative Windows locator,
// a partly present block), writes through it (into new blocks, copying
// the parent; into the partly present block, made fully present) and
// reads back the model; qemu-img cannot open differencing VHDX, so the
// model is the oracle.
func TestDifferencing(t *testing.T) {
	dir := t.TempDir()
	top, want := chain(t, dir)
	driverstest.Run(t, func(t *testing.T) (drivers.Driver, []byte) {
		d, err := Open(top, drivers.OpenOptions{ReadOnly: true})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { d.Close() })
		if got := len(d.Files()); got != 3 {
			t.Errorf("Files() lists %d files, want 3", got)
		}
		return d, want
	})
	mid := filepath.Join(dir, "sub", "mid.vhdx")
	for _, path := range []string{top, mid} {
		path := path
		driverstest.RunWritable(t, func(t *testing.T) (drivers.Driver, []byte) {
			cdir := t.TempDir()
			for _, f := range []string{"base.vhdx", "top.vhdx", "sub/mid.vhdx"} {
				b, _ := os.ReadFile(filepath.Join(dir, f))
				os.MkdirAll(filepath.Dir(filepath.Join(cdir, f)), 0o755)
				os.WriteFile(filepath.Join(cdir, f), b, 0o644)
			}
			rel, _ := filepath.Rel(dir, path)
			p := filepath.Join(cdir, rel)
			d, err := Open(p, drivers.OpenOptions{ReadOnly: true})
			if err != nil {
				t.Fatal(err)
			}
			ref := make([]byte, d.Size())
			if _, err := driverstest.ReadAt(d, ref, 0); err != nil {
				t.Fatal(err)
			}
			d.Close()
			d, err = Open(p, drivers.OpenOptions{})
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { d.Close() })
			return d, ref
		})
	}
}

// TestParentRefusals: a loop in the chain, a parent whose DataWriteGuid
// is not the linkage, a missing parent.
func TestParentRefusals(t *testing.T) {
	dir := t.TempDir()
	opts := []string{"-o", "block_size=1M,block_state_zero=off"}
	a, _ := build(t, vhdxImage{"a", opts, "4M", []string{"write -P 1 0 1"}}, dir)
	b, _ := build(t, vhdxImage{"b", opts, "4M", []string{"write -P 2 0 1"}}, dir)
	makeDiff(t, a, b, "b.vhdx", guid{})
	makeDiff(t, b, a, "a.vhdx", guid{})
	if _, err := Open(a, drivers.OpenOptions{ReadOnly: true}); !errors.Is(err, drivers.ErrCorrupt) {
		t.Errorf("open of a looping chain: %v", err)
	}
	c, _ := build(t, vhdxImage{"c", opts, "4M", nil}, dir)
	e, _ := build(t, vhdxImage{"e", nil, "4M", nil}, dir)
	makeDiff(t, c, e, "e.vhdx", guid{1, 2, 3})
	if _, err := Open(c, drivers.OpenOptions{ReadOnly: true}); !errors.Is(err, drivers.ErrCorrupt) {
		t.Errorf("open with a parent of another DataWriteGuid: %v", err)
	}
	makeDiff(t, c, e, "e.vhdx", guid{})
	if d, err := Open(c, drivers.OpenOptions{ReadOnly: true}); err != nil {
		t.Errorf("open with the right linkage: %v", err)
	} else {
		d.Close()
	}
	os.Remove(e)
	if _, err := Open(c, drivers.OpenOptions{ReadOnly: true}); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("open with the parent missing: %v", err)
	}
}
