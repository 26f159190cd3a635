package vhdx

import (
	"bytes"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"imgfuse/drivers"
	"imgfuse/drivers/driverstest"
)

// dirtyImage makes a qemu-img image (1 MiB blocks) and plants a log entry
// that QEMU would replay: the BAT sector with block 5 made fully present
// at the old end of the file, a data sector as its last 4 KiB, zeros
// over the second 4 KiB of block 0's data, and LastFileOffset past the new
// block. It returns the path, the disk the replayed image reads as, and
// the log entry's target of the BAT sector.
func dirtyImage(t *testing.T, dir string) (string, []byte) {
	t.Helper()
	path, ref := build(t, vhdxImage{"dirty", []string{"-o", "block_size=1M"}, "8M", []string{"write -P 0xaa 0 64k", "write -P 0xbb 3M 4k"}}, dir)
	l := readLayout(t, path)
	end := (int64(len(l.b)) + mib - 1) / mib * mib
	sec := aio4k(l.b[l.rg.bat.off:])
	le.PutUint64(sec[8*5:], uint64(end)|stateFull)
	data := bytes.Repeat([]byte{0x77}, sectorSize)
	copy(data, "LEAD-8BY")
	copy(data[4092:], "TAIL")
	blk0 := int64(le.Uint64(l.bat(0)) & offMask)
	writeLog(t, path, []sectorWrite{{l.rg.bat.off, sec}, {end + mib - sectorSize, data}}, []region{{blk0 + sectorSize, sectorSize}}, end+mib)
	want := bytes.Clone(ref)
	copy(want[6<<20-sectorSize:], data)
	clear(want[sectorSize : 2*sectorSize])
	return path, want
}

func aio4k(b []byte) []byte { return bytes.Clone(b[:sectorSize]) }

func copyFile(t *testing.T, src, dst string) {
	t.Helper()
	b, err := os.ReadFile(src)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(dst, b, 0o644); err != nil {
		t.Fatal(err)
	}
}

// TestDirtyLog: a read-only open of an image with a dirty log reads the
// replayed disk without changing the file (QEMU refuses it); QEMU's own
// replay (qemu-img check -r all) gives the same disk; a writable open
// replays into the file, after which the header has no log GUID and
// qemu-img check is clean.
func TestDirtyLog(t *testing.T) {
	dir := t.TempDir()
	path, want := dirtyImage(t, dir)
	before, _ := os.ReadFile(path)

	driverstest.Run(t, func(t *testing.T) (drivers.Driver, []byte) {
		d, err := Open(path, drivers.OpenOptions{ReadOnly: true})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { d.Close() })
		if d.overlay == nil {
			t.Fatal("no overlay for a dirty log")
		}
		return d, want
	})
	if after, _ := os.ReadFile(path); !bytes.Equal(before, after) {
		t.Error("a read-only open changed the file")
	}
	d, err := Open(path, drivers.OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := d.Check(drivers.CheckOnly, nil); !errors.Is(err, drivers.ErrCorrupt) {
		t.Errorf("read-only check of a dirty image: %v, want the log named (as qemu-img check fails)", err)
	}
	d.Close()

	// QEMU replays our entry into what we read.
	q := filepath.Join(dir, "qemu.vhdx")
	copyFile(t, path, q)
	if out, err := exec.Command("qemu-img", "check", "-r", "all", "-f", "vhdx", q).CombinedOutput(); err != nil {
		t.Fatalf("qemu-img check -r all: %v\n%s", err, out)
	}
	qemuClean(t, q, want)

	w := filepath.Join(dir, "w.vhdx")
	copyFile(t, path, w)
	d, err = Open(w, drivers.OpenOptions{Repair: true})
	if err != nil {
		t.Fatal(err)
	}
	if !d.hdr.logGUID.zero() {
		t.Error("the log GUID is still set after the replay")
	}
	res, err := d.Check(drivers.RepairAll, nil)
	if err != nil || res.CorruptionsFixed != 1 || res.Corruptions != 0 {
		t.Errorf("check after the replay: %+v, %v (want 1 corruption fixed, as qemu-img check -r all)", res, err)
	}
	d.Close()
	qemuClean(t, w, want)
}

// TestHostileLog: a log entry with a bad CRC is no entry (the image reads
// as before it); one whose FlushedFileOffset lies past the end, or that
// writes over the headers, is refused.
func TestHostileLog(t *testing.T) {
	dir := t.TempDir()
	path, ref := build(t, vhdxImage{"h", []string{"-o", "block_size=1M"}, "4M", []string{"write -P 0xaa 0 64k"}}, dir)
	data := bytes.Repeat([]byte{0x55}, sectorSize)
	l := readLayout(t, path)
	blk0 := int64(le.Uint64(l.bat(0)) & offMask)
	cases := []struct {
		name  string
		patch func(p string)
		want  error // nil: opens and reads ref
	}{
		{"bad crc", func(p string) {
			writeLog(t, p, []sectorWrite{{blk0, data}}, nil, 0)
			b, _ := os.ReadFile(p)
			b[l.hdr.logOffset+4096+100] ^= 1
			os.WriteFile(p, b, 0o644)
		}, nil},
		{"over the headers", func(p string) { writeLog(t, p, []sectorWrite{{header1Off, data}}, nil, 0) }, drivers.ErrCorrupt},
		{"huge zero range", func(p string) { writeLog(t, p, nil, []region{{blk0, 1 << 62}}, 0) }, drivers.ErrCorrupt},
		{"truncated", func(p string) {
			writeLog(t, p, []sectorWrite{{blk0, data}}, nil, 0)
			b, _ := os.ReadFile(p)
			le.PutUint64(b[l.hdr.logOffset+lFlushedOff:], uint64(len(b))+mib)
			e := b[l.hdr.logOffset:][:le.Uint32(b[l.hdr.logOffset+lEntryLength:])]
			le.PutUint32(e[lChecksum:], crcOf(e, lChecksum))
			os.WriteFile(p, b, 0o644)
		}, drivers.ErrCorrupt},
	}
	for _, c := range cases {
		p := filepath.Join(dir, c.name+".vhdx")
		copyFile(t, path, p)
		c.patch(p)
		for _, ro := range []bool{true, false} {
			before, _ := os.ReadFile(p)
			d, err := Open(p, drivers.OpenOptions{ReadOnly: ro})
			if c.want != nil {
				if !errors.Is(err, c.want) {
					t.Errorf("%s (read-only %v): open: %v, want %v", c.name, ro, err, c.want)
				}
				if after, _ := os.ReadFile(p); !bytes.Equal(before, after) {
					t.Errorf("%s: a refused open changed the file", c.name)
				}
				continue
			}
			if err != nil {
				t.Errorf("%s: open: %v", c.name, err)
				continue
			}
			got := make([]byte, len(ref))
			if _, err := driverstest.ReadAt(d, got, 0); err != nil || !bytes.Equal(got, ref) {
				t.Errorf("%s: the disk differs (err %v)", c.name, err)
			}
			d.Close()
		}
	}
}

