package qcow2

import (
	"bytes"
	"encoding/binary"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"imgfuse/coroutine"
	"imgfuse/drivers"
	"imgfuse/drivers/driverstest"
)

// TestOpenBounds opens images whose metadata points past the end of the
// file: a writable open is refused with ErrCorrupt naming the problem, and
// the file is left as it was; a read-only open succeeds, reports the same
// problem through Damage, and serves the undamaged range with the right
// bytes while the damaged one fails with ErrCorrupt.
func TestOpenBounds(t *testing.T) {
	hb0 := buildHostileBase(t)
	// The base: header, reftable at 0x10000, refblock at 0x20000, L1 at
	// 0x30000, the one L2 table at 0x40000, data from 0x50000.
	if hb0.rt != 0x10000 || hb0.l1 != 0x30000 || hb0.l2 != 0x40000 {
		t.Fatalf("base layout changed: reftable %#x, L1 %#x, L2 %#x", hb0.rt, hb0.l1, hb0.l2)
	}
	all := [2]int64{0, 4 << 20}
	cases := []struct {
		name   string
		mutate func(b []byte) []byte
		msg    string   // in the error and in Damage
		bad    [2]int64 // guest range whose reads may fail; the rest must read right
	}{
		{"truncated in the data", func(b []byte) []byte { return b[:0x50000+0x8000] }, "", [2]int64{}},
		{"truncated in the L2 table", func(b []byte) []byte { return b[:0x48000] },
			"L1 entry 0: L2 table offset 0x40000 runs past the end of the file", all},
		{"truncated before the L2 table", func(b []byte) []byte { return b[:0x30010] },
			"L1 entry 0: L2 table offset 0x40000 is past the end of the file (196624 bytes)", all},
		{"truncated in the L1 table", func(b []byte) []byte { return b[:0x30004] },
			"L1 table at 0x30000 (8 bytes) runs past the end of the file (196612 bytes)", all},
		{"L1 table past EOF", func(b []byte) []byte { put64(b, 40, 1<<30); return b },
			"L1 table at 0x40000000", all},
		{"L1 entry past EOF", func(b []byte) []byte { put64(b, 0x30000, oflagCopied|1<<30); return b },
			"L1 entry 0: L2 table offset 0x40000000 is past the end", all},
		{"refcount table past EOF", func(b []byte) []byte { put64(b, 48, 1<<30); return b },
			"refcount table at 0x40000000 (65536 bytes) runs past the end", [2]int64{}},
		{"refcount table entry past EOF", func(b []byte) []byte { put64(b, 0x10000+8, 1<<30); return b },
			"refcount table entry 1: refcount block at 0x40000000 is past the end", [2]int64{}},
		{"snapshot table past EOF", func(b []byte) []byte { put32(b, 60, 3); put64(b, 64, 1<<30); return b },
			"snapshot table at 0x40000000 (", [2]int64{}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			dir := t.TempDir()
			img := filepath.Join(dir, "img.qcow2")
			b := c.mutate(bytes.Clone(hb0.b))
			if err := os.WriteFile(img, b, 0o644); err != nil {
				t.Fatal(err)
			}
			// Writable: refused, or (an intact image) opened.
			d, err := Format{}.Open(img, drivers.OpenOptions{})
			if c.msg == "" {
				if err != nil {
					t.Fatalf("writable open of an image whose metadata is inside the file: %v", err)
				}
				if dmg := drivers.DamageOf(d); dmg != nil {
					t.Errorf("Damage of an intact image: %v", dmg)
				}
				d.Close()
			} else {
				if err == nil {
					d.Close()
					t.Fatalf("writable open succeeded; want an error naming %q", c.msg)
				}
				if !errors.Is(err, drivers.ErrCorrupt) || !strings.Contains(err.Error(), c.msg) || strings.Contains(err.Error(), "\n") {
					t.Errorf("writable open: %v; want one line wrapping ErrCorrupt naming %q", err, c.msg)
				}
				if got, _ := os.ReadFile(img); !bytes.Equal(got, b) {
					t.Error("a refused writable open changed the file")
				}
			}

			// Read-only: opened, the problem reported, reads right.
			d, err = Format{}.Open(img, drivers.OpenOptions{ReadOnly: true})
			if err != nil {
				t.Fatalf("read-only open: %v", err)
			}
			defer d.Close()
			dmg := drivers.DamageOf(d)
			switch {
			case c.msg == "" && dmg != nil:
				t.Errorf("Damage: %v, want nil", dmg)
			case c.msg != "" && (dmg == nil || !errors.Is(dmg, drivers.ErrCorrupt) || !strings.Contains(dmg.Error(), c.msg)):
				t.Errorf("Damage: %v; want an ErrCorrupt naming %q", dmg, c.msg)
			}
			want := hb0.want
			if c.name == "truncated in the data" {
				// The cut data cluster's tail fails or reads as the
				// file's end; the guest offsets past it are checked.
				want = nil
			}
			const chunk = 64 << 10
			buf := make([]byte, chunk)
			coroutine.Run(func(co *coroutine.Co) {
				for off := int64(0); off < d.Size(); off += chunk {
					inBad := off < c.bad[1] && off+chunk > c.bad[0]
					_, err := d.ReadAt(co, buf, off)
					switch {
					case err != nil && !(inBad && errors.Is(err, drivers.ErrCorrupt)) && want != nil:
						t.Errorf("read at %#x: %v", off, err)
					case err == nil && want != nil && !bytes.Equal(buf, want[off:off+chunk]):
						t.Errorf("read at %#x: wrong bytes", off)
					}
				}
			})
			if strings.HasPrefix(c.msg, "L1 table") {
				// A check would read the missing entries as zeros:
				// it is refused rather than calling the image clean
				// or merely leaky.
				res, err := d.(drivers.Checker).Check(drivers.CheckOnly, nil)
				if err == nil || res.CheckErrors == 0 || !strings.Contains(err.Error(), c.msg) {
					t.Errorf("check of an image whose L1 table is cut: %+v, %v", res, err)
				}
			}
			if c.msg != "" && c.bad == all {
				// The damaged range really fails: nothing is silently
				// read as zeros.
				coroutine.Run(func(co *coroutine.Co) {
					if _, err := d.ReadAt(co, buf, 0); !errors.Is(err, drivers.ErrCorrupt) {
						t.Errorf("read of the damaged range: %v, want ErrCorrupt", err)
					}
				})
			}
		})
	}
}

