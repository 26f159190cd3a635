package vhdx

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
)

// Unknown GUIDs: items and regions this driver does not know.
var (
	guidUnknown1 = mustGUID("3F1A7C2E-0B5D-4E8A-9C61-7D2E4B9A0F13")
	guidUnknown2 = mustGUID("A07E5B4C-61D2-4C3B-8E9F-0A1B2C3D4E5F")
)

// hyperVDynamic is a dynamic disk as Hyper-V's New-VHD makes it (lss,
// pss sectors, 32 MiB blocks), written to: the first block at 40 MiB,
// the last (a partial block) at 4 MiB, one block ZERO, one UNMAPPED, the
// others NOT_PRESENT; with the unknown metadata items and the unknown
// region (at 36 MiB, between blocks) that extra adds, not required.
func hyperVDynamic(lss, pss int64, extra bool) *hvDisk {
	h := &hvDisk{size: 4*32*mib + 8*mib + 3*4096, blockSize: 32 * mib, lss: lss, pss: pss,
		seq: [2]uint64{7, 8}, dataWrite: guid{0xd0, 1},
		blocks: map[int64]hvBlock{
			0: {state: stateFull, off: 40 * mib},
			2: {state: stateZero},
			3: {state: stateUnmapped},
			4: {state: stateFull, off: 4 * mib},
		}}
	if extra {
		h.extraItems = []hvItem{
			{guidUnknown1, 0, []byte("system item, not required")},
			{guidUnknown2, 2, []byte("virtual disk item, not required")},
			{guidUnknown1, 1, []byte("user item")},
		}
		h.extraRegions = []hvRegion{{guidUnknown2, 36 * mib, mib, false}}
	}
	return h
}

// openRO opens path read-only for driverstest.Run, with the disk it must
// read as.
func openRO(path string, want []byte) driverstest.OpenFunc {
	return func(t *testing.T) (drivers.Driver, []byte) {
		d, err := Open(path, drivers.OpenOptions{ReadOnly: true})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { d.Close() })
		return d, want
	}
}

// openCopy opens a copy of path writable for driverstest.RunWritable.
func openCopy(path string, want []byte) driverstest.OpenFunc {
	return func(t *testing.T) (drivers.Driver, []byte) {
		p := filepath.Join(t.TempDir(), filepath.Base(path))
		copyFile(t, path, p)
		d, err := Open(p, drivers.OpenOptions{})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { d.Close() })
		return d, want
	}
}