// TestLogWrap: entries this driver writes wrap around the log ring (one
// split across its end, then more than the ring holds); with the kill
// simulated (no Flush: the log GUID stays set), a read-only open finds
// the active sequence through the wrap and reads the model, and QEMU
// replays the log (qemu-img check -r all) to the same disk.
func TestLogWrap(t *testing.T) {
	dir := t.TempDir()
	path, ref := build(t, vhdxImage{"wrap", []string{"-o", "block_size=1M"}, "200M", nil}, dir)
	model := bytes.Clone(ref)
	d, err := Open(path, drivers.OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	d.logPos = d.logLen - sectorSize // the next entry's data sector wraps to 0
	write := func(blk int64) {
		p := bytes.Repeat([]byte{byte(blk + 1)}, 4096)
		copy(model[blk<<20+8192:], p)
		if _, err := driverstest.WriteAt(d, p, blk<<20+8192); err != nil {
			t.Fatal(err)
		}
	}
	write(3)
	if d.logPos != sectorSize {
		t.Fatalf("after a wrapping entry the log position is %#x", d.logPos)
	}
	for blk := int64(4); blk < 4+150; blk++ { // 150 entries of 8 KiB: past the 1 MiB ring
		write(blk)
	}
	if d.logGUID.zero() {
		t.Fatal("no log GUID set while entries are in the log")
	}
	d.Close() // no Flush: the headers keep the log GUID, as after a kill -9

	d, err = Open(path, drivers.OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	if d.overlay == nil || d.overlay.sequenceLength != 1 {
		t.Errorf("the active sequence: %+v (want the last entry alone: its Tail is itself)", d.overlay)
	}
	got := make([]byte, len(model))
	if _, err := driverstest.ReadAt(d, got, 0); err != nil || !bytes.Equal(got, model) {
		t.Errorf("read-only open after the wrap differs from the model (%v)", err)
	}
	d.Close()
	if out, err := exec.Command("qemu-img", "check", "-r", "all", "-f", "vhdx", path).CombinedOutput(); err != nil {
		t.Fatalf("qemu-img check -r all: %v\n%s", err, out)
	}
	qemuClean(t, path, model)
}

// TestLogWrapReplay: the kill falls after a log entry that wraps around
// the ring's end was written and synced, before its BAT sector reached
// its place (simulated by putting the old sector back): a read-only open
// reads the block through the overlay, the file unchanged; QEMU's replay
// and a writable open's both give the model.
func TestLogWrapReplay(t *testing.T) {
	dir := t.TempDir()
	path, ref := build(t, vhdxImage{"wrap", []string{"-o", "block_size=1M"}, "8M", nil}, dir)
	l := readLayout(t, path)
	oldBAT := bytes.Clone(l.b[l.rg.bat.off : l.rg.bat.off+sectorSize])
	d, err := Open(path, drivers.OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	d.logPos = d.logLen - sectorSize
	p := bytes.Repeat([]byte{0x42}, 3000)
	model := bytes.Clone(ref)
	copy(model[5<<20+100:], p)
	if _, err := driverstest.WriteAt(d, p, 5<<20+100); err != nil {
		t.Fatal(err)
	}
	d.Close()
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	f.WriteAt(oldBAT, l.rg.bat.off)
	f.Close()
	before, _ := os.ReadFile(path)

	d, err = Open(path, drivers.OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	got := make([]byte, len(model))
	if _, err := driverstest.ReadAt(d, got, 0); err != nil || !bytes.Equal(got, model) {
		t.Errorf("the read-only open does not read the block the wrapped entry publishes (%v)", err)
	}
	d.Close()
	if after, _ := os.ReadFile(path); !bytes.Equal(before, after) {
		t.Error("the read-only open changed the file")
	}
	q := filepath.Join(dir, "qemu.vhdx")
	copyFile(t, path, q)
	if out, err := exec.Command("qemu-img", "check", "-r", "all", "-f", "vhdx", q).CombinedOutput(); err != nil {
		t.Fatalf("qemu-img check -r all: %v\n%s", err, out)
	}
	qemuClean(t, q, model)
	d, err = Open(path, drivers.OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	d.Close()
	qemuClean(t, path, model)
}
