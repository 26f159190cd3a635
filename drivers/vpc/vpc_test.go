package vpc_test

import (
	"bytes"
	"encoding/binary"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"unicode/utf16"

	"imgfuse/coroutine"
	"imgfuse/drivers"
	"imgfuse/drivers/driverstest"
	"imgfuse/drivers/vpc"
)

type vhdImage struct {
	name string
	opts []string
	size string
	io   []string
}

var images = []vhdImage{
	{"dynamic", nil, "10M", []string{"write -P 0xaa 0 4k", "write -P 0xbb 3M 1M", "write -z 5M 64k", "write -P 0xcc 7340000 70000"}},
	{"fixed", []string{"-o", "subformat=fixed"}, "6M", []string{"write -P 0x11 100k 3000", "write -z 2M 1M", "write -P 0x22 4M 512"}},
	{"odd", nil, "5242887", []string{"write -P 0x33 0 512", "write -P 0x44 4M 1049088"}}, // CHS rounds it up
	{"force-size", []string{"-o", "force_size=on"}, "5242880", []string{"write -P 0x55 2M 3M"}},
	{"fixed-force-size", []string{"-o", "subformat=fixed,force_size=on"}, "3M", []string{"write -P 0x66 1M 1M"}},
}

func build(t *testing.T, img vhdImage, dir string) (string, []byte) {
	t.Helper()
	return driverstest.QemuImage(t, "vpc", dir, img.name+".vhd", img.opts, img.size, img.io...)
}

func opener(img vhdImage, opts drivers.OpenOptions) driverstest.OpenFunc {
	return func(t *testing.T) (drivers.Driver, []byte) {
		path, ref := build(t, img, t.TempDir())
		d, err := vpc.Open(path, opts)
		if err != nil {
			t.Fatalf("open %s: %v", path, err)
		}
		return d, ref
	}
}

// TestConformance: every image reads as qemu-img convert says, read-only
// and writable; writes read back as a model says.
func TestConformance(t *testing.T) {
	var names []string
	for _, img := range images {
		names = append(names, img.name)
	}
	driverstest.RunConformance(t, names, 2, func(i int, opts drivers.OpenOptions) driverstest.OpenFunc {
		return opener(images[i], opts)
	})
}

func run(f func(co *coroutine.Co) error) (err error) {
	coroutine.Run(func(co *coroutine.Co) { err = f(co) })
	return err
}

// TestWritesAgainstQemu: after a concurrent workload through the driver,
// qemu-img compare finds the image equal to a raw model (qemu-img has no
// check for vpc).
func TestWritesAgainstQemu(t *testing.T) {
	for _, img := range images {
		t.Run(img.name, func(t *testing.T) {
			t.Parallel()
			path, ref := build(t, img, t.TempDir())
			d, err := vpc.Open(path, drivers.OpenOptions{})
			if err != nil {
				t.Fatal(err)
			}
			model := bytes.Clone(ref)
			driverstest.ConcurrentWrites(t, d, model, 15, 6)
			d.Close()
			raw := filepath.Join(t.TempDir(), "model.raw")
			if err := os.WriteFile(raw, model, 0o644); err != nil {
				t.Fatal(err)
			}
			driverstest.Cmd(t, "qemu-img", "compare", "-q", "-f", "vpc", "-F", "raw", path, raw)
		})
	}
}

// footerAt returns the file's footer copy at off, for patching.
func patchFooter(t *testing.T, b []byte, off int, typ uint32) {
	t.Helper()
	f := b[off : off+512]
	binary.BigEndian.PutUint32(f[60:], typ)
	binary.BigEndian.PutUint32(f[64:], 0)
	var s uint32
	for _, c := range f {
		s += uint32(c)
	}
	binary.BigEndian.PutUint32(f[64:], ^s)
}

