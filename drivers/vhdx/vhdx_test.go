package vhdx

import (
	"bytes"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"imgfuse/coroutine"
	"imgfuse/drivers"
	"imgfuse/drivers/driverstest"
)

type vhdxImage struct {
	name string
	opts []string
	size string
	io   []string
}

var fill = []string{"write -P 0xaa 0 4k", "write -P 0xbb 3M 1M", "write -z 5M 64k", "write -P 0xcc 7340000 70000", "write -P 0xdd 9M 64k", "discard 9M 4k"}

var images = []vhdxImage{
	{"dynamic", nil, "10M", fill},
	{"dynamic-1M", []string{"-o", "block_size=1M"}, "10M", fill},
	{"dynamic-32M", []string{"-o", "block_size=32M"}, "70M", append(fill, "write -P 0xee 40M 2M", "write -z 65M 1M")},
	{"dynamic-256M", []string{"-o", "block_size=256M"}, "10M", fill},
	{"fixed", []string{"-o", "subformat=fixed"}, "6M", []string{"write -P 0x11 100k 3000", "write -z 2M 1M", "write -P 0x22 4M 512"}},
	{"fixed-nozero", []string{"-o", "subformat=fixed,block_state_zero=off"}, "9M", []string{"write -P 0x11 100k 3000", "write -z 2M 1M", "write -P 0x22 8M 512"}},
	{"odd", []string{"-o", "block_size=1M"}, "5242887", []string{"write -P 0x33 0 512", "write -P 0x44 4M 1049088"}},
	{"nozero", []string{"-o", "block_state_zero=off,block_size=2M"}, "10M", fill},
}

func build(t *testing.T, img vhdxImage, dir string) (string, []byte) {
	t.Helper()
	return driverstest.QemuImage(t, "vhdx", dir, img.name+".vhdx", img.opts, img.size, img.io...)
}

func opener(img vhdxImage, opts drivers.OpenOptions) driverstest.OpenFunc {
	return func(t *testing.T) (drivers.Driver, []byte) {
		path, ref := build(t, img, t.TempDir())
		d, err := Open(path, opts)
		if err != nil {
			t.Fatalf("open %s: %v", path, err)
		}
		t.Cleanup(func() { d.Close() })
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

func inCo(f func(co *coroutine.Co) error) (err error) {
	coroutine.Run(func(co *coroutine.Co) { err = f(co) })
	return err
}

// qemuClean runs qemu-img check on path and compares it with model. -U:
// the image is closed, but a child process that parallel tests fork may
// still hold a reference to its descriptor, and so its lock, for the
// moment between its fork and its exec.
func qemuClean(t *testing.T, path string, model []byte) {
	t.Helper()
	if out, err := exec.Command("qemu-img", "check", "-U", "-f", "vhdx", path).CombinedOutput(); err != nil {
		t.Errorf("qemu-img check: %v\n%s", err, out)
	}
	raw := filepath.Join(t.TempDir(), "model.raw")
	if err := os.WriteFile(raw, model, 0o644); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("qemu-img", "compare", "-U", "-f", "vhdx", "-F", "raw", path, raw).CombinedOutput(); err != nil {
		t.Errorf("qemu-img compare: %v\n%s", err, out)
	}
}

// TestWritesAgainstQemu: after a concurrent workload (writes, zero writes
// over whole and partial blocks, discards) through the driver, qemu-img
// check finds the image clean and qemu-img compare equal to a raw model;
// the headers carry no log GUID after the flush.
func TestWritesAgainstQemu(t *testing.T) {
	for _, img := range images {
		t.Run(img.name, func(t *testing.T) {
			t.Parallel()
			path, ref := build(t, img, t.TempDir())
			d, err := Open(path, drivers.OpenOptions{})
			if err != nil {
				t.Fatal(err)
			}
			model := bytes.Clone(ref)
			driverstest.ConcurrentWrites(t, d, model, 12, 6)
			bs := d.blockSize
			size := d.Size()
			// A whole-block discard and zero write, and a partial one.
			if size > 2*bs {
				err = inCo(func(co *coroutine.Co) error {
					if err := d.Discard(co, 0, bs); err != nil {
						return err
					}
					if err := d.WriteZeroes(co, bs, bs+4096, false); err != nil {
						return err
					}
					return d.Flush(co)
				})
				if err != nil {
					t.Fatal(err)
				}
				clear(model[:2*bs+4096])
			}
			if !d.hdr.logGUID.zero() {
				t.Errorf("after a flush the header's log GUID is %s", d.hdr.logGUID)
			}
			d.Close()
			qemuClean(t, path, model)
		})
	}
}

// TestLogicalSector4096: an image whose metadata says 4096-byte logical
// sectors (QEMU cannot make or open one: its chunk ratio changes) reads
// and writes as a model says.
func TestLogicalSector4096(t *testing.T) {
	dir := t.TempDir()
	path, ref := build(t, vhdxImage{"lss", []string{"-o", "block_size=1M"}, "12M", fill}, dir)
	setItem(t, path, guidLogicalSS, le.AppendUint32(nil, 4096))
	driverstest.Run(t, func(t *testing.T) (drivers.Driver, []byte) {
		d, err := Open(path, drivers.OpenOptions{ReadOnly: true})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { d.Close() })
		if d.md.logicalSS != 4096 || d.cr != 32768 {
			t.Fatalf("logical sector %d, chunk ratio %d", d.md.logicalSS, d.cr)
		}
		return d, ref
	})
	driverstest.RunWritable(t, func(t *testing.T) (drivers.Driver, []byte) {
		p := filepath.Join(t.TempDir(), "w.vhdx")
		b, _ := os.ReadFile(path)
		os.WriteFile(p, b, 0o644)
		d, err := Open(p, drivers.OpenOptions{})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { d.Close() })
		return d, ref
	})
}

// TestCacheBounded: a BAT larger than --cache-size is read through a
// cache of that size (at least 4 sectors), never whole, and still maps
// every block right.
func TestCacheBounded(t *testing.T) {
	driverstest.RequireTools(t, "qemu-img", "qemu-io")
	path := filepath.Join(t.TempDir(), "big.vhdx")
	driverstest.Cmd(t, "qemu-img", "create", "-q", "-f", "vhdx", "-o", "block_size=1M", path, "6G")
	offs := []int64{0, 1 << 30, 2<<30 + 5<<20, 3<<30 + 12345, 4 << 30, 6<<30 - 4096}
	var cmds []string
	for i, off := range offs {
		cmds = append(cmds, fmt.Sprintf("write -P %d %d 4096", i+1, off))
	}
	driverstest.QemuIOFormat(t, "vhdx", path, cmds...)
	d, err := Open(path, drivers.OpenOptions{ReadOnly: true, CacheSize: 1})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	if sectors := (d.entries*8 + sectorSize - 1) / sectorSize; sectors <= 4 {
		t.Fatalf("the BAT has only %d sectors: the test needs more than the cache holds", sectors)
	}
	for round := 0; round < 2; round++ {
		for i, off := range offs {
			p := make([]byte, 4096)
			if _, err := driverstest.ReadAt(d, p, off); err != nil || !bytes.Equal(p, bytes.Repeat([]byte{byte(i + 1)}, 4096)) {
				t.Fatalf("read at %#x: %v, %x...", off, err, p[:8])
			}
		}
	}
	if n, a := d.bat.Tables(), d.bat.Allocated(); n > 4 || a > 4*sectorSize {
		t.Errorf("the BAT cache has %d slots and %d bytes with --cache-size 1 (at most 4 sectors)", n, a)
	}
}