// TestOpenBoundsSnapshotL1 points a snapshot's L1 table past the end of
// the file: the active disk is intact, yet a writable open is refused
// (a write could free or reuse clusters the snapshot names) and a
// read-only one reports it.
func TestOpenBoundsSnapshotL1(t *testing.T) {
	driverstest.RequireTools(t, "qemu-img", "qemu-io")
	img := filepath.Join(t.TempDir(), "snap.qcow2")
	driverstest.Cmd(t, "qemu-img", "create", "-q", "-f", "qcow2", img, "4M")
	driverstest.QemuIO(t, img, "write -P 0x11 0 64k")
	driverstest.Cmd(t, "qemu-img", "snapshot", "-c", "s1", img)
	b, err := os.ReadFile(img)
	if err != nil {
		t.Fatal(err)
	}
	snapOff := binary.BigEndian.Uint64(b[64:])
	put64(b, int64(snapOff), 1<<30) // the first entry's L1 table offset
	if err := os.WriteFile(img, b, 0o644); err != nil {
		t.Fatal(err)
	}
	const msg = `snapshot "1" L1 table at 0x40000000 (8 bytes) runs past the end of the file`
	if d, err := (Format{}).Open(img, drivers.OpenOptions{}); err == nil {
		d.Close()
		t.Fatal("writable open succeeded")
	} else if !errors.Is(err, drivers.ErrCorrupt) || !strings.Contains(err.Error(), msg) {
		t.Errorf("writable open: %v; want ErrCorrupt naming %q", err, msg)
	}
	d, err := Format{}.Open(img, drivers.OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	if dmg := drivers.DamageOf(d); dmg == nil || !strings.Contains(dmg.Error(), msg) {
		t.Errorf("Damage: %v; want %q", dmg, msg)
	}
}

// TestOpenBoundsBackingAndFiles opens a writable overlay whose backing
// file is truncated: the overlay's writes never touch the backing file,
// so the open succeeds and Damage reports the backing file's problem.
// Files lists the image, its data file and the backing chain with their
// roles.
func TestOpenBoundsBackingAndFiles(t *testing.T) {
	driverstest.RequireTools(t, "qemu-img", "qemu-io")
	dir := t.TempDir()
	base := filepath.Join(dir, "base.qcow2")
	driverstest.Cmd(t, "qemu-img", "create", "-q", "-f", "qcow2", base, "4M")
	driverstest.QemuIO(t, base, "write -P 0x11 0 64k")
	if err := os.Truncate(base, 0x30010); err != nil { // the L2 table at 0x40000 is gone
		t.Fatal(err)
	}
	top := filepath.Join(dir, "top.qcow2")
	driverstest.Cmd(t, "qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", "base.qcow2", "-F", "qcow2",
		"-o", "data_file="+filepath.Join(dir, "top.data"), top, "4M") // absolute: qemu-img would create a relative one in its working directory

	d, err := Format{}.Open(top, drivers.OpenOptions{})
	if err != nil {
		t.Fatalf("writable open of an overlay over a damaged backing file: %v", err)
	}
	defer d.Close()
	dmg := drivers.DamageOf(d)
	if dmg == nil || !errors.Is(dmg, drivers.ErrCorrupt) || !strings.Contains(dmg.Error(), base+": L1 entry 0") {
		t.Errorf("Damage: %v; want the backing file's L1 entry 0", dmg)
	}
	// The damaged file is named for the user's next step (imgfuse check).
	var de *drivers.DamageError
	if !errors.As(dmg, &de) || de.Path != base {
		t.Errorf("Damage %v names file %+v, want %s", dmg, de, base)
	}
	got := drivers.FilesOf(d)
	want := []drivers.ChainFile{
		{Path: top, Role: "image"},
		{Path: filepath.Join(dir, "top.data"), Role: "external data file", Of: top},
		{Path: base, Role: "backing file", Of: top},
	}
	if len(got) != len(want) {
		t.Fatalf("Files: %+v, want %+v", got, want)
	}
	for i := range want {
		if got[i] != want[i] {
			t.Errorf("Files[%d] = %+v, want %+v", i, got[i], want[i])
		}
	}
}
