package vdi_test

import (
	"bytes"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"imgfuse/coroutine"
	"imgfuse/drivers"
	"imgfuse/drivers/driverstest"
	"imgfuse/drivers/vdi"
)

// vdiImage is a qemu-img made VDI image: its create options, size and the
// qemu-io commands that fill it (data, written zeros, and blocks left
// unallocated).
type vdiImage struct {
	name string
	opts []string
	size string
	io   []string
}

var images = []vdiImage{
	{"dynamic", nil, "12M", []string{"write -P 0xaa 0 4k", "write -P 0xbb 3M 1M", "write -z 5M 64k", "write -P 0xcc 7340000 70000", "write -P 0xdd 11M 1M"}},
	{"static", []string{"-o", "static=on"}, "6M", []string{"write -P 0x11 100k 3000", "write -z 2M 1M", "write -P 0x22 5242368 512"}},
	{"odd", nil, "5242887", []string{"write -P 0x33 0 512", "write -P 0x44 4M 1049088"}}, // rounded up to 5243392
	{"empty", nil, "3M", nil},
}

// build makes img in a new directory and returns its path and the raw
// reference qemu-img converts it to.
func build(t *testing.T, img vdiImage) (string, []byte) {
	t.Helper()
	return driverstest.QemuImage(t, "vdi", t.TempDir(), img.name+".vdi", img.opts, img.size, img.io...)
}

func opener(img vdiImage, opts drivers.OpenOptions) driverstest.OpenFunc {
	return func(t *testing.T) (drivers.Driver, []byte) {
		path, ref := build(t, img)
		d, err := vdi.Open(path, opts)
		if err != nil {
			t.Fatalf("open %s: %v", path, err)
		}
		return d, ref
	}
}

// TestConformance runs the driver suite on each image, read-only and
// writable, with and without O_DIRECT: every read equals qemu-img
// convert's output, writes read back as a model says.
func TestConformance(t *testing.T) {
	var names []string
	for _, img := range images {
		names = append(names, img.name)
	}
	driverstest.RunConformance(t, names, 1, func(i int, opts drivers.OpenOptions) driverstest.OpenFunc {
		return opener(images[i], opts)
	})
}

func run(f func(co *coroutine.Co) error) (err error) {
	coroutine.Run(func(co *coroutine.Co) { err = f(co) })
	return err
}

// TestWritesAgainstQemu writes a random workload through the driver,
// concurrently, then hands the image to QEMU: qemu-img check finds no
// error, and qemu-img compare finds it equal to a raw model written in
// lockstep.
func TestWritesAgainstQemu(t *testing.T) {
	for _, img := range images[:3] {
		t.Run(img.name, func(t *testing.T) {
			t.Parallel()
			path, ref := build(t, img)
			d, err := vdi.Open(path, drivers.OpenOptions{})
			if err != nil {
				t.Fatal(err)
			}
			model := bytes.Clone(ref)
			driverstest.ConcurrentWrites(t, d, model, 20, 8)
			d.Close()
			raw := filepath.Join(t.TempDir(), "model.raw")
			if err := os.WriteFile(raw, model, 0o644); err != nil {
				t.Fatal(err)
			}
			driverstest.Cmd(t, "qemu-img", "check", "-f", "vdi", path)
			driverstest.Cmd(t, "qemu-img", "compare", "-f", "vdi", "-F", "raw", path, raw)
		})
	}
}