// TestHyperVDynamic: Hyper-V dynamic disks (4Kn: 4096-byte logical
// sectors, which QEMU cannot open; and 512e, which it can) read as the
// specification says, unknown items and regions that are not required
// ignored, and take writes; qemu-img reads the 512e disk as the model
// (before and after the driver's writes).
func TestHyperVDynamic(t *testing.T) {
	dir := t.TempDir()
	for _, c := range []struct {
		name     string
		lss, pss int64
	}{{"4kn", 4096, 4096}, {"512e", 512, 4096}} {
		t.Run(c.name, func(t *testing.T) {
			h := hyperVDynamic(c.lss, c.pss, true)
			file, disk := h.build(t, 0x40, nil)
			path := filepath.Join(dir, c.name+".vhdx")
			writeSparse(t, path, file)
			d, err := Open(path, drivers.OpenOptions{ReadOnly: true})
			if err != nil {
				t.Fatal(err)
			}
			if d.md.logicalSS != c.lss || d.md.physicalSS != c.pss || d.blockSize != 32*mib || d.cr != (1<<23)*c.lss/(32*mib) || d.Size() != h.size {
				t.Errorf("metadata: %+v, chunk ratio %d", *d.md, d.cr)
			}
			if err := d.Damage(); err != nil {
				t.Errorf("a sound image reported damaged: %v", err)
			}
			d.Close()
			driverstest.Run(t, openRO(path, disk))
			if c.lss != 512 {
				// QEMU cannot open it: the model checks the writes.
				driverstest.RunWritable(t, openCopy(path, disk))
				return
			}
			driverstest.RequireTools(t, "qemu-img")
			qemuClean(t, path, disk)
			// Writes through the driver: into the ZERO block, a
			// NOT_PRESENT one and a present one; a whole block
			// discarded. The unknown region keeps its bytes.
			w := filepath.Join(t.TempDir(), "w.vhdx")
			copyFile(t, path, w)
			model := bytes.Clone(disk)
			d, err = Open(w, drivers.OpenOptions{})
			if err != nil {
				t.Fatal(err)
			}
			for _, off := range []int64{2*32*mib + 4096, 32*mib + 12345, 100 * 1024, h.size - 700} {
				p := bytes.Repeat([]byte{byte(off)}, 600)
				copy(model[off:], p)
				if _, err := driverstest.WriteAt(d, p, off); err != nil {
					t.Fatal(err)
				}
			}
			err = inCo(func(co *coroutine.Co) error {
				if err := d.Discard(co, 3*32*mib, 32*mib); err != nil {
					return err
				}
				return d.Flush(co)
			})
			if err != nil {
				t.Fatal(err)
			}
			clear(model[3*32*mib : 4*32*mib])
			d.Close()
			after, _ := os.ReadFile(w)
			if !bytes.Equal(after[36*mib:37*mib], file[36*mib:37*mib]) {
				t.Error("the writes changed the unknown region")
			}
			qemuClean(t, w, model)
		})
	}
}