// makeDiff turns the dynamic VHD child into a differencing image of
// parent: disk type 4 in both footers, the parent's unique id and name
// in the dynamic header, and, if locator is set, a W2ru locator (its
// data in a sector added before the final footer) naming the parent by
// that relative Windows path while the header's name misleads.
func makeDiff(t *testing.T, child, parent, locator string) {
	t.Helper()
	b, err := os.ReadFile(child)
	if err != nil {
		t.Fatal(err)
	}
	pb, err := os.ReadFile(parent)
	if err != nil {
		t.Fatal(err)
	}
	pf := pb[:512]
	if string(pf[:8]) != "conectix" {
		pf = pb[len(pb)-512:]
	}
	name := filepath.Base(parent)
	h := b[512:1536]
	if locator != "" {
		name = "C:\\nowhere\\wrong.vhd"
		data := make([]byte, 512)
		for i, c := range utf16.Encode([]rune(locator)) {
			binary.LittleEndian.PutUint16(data[2*i:], c)
		}
		foot := bytes.Clone(b[len(b)-512:])
		locOff := len(b) - 512
		b = append(append(b[:locOff:locOff], data...), foot...)
		h = b[512:1536]
		e := h[576:]
		copy(e, "W2ru")
		binary.BigEndian.PutUint32(e[4:], 512)
		binary.BigEndian.PutUint32(e[8:], uint32(2*len(utf16.Encode([]rune(locator)))))
		binary.BigEndian.PutUint64(e[16:], uint64(locOff))
	}
	copy(h[40:56], pf[68:84])
	clear(h[64:576])
	for i, c := range utf16.Encode([]rune(name)) {
		binary.BigEndian.PutUint16(h[64+2*i:], c)
	}
	patchFooter(t, b, 0, 4)
	patchFooter(t, b, len(b)-512, 4)
	if err := os.WriteFile(child, b, 0o644); err != nil {
		t.Fatal(err)
	}
}

// clearBits clears bitmap bits [k, k+n) of the child's block blk, so
// those sectors fall through to the parent.
func clearBits(t *testing.T, path string, blk int, k, n int) {
	b, _ := os.ReadFile(path)
	bat := binary.BigEndian.Uint64(b[512+16:])
	e := binary.BigEndian.Uint32(b[int(bat)+4*blk:])
	for i := k; i < k+n; i++ {
		b[int(e)*512+i/8] &^= 0x80 >> (i % 8)
	}
	os.WriteFile(path, b, 0o644)
}

// chain builds base <- mid <- top (mid named by a W2ru locator with a
// Windows path, top by the parent name), some sectors of allocated blocks
// left to the parent, and returns top and the disk it must read as.
func chain(t *testing.T, dir string) (string, []byte) {
	base, baseRef := build(t, vhdImage{"base", nil, "8M", []string{"write -P 0x10 0 8M"}}, dir)
	mid, midRef := build(t, vhdImage{"mid", nil, "8M", []string{"write -P 0x20 1M 2M", "write -P 0x21 6M 4k"}}, dir)
	top, topRef := build(t, vhdImage{"top", nil, "8M", []string{"write -P 0x30 2M 1M", "write -P 0x31 5M 512"}}, dir)
	makeDiff(t, mid, base, `.\base.vhd`)
	makeDiff(t, top, mid, "")
	// mid allocates blocks 0, 1 (the 2 MiB blocks its write touched) and
	// 3; top blocks 1 and 2. A block QEMU allocates has every bit set.
	clearBits(t, mid, 0, 2048, 100) // sectors of [1M, 1M+50K) back to base
	clearBits(t, top, 1, 10, 3)
	want := bytes.Clone(baseRef)
	size := len(want)
	midAlloc := func(off int) bool { return off < 4<<20 || off >= 6<<20 }
	topAlloc := func(off int) bool { return off >= 2<<20 && off < 6<<20 }
	for off := 0; off < size; off += 512 {
		if midAlloc(off) && !(off >= 1<<20 && off < 1<<20+100*512) {
			copy(want[off:off+512], midRef[off:])
		}
		if topAlloc(off) && !(off >= 2<<20+10*512 && off < 2<<20+13*512) {
			copy(want[off:off+512], topRef[off:])
		}
	}
	return top, want
}