// TestAllocationOrder: a new block goes at the header's count, written
// whole, as QEMU places it (verified: writing 5 MiB then 0 puts block 5 at
// index 0 and block 0 at index 1), and the count follows.
func TestAllocationOrder(t *testing.T) {
	path, _ := build(t, vdiImage{"order", nil, "8M", nil})
	d, err := vdi.Open(path, drivers.OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	for _, off := range []int64{5 << 20, 0} {
		if _, err := driverstest.WriteAt(d, []byte("x"), off+7); err != nil {
			t.Fatal(err)
		}
	}
	d.Close()
	b, _ := os.ReadFile(path)
	le := func(o int) uint32 { return uint32(b[o]) | uint32(b[o+1])<<8 | uint32(b[o+2])<<16 | uint32(b[o+3])<<24 }
	if le(512+5*4) != 0 || le(512) != 1 || le(512+4) != 0xffffffff || le(0x184) != 2 {
		t.Errorf("map %x %x %x, count %d; want block 5 at index 0, block 0 at index 1, count 2",
			le(512+20), le(512), le(516), le(0x184))
	}
	if len(b) != 1024+2<<20 {
		t.Errorf("file is %d bytes, want two whole blocks after the map", len(b))
	}
}

// TestCountRepair: a crash between a map entry and the count leaves the
// count behind; qemu-img check reports it, and a writable open brings the
// count up to date (a read-only open leaves the file alone).
func TestCountRepair(t *testing.T) {
	path, ref := build(t, vdiImage{"count", nil, "4M", []string{"write -P 0x5a 1M 1M", "write -P 0x6b 0 1"}})
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt([]byte{1}, 0x184); err != nil {
		t.Fatal(err)
	}
	f.Close()
	out, err := exec.Command("qemu-img", "check", "-f", "vdi", path).CombinedOutput()
	if err == nil || !strings.Contains(string(out), "allocated blocks mismatch") {
		t.Fatalf("qemu-img check of a count one behind: %v\n%s", err, out)
	}
	d, err := vdi.Open(path, drivers.OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	res, err := d.Check(drivers.CheckOnly, nil)
	if err != nil || res.Corruptions != 1 {
		t.Errorf("Check: %+v, %v; want one corruption", res, err)
	}
	d.Close()
	d, err = vdi.Open(path, drivers.OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	// A new block must not reuse index 1.
	if _, err := driverstest.WriteAt(d, []byte{0x7c}, 3<<20); err != nil {
		t.Fatal(err)
	}
	d.Close()
	driverstest.Cmd(t, "qemu-img", "check", "-f", "vdi", path)
	got, _ := os.ReadFile(driverstest.ConvertRefFormat(t, "vdi", path, "", t.TempDir()))
	ref[3<<20] = 0x7c
	if !bytes.Equal(got, ref) {
		t.Error("after the repair and a write, the disk differs from the model")
	}
}

// TestCheckFindsDamage: duplicate and out-of-range indexes are
// corruptions, as qemu-img check counts them; repair is refused.
func TestCheckFindsDamage(t *testing.T) {
	path, _ := build(t, vdiImage{"dmg", nil, "4M", []string{"write -P 1 0 1", "write -P 2 1M 1"}})
	f, _ := os.OpenFile(path, os.O_RDWR, 0)
	f.WriteAt([]byte{0, 0, 0, 0}, 512+4)   // block 1 -> index 0, as block 0
	f.WriteAt([]byte{9, 0, 0, 0}, 512+2*4) // block 2 -> index 9 of 4
	f.Close()
	if _, err := vdi.Open(path, drivers.OpenOptions{}); !errors.Is(err, drivers.ErrCorrupt) {
		t.Errorf("writable open of a map past its blocks: %v", err)
	}
	d, err := vdi.Open(path, drivers.OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	if !errors.Is(d.Damage(), drivers.ErrCorrupt) {
		t.Errorf("Damage() = %v", d.Damage())
	}
	res, err := d.Check(drivers.CheckOnly, nil)
	// The duplicate counts as allocated, as in QEMU: the count matches.
	if err != nil || res.Corruptions != 2 {
		t.Errorf("Check: %+v, %v; want 2 corruptions (duplicate, too large)", res, err)
	}
	if _, err := driverstest.ReadAt(d, make([]byte, 10), 2<<20); !errors.Is(err, drivers.ErrCorrupt) {
		t.Errorf("read of a block past the image's blocks: %v", err)
	}
	if _, err := d.Check(drivers.RepairAll, nil); !errors.Is(err, drivers.ErrUnsupported) {
		t.Errorf("repair: %v", err)
	}
	out, _ := exec.Command("qemu-img", "check", "-f", "vdi", path).CombinedOutput()
	if n := strings.Count(string(out), "ERROR"); n != 2 {
		t.Errorf("qemu-img check finds %d errors, the driver 2:\n%s", n, out)
	}
}

// TestProbe: the signature decides, little-endian at 0x40.
func TestProbe(t *testing.T) {
	h := make([]byte, 512)
	copy(h[0x40:], "\x7f\x10\xda\xbe")
	for _, tt := range []struct {
		head []byte
		want int
	}{{h, 100}, {h[:0x44], 100}, {h[:0x43], 0}, {make([]byte, 512), 0}} {
		if got := (vdi.Format{}).Probe(drivers.ProbeInput{Head: tt.head}); got != tt.want {
			t.Errorf("Probe(%d bytes) = %d, want %d", len(tt.head), got, tt.want)
		}
	}
}