// TestHyperVRefusals: an unknown metadata item or region marked required
// is refused (ErrUnsupported), as the specification requires and as
// QEMU does; a block over an unknown region is damage.
func TestHyperVRefusals(t *testing.T) {
	dir := t.TempDir()
	cases := []struct {
		name   string
		change func(h *hvDisk)
	}{
		{"required item", func(h *hvDisk) { h.extraItems = append(h.extraItems, hvItem{guidUnknown1, 4, []byte{1}}) }},
		{"required virtual disk item", func(h *hvDisk) { h.extraItems = append(h.extraItems, hvItem{guidUnknown2, 6, []byte{1}}) }},
		{"required user item", func(h *hvDisk) { h.extraItems = append(h.extraItems, hvItem{guidUnknown2, 5, []byte{1}}) }},
		{"required region", func(h *hvDisk) { h.extraRegions = append(h.extraRegions, hvRegion{guidUnknown1, 37 * mib, mib, true}) }},
	}
	for _, c := range cases {
		h := hyperVDynamic(512, 4096, false)
		c.change(h)
		file, _ := h.build(t, 1, nil)
		path := filepath.Join(dir, c.name+".vhdx")
		writeSparse(t, path, file)
		for _, ro := range []bool{true, false} {
			if d, err := Open(path, drivers.OpenOptions{ReadOnly: ro}); !errors.Is(err, drivers.ErrUnsupported) {
				t.Errorf("%s: open (read-only %v): %v, want ErrUnsupported", c.name, ro, err)
				if err == nil {
					d.Close()
				}
			}
		}
		if _, err := exec.LookPath("qemu-img"); err == nil {
			if out, err := runQemu("info", "-f", "vhdx", path); err == nil {
				t.Errorf("%s: qemu-img opens what the driver refuses:\n%s", c.name, out)
			}
		}
	}
	// A block placed over a region the driver does not know (not
	// required): the region's place is reserved (QEMU refuses the open).
	h := hyperVDynamic(512, 4096, true)
	h.blocks[1] = hvBlock{state: stateFull, off: 36 * mib}
	h.blocks[0] = hvBlock{state: stateFull, off: 68 * mib}
	file, _ := h.build(t, 1, nil)
	path := filepath.Join(dir, "over.vhdx")
	writeSparse(t, path, file)
	if _, err := Open(path, drivers.OpenOptions{}); !errors.Is(err, drivers.ErrCorrupt) {
		t.Errorf("writable open with a block over an unknown region: %v, want ErrCorrupt", err)
	}
	d, err := Open(path, drivers.OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	if err := d.Damage(); !errors.Is(err, drivers.ErrCorrupt) {
		t.Errorf("read-only open with a block over an unknown region: damage %v", err)
	}
	d.Close()
	// Two regions over each other, one unknown.
	h = hyperVDynamic(512, 4096, false)
	h.extraRegions = []hvRegion{{guidUnknown2, 3 * mib, mib, false}}
	file, _ = h.build(t, 1, nil)
	writeSparse(t, path, file)
	if _, err := Open(path, drivers.OpenOptions{ReadOnly: true}); !errors.Is(err, drivers.ErrCorrupt) {
		t.Errorf("an unknown region over the BAT: %v, want ErrCorrupt", err)
	}
}

// TestHyperVFixed: a fixed disk as Hyper-V makes it: LeaveBlockAllocated
// set, every BAT entry FULLY_PRESENT, the blocks at file offsets out of
// order. It reads as the model and as qemu-img says; writes, a discard
// and a zero write of whole blocks go in place: the BAT and the file
// size do not change.
func TestHyperVFixed(t *testing.T) {
	const bs = 2 * mib
	h := &hvDisk{size: 5*bs + 4096, blockSize: bs, lss: 512, pss: 4096, leave: true, seq: [2]uint64{3, 2},
		dataWrite: guid{0xf1}, blocks: map[int64]hvBlock{}}
	perm := []int64{3, 0, 5, 1, 4, 2}
	for n, p := range perm {
		h.blocks[int64(n)] = hvBlock{state: stateFull, off: 4*mib + p*bs}
	}
	file, disk := h.build(t, 0x77, nil)
	path := filepath.Join(t.TempDir(), "fixed.vhdx")
	writeSparse(t, path, file)
	driverstest.Run(t, openRO(path, disk))
	driverstest.RunWritable(t, openCopy(path, disk))

	d, err := Open(path, drivers.OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	model := bytes.Clone(disk)
	for _, off := range []int64{0, bs - 100, 3*bs + 4096, h.size - 512} {
		p := bytes.Repeat([]byte{0x5c}, 512)
		copy(model[off:], p)
		if _, err := driverstest.WriteAt(d, p, off); err != nil {
			t.Fatal(err)
		}
	}
	err = inCo(func(co *coroutine.Co) error {
		if err := d.Discard(co, bs, bs); err != nil {
			return err
		}
		if err := d.WriteZeroes(co, 4*bs, bs, true); err != nil {
			return err
		}
		return d.Flush(co)
	})
	if err != nil {
		t.Fatal(err)
	}
	clear(model[bs : 2*bs])
	clear(model[4*bs : 5*bs])
	d.Close()
	got := make([]byte, len(model))
	d, err = Open(path, drivers.OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := driverstest.ReadAt(d, got, 0); err != nil || !bytes.Equal(got, model) {
		t.Errorf("after the writes the disk differs from the model (%v)", err)
	}
	d.Close()
	after, _ := os.ReadFile(path)
	if len(after) != len(file) {
		t.Errorf("the file grew from %d to %d bytes", len(file), len(after))
	}
	if !bytes.Equal(after[3*mib:4*mib], file[3*mib:4*mib]) {
		t.Error("the BAT changed: a fixed disk's blocks stay where they are")
	}
	driverstest.RequireTools(t, "qemu-img")
	qemuClean(t, path, model)
}

// TestHyperVDifferencing: a differencing disk as Hyper-V makes it, whose
// parent locator names the parent only by Windows paths (volume_path and
// absolute_win32_path, no relative_path): the parent is looked for by
// its name beside the child, in the specification's order; a block
// partly present (its sector bitmap), one fully present, one NOT_PRESENT
// (the parent's), one ZERO. qemu-img cannot open differencing VHDX: the
// model is the oracle.
func TestHyperVDifferencing(t *testing.T) {
	const bs = 2 * mib
	dir := t.TempDir()
	baseDisk := &hvDisk{size: 4 * bs, blockSize: bs, lss: 512, pss: 4096, seq: [2]uint64{1, 2},
		dataWrite: mustGUID("6F1E2D3C-4B5A-4978-8695-A4B3C2D1E0F9"),
		blocks:    map[int64]hvBlock{0: {state: stateFull, off: 4 * mib}, 1: {state: stateFull, off: 8 * mib}, 2: {state: stateFull, off: 6 * mib}}}
	baseFile, base := baseDisk.build(t, 0x10, nil)
	writeSparse(t, filepath.Join(dir, "base.vhdx"), baseFile)

	child := func(locator ...string) (*hvDisk, []byte, []byte) {
		h := &hvDisk{size: 4 * bs, blockSize: bs, lss: 512, pss: 4096, seq: [2]uint64{2, 1}, dataWrite: guid{0xc1},
			locator: locator,
			blocks: map[int64]hvBlock{
				0: {state: statePartial, off: 5 * mib, present: func(s int64) bool { return s%7 == 0 || (s >= 100 && s < 1000) }},
				1: {state: stateFull, off: 7 * mib},
				3: {state: stateZero},
			},
			bitmapAt: map[int64]int64{0: 4 * mib}}
		f, disk := h.build(t, 0x20, base)
		return h, f, disk
	}
	link := baseDisk.dataWrite.String()
	vol := `\\?\Volume{26A21BDA-A627-11D7-9931-806E6F6E6963}\VMs\base.vhdx`
	win := `C:\VMs\base.vhdx`
	cases := []struct {
		name    string
		locator []string
	}{
		{"volume and win32", []string{"parent_linkage", link, "volume_path", vol, "absolute_win32_path", win}},
		{"win32 only", []string{"absolute_win32_path", win, "parent_linkage", link}},
		{"volume only", []string{"volume_path", vol, "parent_linkage", link}},
		{"unc", []string{"parent_linkage", link, "absolute_win32_path", `\\fileserver\vms\base.vhdx`}},
		// A relative_path that names nothing here comes first; the
		// Windows paths after it find the parent.
		{"stale relative", []string{"parent_linkage", link, "relative_path", `..\old\base.vhdx`, "absolute_win32_path", win}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			_, f, disk := child(c.locator...)
			path := filepath.Join(dir, "child-"+c.name+".vhdx")
			writeSparse(t, path, f)
			d, err := Open(path, drivers.OpenOptions{ReadOnly: true})
			if err != nil {
				t.Fatal(err)
			}
			if d.parentAt != filepath.Join(dir, "base.vhdx") {
				t.Errorf("parent found at %q", d.parentAt)
			}
			readsAs(t, d, disk)
			d.Close()
		})
	}
	_, f, disk := child(cases[0].locator...)
	path := filepath.Join(dir, "child.vhdx")
	writeSparse(t, path, f)
	driverstest.Run(t, openRO(path, disk))
	// Writes: into the partly present block, the parent's block, the
	// ZERO one.
	driverstest.RunWritable(t, func(t *testing.T) (drivers.Driver, []byte) {
		cdir := t.TempDir()
		copyFile(t, filepath.Join(dir, "base.vhdx"), filepath.Join(cdir, "base.vhdx"))
		p := filepath.Join(cdir, "child.vhdx")
		copyFile(t, path, p)
		d, err := Open(p, drivers.OpenOptions{})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { d.Close() })
		return d, disk
	})

	// The parent under another name: nothing names it.
	odir := t.TempDir()
	copyFile(t, filepath.Join(dir, "base.vhdx"), filepath.Join(odir, "Base-renamed.vhdx"))
	copyFile(t, path, filepath.Join(odir, "child.vhdx"))
	if _, err := Open(filepath.Join(odir, "child.vhdx"), drivers.OpenOptions{ReadOnly: true}); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("open with the parent renamed: %v, want ErrNotExist", err)
	}
	// A parent_linkage of another DataWriteGuid (the parent was written
	// since): refused.
	_, f, _ = child("parent_linkage", guid{9}.String(), "absolute_win32_path", win)
	writeSparse(t, path, f)
	if _, err := Open(path, drivers.OpenOptions{ReadOnly: true}); !errors.Is(err, drivers.ErrCorrupt) {
		t.Errorf("open with a stale parent_linkage: %v, want ErrCorrupt", err)
	}
	// A 4Kn child (4096-byte logical sectors: a bitmap bit per 4 KiB)
	// of the 512e parent.
	h4, _, _ := child(cases[0].locator...)
	h4.lss = 4096
	f, disk = h4.build(t, 0x21, base)
	writeSparse(t, path, f)
	d, err := Open(path, drivers.OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	if d.cr != (1<<23)*4096/bs {
		t.Errorf("chunk ratio %d", d.cr)
	}
	readsAs(t, d, disk)
	d.Close()
	// parent_linkage2 (the spec's second linkage) names it.
	_, f, disk = child("parent_linkage", guid{9}.String(), "parent_linkage2", strings.ToLower(link), "absolute_win32_path", win)
	writeSparse(t, path, f)
	d, err = Open(path, drivers.OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	readsAs(t, d, disk)
	d.Close()
}

// readsAs checks that d reads as want, whole.
func readsAs(t *testing.T, d *Driver, want []byte) {
	t.Helper()
	got := make([]byte, d.Size())
	if _, err := driverstest.ReadAt(d, got, 0); err != nil {
		t.Errorf("read: %v", err)
	} else if !bytes.Equal(got, want) {
		for i := range got {
			if i >= len(want) || got[i] != want[i] {
				t.Errorf("the disk differs from the model from offset %#x", i)
				break
			}
		}
	}
}

// TestWindowsDirtyLog: a log Windows left dirty (windowsLog): the active
// sequence is the newest complete one — its entries from the Tail on,
// data and zero descriptors, over several descriptor sectors —, a torn
// entry ends it, an older entry after it in the ring and an entry past
// the torn one are not replayed; LastFileOffset past the end of the file
// extends it. A read-only open reads the replayed disk and leaves the
// file alone; a writable open replays it into the file, which qemu-img
// then finds clean and equal to the model; QEMU's own replay (qemu-img
// check -r all) gives the same disk where QEMU can read the log.
func TestWindowsDirtyLog(t *testing.T) {
	dir := t.TempDir()
	g := mustGUID("0C7E0D5A-3B2E-4F1D-8C9B-7A6F5E4D3C2B")
	for _, variant := range []string{"windows", "newer", "tail", "qemu"} {
		t.Run(variant, func(t *testing.T) {
			h := &hvDisk{size: 8 * mib, blockSize: mib, lss: 512, pss: 4096, seq: [2]uint64{20, 21}, dataWrite: guid{0xdd},
				blocks:   map[int64]hvBlock{0: {state: stateFull, off: 4 * mib}, 1: {state: stateFull, off: 5 * mib}},
				hdrPatch: func(_ int, b []byte) { copy(b[hLogGUID:], g[:]) }}
			file, disk := h.build(t, 0x30, nil)
			if len(file) != 6*mib {
				t.Fatalf("the image is %d bytes", len(file))
			}
			log, ws, zs := windowsLog(g, file[3*mib:], 3*mib, variant)
			copy(file[mib:], log)
			// The model: the replay as the specification describes it,
			// on the file, then the disk read from the replayed file.
			rf := append(bytes.Clone(file), make([]byte, mib)...)
			for _, z := range zs {
				clear(rf[z.off : z.off+z.length])
			}
			for _, w := range ws {
				copy(rf[w.off:], w.data)
			}
			copy(disk[0:], rf[4*mib:5*mib])
			copy(disk[mib:], rf[5*mib:6*mib])
			copy(disk[2*mib:], rf[6*mib:7*mib])
			path := filepath.Join(dir, variant+".vhdx")
			writeSparse(t, path, file)

			d, err := Open(path, drivers.OpenOptions{ReadOnly: true})
			if err != nil {
				t.Fatal(err)
			}
			if d.overlay == nil || d.overlay.sequenceLength != 3 || d.overlay.maxSeq != 12 {
				t.Errorf("the active sequence: %+v, want entries 10 to 12", d.overlay)
			}
			if err := d.Damage(); err != nil {
				t.Errorf("a block the log places before its LastFileOffset is damage: %v", err)
			}
			readsAs(t, d, disk)
			d.Close()
			if after, _ := os.ReadFile(path); !bytes.Equal(after, file) {
				t.Error("a read-only open changed the file")
			}

			w := filepath.Join(t.TempDir(), "w.vhdx")
			copyFile(t, path, w)
			d, err = Open(w, drivers.OpenOptions{})
			if err != nil {
				t.Fatal(err)
			}
			if !d.hdr.logGUID.zero() {
				t.Error("the log GUID is still set after the replay")
			}
			d.Close()
			if fi, err := os.Stat(w); err != nil || fi.Size() != 7*mib {
				t.Errorf("after the replay the file is %v bytes, want LastFileOffset (7 MiB)", fi.Size())
			}
			after, _ := os.ReadFile(w)
			if !bytes.Equal(after[2*mib:], rf[2*mib:]) {
				t.Error("the replayed file differs from the model's past the log")
			}
			d, err = Open(w, drivers.OpenOptions{ReadOnly: true})
			if err != nil {
				t.Fatal(err)
			}
			if d.overlay != nil {
				t.Error("a replayed image still has a log to replay")
			}
			readsAs(t, d, disk)
			d.Close()

			driverstest.RequireTools(t, "qemu-img")
			qemuClean(t, w, disk)
			if variant != "qemu" {
				// QEMU cannot replay these: it never looks at Tail, and
				// it misreads entries of more than one descriptor sector.
				return
			}
			// QEMU's replay reads as the same disk.
			q := filepath.Join(t.TempDir(), "q.vhdx")
			copyFile(t, path, q)
			if out, err := runQemu("check", "-r", "all", "-f", "vhdx", q); err != nil {
				t.Fatalf("qemu-img check -r all: %v\n%s", err, out)
			}
			qemuClean(t, q, disk)
		})
	}
}

// TestHeaderSlots: the two header slots, each padded to 4 KiB with
// reserved bytes that are not zero (the CRC covers all 4 KiB), in either
// order of sequence number, one of them perhaps with a bad CRC: the
// valid one with the higher sequence number is current — seen by its log
// GUID, which names a log entry writing a marker sector, while the other
// slot has none. The driver's header updates keep the reserved bytes;
// qemu-img agrees on the disk before and after.
func TestHeaderSlots(t *testing.T) {
	g := mustGUID("5D1C8B7A-6E5F-4A3B-9C2D-1E0F9A8B7C6D")
	pad := func(b []byte) {
		for i := 80; i < headerSize; i++ {
			b[i] = byte(i*7 + 1)
		}
	}
	cases := []struct {
		name         string
		seq          [2]uint64
		dirty, bad   int // the slot with the log GUID, the slot with a bad CRC (-1: none)
		slot         int
		replayMarker bool
	}{
		{"second newer", [2]uint64{5, 9}, 1, -1, 1, true},
		{"first newer", [2]uint64{9, 5}, 0, -1, 0, true},
		{"second newer, bad CRC", [2]uint64{5, 9}, 1, 1, 0, false},
		{"first newer, bad CRC", [2]uint64{9, 5}, 0, 0, 1, false},
		{"older one's log", [2]uint64{5, 9}, 0, -1, 1, false},
		{"only the older valid", [2]uint64{9, 5}, 1, 0, 1, true},
		// Disk2vhd writes both slots alike, sequence numbers included.
		{"equal and identical", [2]uint64{7, 7}, -1, -1, 0, false},
	}
	dir := t.TempDir()
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			h := &hvDisk{size: 4 * mib, blockSize: mib, lss: 512, pss: 4096, seq: c.seq, dataWrite: guid{0xee},
				blocks: map[int64]hvBlock{0: {state: stateFull, off: 4 * mib}},
				hdrPatch: func(slot int, b []byte) {
					pad(b)
					b[hFileWrite+1] = 0
					if slot == c.dirty {
						copy(b[hLogGUID:], g[:])
					}
				}}
			file, disk := h.build(t, 0x50, nil)
			marker := bytes.Repeat([]byte("marker!!"), sectorSize/8)
			copy(file[mib:], buildEntry([]sectorWrite{{4*mib + 8192, marker}}, nil, g, 1, 0, int64(len(file)), int64(len(file))))
			if c.bad >= 0 {
				file[header1Off+c.bad*(header2Off-header1Off)+3000] ^= 0x10
			}
			if c.replayMarker {
				copy(disk[8192:], marker)
			}
			path := filepath.Join(dir, c.name+".vhdx")
			writeSparse(t, path, file)
			d, err := Open(path, drivers.OpenOptions{ReadOnly: true})
			if err != nil {
				t.Fatal(err)
			}
			if d.hdrSlot != c.slot || d.hdr.seq != c.seq[c.slot] {
				t.Errorf("current header: slot %d, sequence %d; want slot %d", d.hdrSlot, d.hdr.seq, c.slot)
			}
			readsAs(t, d, disk)
			d.Close()

			// A write: two header updates, from the current slot's 4 KiB.
			w := filepath.Join(t.TempDir(), "w.vhdx")
			copyFile(t, path, w)
			d, err = Open(w, drivers.OpenOptions{})
			if err != nil {
				t.Fatal(err)
			}
			model := bytes.Clone(disk)
			copy(model[mib+512:], "written")
			if _, err := driverstest.WriteAt(d, []byte("written"), mib+512); err != nil {
				t.Fatal(err)
			}
			if err := inCo(d.Flush); err != nil {
				t.Fatal(err)
			}
			d.Close()
			after, _ := os.ReadFile(w)
			for slot, at := range []int{header1Off, header2Off} {
				hd, err := parseHeader(after[at:])
				switch {
				case err != nil:
					t.Errorf("after the write, header %d: %v", slot+1, err)
				case hd.seq <= max(c.seq[0], c.seq[1]):
					t.Errorf("after the write, header %d has sequence %d", slot+1, hd.seq)
				}
				want := make([]byte, headerSize)
				pad(want)
				if !bytes.Equal(after[at+80:at+headerSize], want[80:]) {
					t.Errorf("after the write, header %d lost its reserved bytes", slot+1)
				}
			}
			d, err = Open(w, drivers.OpenOptions{ReadOnly: true})
			if err != nil {
				t.Fatal(err)
			}
			readsAs(t, d, model)
			d.Close()

			driverstest.RequireTools(t, "qemu-img")
			qemuClean(t, w, model)
			q := filepath.Join(t.TempDir(), "q.vhdx")
			copyFile(t, path, q)
			if c.replayMarker {
				if out, err := runQemu("check", "-r", "all", "-f", "vhdx", q); err != nil {
					t.Fatalf("qemu-img check -r all: %v\n%s", err, out)
				}
			}
			qemuClean(t, q, disk)
		})
	}
}