// TestDifferencing reads a three-image chain (locator and parent-name
// resolution, partial bitmaps), writes through it (merging partial
// sectors, copying the parent into new blocks) and reads back the model.
func TestDifferencing(t *testing.T) {
	dir := t.TempDir()
	top, want := chain(t, dir)
	d, err := vpc.Open(top, drivers.OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	if got := len(d.Files()); got != 3 {
		t.Errorf("Files() lists %d files, want 3", got)
	}
	got := make([]byte, len(want))
	if _, err := driverstest.ReadAt(d, got, 0); err != nil || !bytes.Equal(got, want) {
		t.Fatalf("chain reads differ from the model (err %v)", err)
	}
	d.Close()
	driverstest.Run(t, func(t *testing.T) (drivers.Driver, []byte) {
		d, err := vpc.Open(top, drivers.OpenOptions{ReadOnly: true})
		if err != nil {
			t.Fatal(err)
		}
		return d, want
	})

	d, err = vpc.Open(top, drivers.OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	model := bytes.Clone(want)
	// Into the bits cleared above, partly; into a new block.
	for _, w := range []struct{ off, n int64 }{{2<<20 + 10*512 + 100, 700}, {7 << 20, 3000}, {2<<20 + 12*512, 512}} {
		p := bytes.Repeat([]byte{0xee}, int(w.n))
		copy(model[w.off:], p)
		if _, err := driverstest.WriteAt(d, p, w.off); err != nil {
			t.Fatal(err)
		}
	}
	driverstest.ConcurrentWrites(t, d, model, 8, 6)
	d.Close()
	d, err = vpc.Open(top, drivers.OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	if _, err := driverstest.ReadAt(d, got, 0); err != nil || !bytes.Equal(got, model) {
		t.Fatalf("after writes the chain differs from the model (err %v)", err)
	}
}

// TestParentRefusals: a loop in the chain, a parent with another unique
// id, a missing parent.
func TestParentRefusals(t *testing.T) {
	dir := t.TempDir()
	a, _ := build(t, vhdImage{"a", nil, "4M", []string{"write -P 1 0 1"}}, dir)
	b, _ := build(t, vhdImage{"b", nil, "4M", []string{"write -P 2 0 1"}}, dir)
	makeDiff(t, a, b, "")
	makeDiff(t, b, a, "")
	// Each names the other by the id it had before: fix the ids up so
	// only the loop is wrong.
	makeDiff(t, a, b, "")
	if _, err := vpc.Open(a, drivers.OpenOptions{ReadOnly: true}); !errors.Is(err, drivers.ErrCorrupt) {
		t.Errorf("open of a looping chain: %v", err)
	}
	c, _ := build(t, vhdImage{"c", nil, "4M", nil}, dir)
	e, _ := build(t, vhdImage{"e", nil, "4M", nil}, dir)
	makeDiff(t, c, e, "")
	os.Remove(e)
	if _, err := vpc.Open(c, drivers.OpenOptions{ReadOnly: true}); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("open with the parent missing: %v", err)
	}
	build(t, vhdImage{"e", nil, "4M", nil}, dir) // a new image: another unique id
	if _, err := vpc.Open(c, drivers.OpenOptions{ReadOnly: true}); !errors.Is(err, drivers.ErrCorrupt) {
		t.Errorf("open with a parent of another id: %v", err)
	}
}

// TestSize: the size rule (CHS for "qemu", current_size for force_size's
// "qem2") gives the size qemu-img gives.
func TestSize(t *testing.T) {
	for _, img := range images {
		path, ref := build(t, img, t.TempDir())
		d, err := vpc.Open(path, drivers.OpenOptions{ReadOnly: true})
		if err != nil {
			t.Fatal(err)
		}
		if d.Size() != int64(len(ref)) {
			t.Errorf("%s: size %d, qemu-img %d", img.name, d.Size(), len(ref))
		}
		d.Close()
	}
}

func runQemuImg(args ...string) error {
	return exec.Command("qemu-img", args...).Run()
}
