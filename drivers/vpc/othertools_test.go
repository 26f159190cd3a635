package vpc_test

import (
	"bytes"
	"encoding/binary"
	"os"
	"path/filepath"
	"testing"
	"unicode/utf16"

	"imgfuse/drivers"
	"imgfuse/drivers/driverstest"
	"imgfuse/drivers/vpc"
)

// Images as other tools than qemu-img write them, from Microsoft's
// Virtual Hard Disk Image Format Specification: Disk2vhd's fixed disks
// (creator "d2v "), Hyper-V's dynamic and differencing disks ("win ",
// blocks placed so that their data is 4 KiB-aligned, sector bitmaps that
// mark only the sectors written, parent locators with Windows paths only,
// their data space in bytes), and Virtual PC's ("vpc "), whose size is
// the CHS geometry's, not current_size.

var vbe = binary.BigEndian

// chs is the specification's CHS geometry for a disk of n sectors (it
// rounds down).
func chs(n int64) (cyl, heads, spt int64) {
	n = min(n, 65535*16*255)
	if n >= 65535*16*63 {
		spt, heads = 255, 16
	} else {
		spt = 17
		cth := n / spt
		heads = max(4, (cth+1023)/1024)
		if cth >= heads*1024 || heads > 16 {
			spt, heads = 31, 16
			cth = n / spt
		}
		if cth >= heads*1024 {
			spt, heads = 63, 16
		}
	}
	return n / spt / heads, heads, spt
}

func vhdChecksum(b []byte) {
	vbe.PutUint32(b[64:], 0)
	if string(b[:8]) == "cxsparse" {
		vbe.PutUint32(b[36:], 0)
	}
	var s uint32
	for _, c := range b {
		s += uint32(c)
	}
	if string(b[:8]) == "cxsparse" {
		vbe.PutUint32(b[36:], ^s)
	} else {
		vbe.PutUint32(b[64:], ^s)
	}
}

// vhd describes an image to lay out.
type vhd struct {
	creator  string // "d2v ", "win ", "vpc "
	version  uint32 // creator version
	typ      uint32 // 2 fixed, 3 dynamic, 4 differencing
	size     int64  // current_size
	uuid     byte   // the unique id's bytes
	parent   *vhd   // differencing: the parent (its uuid)
	pname    string // differencing: the parent name field
	locators []locator
	// sectors written: sector -> fill byte; for dynamic disks the
	// bitmap marks exactly these (garbage: other sectors of allocated
	// blocks hold this byte instead of zeros).
	data    map[int64]byte
	garbage byte
}

type locator struct {
	code   string // "W2ku", "W2ru"
	path   string
	inSecs bool // the data space in sectors (the spec) rather than bytes
}

const blockBytes = 2 << 20

// build lays the image out and returns the file.
func (v vhd) build() []byte {
	foot := make([]byte, 512)
	copy(foot, "conectix")
	vbe.PutUint32(foot[8:], 2)
	vbe.PutUint32(foot[12:], 0x00010000)
	vbe.PutUint64(foot[16:], 512)
	if v.typ == 2 {
		vbe.PutUint64(foot[16:], ^uint64(0))
	}
	vbe.PutUint32(foot[24:], 0x2c0a5b31)
	copy(foot[28:], v.creator)
	vbe.PutUint32(foot[32:], v.version)
	copy(foot[36:], "Wi2k")
	vbe.PutUint64(foot[40:], uint64(v.size))
	vbe.PutUint64(foot[48:], uint64(v.size))
	c, h, s := chs(v.size / 512)
	vbe.PutUint16(foot[56:], uint16(c))
	foot[58], foot[59] = byte(h), byte(s)
	vbe.PutUint32(foot[60:], v.typ)
	copy(foot[68:84], bytes.Repeat([]byte{v.uuid}, 16))
	vhdChecksum(foot)
	if v.typ == 2 {
		f := make([]byte, v.size)
		for sec, b := range v.data {
			copy(f[sec*512:sec*512+512], bytes.Repeat([]byte{b}, 512))
		}
		return append(f, foot...)
	}
	entries := (v.size + blockBytes - 1) / blockBytes
	batBytes := (entries*4 + 511) &^ 511
	f := make([]byte, 1536+batBytes)
	copy(f, foot)
	hd := f[512:1536]
	copy(hd, "cxsparse")
	vbe.PutUint64(hd[8:], ^uint64(0))
	vbe.PutUint64(hd[16:], 1536)
	vbe.PutUint32(hd[24:], 0x00010000)
	vbe.PutUint32(hd[28:], uint32(entries))
	vbe.PutUint32(hd[32:], blockBytes)
	if v.parent != nil {
		copy(hd[40:56], bytes.Repeat([]byte{v.parent.uuid}, 16))
		for i, u := range utf16.Encode([]rune(v.pname)) {
			vbe.PutUint16(hd[64+2*i:], u)
		}
		for i, l := range v.locators {
			var data []byte
			for _, u := range utf16.Encode([]rune(l.path)) {
				data = binary.LittleEndian.AppendUint16(data, u)
			}
			at := int64(len(f))
			f = append(f, make([]byte, (len(data)+511)&^511)...)
			copy(f[at:], data)
			e := f[512+576+24*i:]
			copy(e, l.code)
			space := uint32(len(f) - int(at))
			if l.inSecs {
				space /= 512
			}
			vbe.PutUint32(e[4:], space)
			vbe.PutUint32(e[8:], uint32(len(data)))
			vbe.PutUint64(e[16:], uint64(at))
		}
	}
	bat := f[1536 : 1536+batBytes]
	for i := range bat {
		bat[i] = 0xff
	}
	blocks := map[int64]bool{}
	for sec := range v.data {
		blocks[sec*512/blockBytes] = true
	}
	for blk := int64(0); blk < entries; blk++ {
		if !blocks[blk] {
			continue
		}
		// Hyper-V: the data 4 KiB-aligned, its bitmap sector before it.
		bm := (int64(len(f))+512+4095)&^4095 - 512
		f = append(f, make([]byte, bm+512+blockBytes-int64(len(f)))...)
		vbe.PutUint32(f[1536+4*blk:], uint32(bm/512))
		for k := int64(0); k < blockBytes/512; k++ {
			sec := blk*blockBytes/512 + k
			b, ok := v.data[sec]
			if ok {
				f[bm+k/8] |= 0x80 >> (k % 8)
			} else {
				b = v.garbage
			}
			copy(f[bm+512+k*512:], bytes.Repeat([]byte{b}, 512))
		}
	}
	vhdChecksum(f[512:1536])
	return append(f, foot...)
}

// disk is what the image reads as by the specification: the sectors
// written, and below them the parent's (zeros without one), cut to size.
func (v vhd) disk(size int64) []byte {
	out := make([]byte, size)
	if v.parent != nil {
		copy(out, v.parent.disk(size))
	}
	for sec, b := range v.data {
		if sec*512 < size {
			copy(out[sec*512:min(size, sec*512+512)], bytes.Repeat([]byte{b}, 512))
		}
	}
	return out
}

func sectors(from, n int64, b byte, m map[int64]byte) map[int64]byte {
	if m == nil {
		m = map[int64]byte{}
	}
	for s := from; s < from+n; s++ {
		m[s] = b
	}
	return m
}

func readAll(t *testing.T, path string) []byte {
	t.Helper()
	d, err := vpc.Open(path, drivers.OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	got := make([]byte, d.Size())
	if _, err := driverstest.ReadAt(d, got, 0); err != nil {
		t.Fatal(err)
	}
	return got
}

// TestOtherToolsVHD: a Disk2vhd fixed disk and a Hyper-V dynamic one
// (size: current_size, which their geometry rounds down), and a Virtual
// PC dynamic disk (size: the geometry's) read as the specification says,
// and as qemu-img convert reads them. A dynamic block's sectors that its
// bitmap leaves clear read as QEMU reads them, from the file (the
// specification would have them read as zeros: the driver follows QEMU,
// drivers/vpc's package doc; every tool we know leaves zeros there).
func TestOtherToolsVHD(t *testing.T) {
	driverstest.RequireTools(t, "qemu-img")
	const size = 5<<20 + 7*512 // no CHS geometry holds it exactly
	c, h, s := chs(size / 512)
	chsSize := c * h * s * 512
	if chsSize >= size {
		t.Fatalf("the geometry of %d bytes holds %d: pick another size", size, chsSize)
	}
	data := sectors(0, 9, 0x11, sectors(4000, 300, 0x22, sectors(size/512-3, 3, 0x33, nil)))
	for _, c := range []struct {
		name string
		v    vhd
		size int64
		spec bool // the specification's reading holds (else only QEMU's)
	}{
		{"disk2vhd-fixed", vhd{creator: "d2v ", version: 0x00020000, typ: 2, size: size, uuid: 1, data: data}, size, true},
		{"hyper-v-dynamic", vhd{creator: "win ", version: 0x000a0000, typ: 3, size: size, uuid: 2, data: data}, size, true},
		{"virtual-pc-dynamic", vhd{creator: "vpc ", version: 0x00050000, typ: 3, size: size, uuid: 3, data: data}, chsSize, true},
		{"hyper-v-bitmap-as-qemu", vhd{creator: "win ", version: 0x000a0000, typ: 3, size: size, uuid: 4, data: data, garbage: 0xee}, size, false},
	} {
		t.Run(c.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "Disk 1.vhd")
			if err := os.WriteFile(path, c.v.build(), 0o644); err != nil {
				t.Fatal(err)
			}
			ref, err := os.ReadFile(driverstest.ConvertRefFormat(t, "vpc", path, "", t.TempDir()))
			if err != nil {
				t.Fatal(err)
			}
			if spec := c.v.disk(c.size); c.spec != bytes.Equal(ref, spec) {
				t.Fatalf("qemu-img reads %d bytes, the specification %d: equal %v, want %v", len(ref), len(spec), !c.spec, c.spec)
			}
			if got := readAll(t, path); !bytes.Equal(got, ref) {
				t.Errorf("read %d bytes, otherwise than qemu-img (%d)", len(got), len(ref))
			}
		})
	}
}

// TestWindowsParentLocators: Hyper-V differencing disks whose parent is
// named only by Windows locators (an absolute W2ku path on a drive, a
// relative W2ru one; the parent name field wrong) find their parent and
// read, sector by sector, their own data over the parent's.
func TestWindowsParentLocators(t *testing.T) {
	const size = 6 << 20
	parent := vhd{creator: "win ", version: 0x000a0000, typ: 3, size: size, uuid: 7,
		data: sectors(0, 4096, 0x50, sectors(8192, 100, 0x51, nil))}
	for _, c := range []struct {
		name string
		locs []locator
	}{
		{"W2ku+W2ru", []locator{{"W2ku", `D:\Hyper-V\Virtual Hard Disks\Parent Disk.vhd`, false}, {"W2ru", `.\Parent Disk.vhd`, false}}},
		{"W2ku-only", []locator{{"W2ku", `D:\Hyper-V\Virtual Hard Disks\Parent Disk.vhd`, true}}},
		{"W2ru-subdir", []locator{{"W2ru", `..\parents\Parent Disk.vhd`, false}}},
	} {
		t.Run(c.name, func(t *testing.T) {
			dir := t.TempDir()
			pdir := dir
			if c.name == "W2ru-subdir" {
				pdir = filepath.Join(dir, "parents")
				os.Mkdir(pdir, 0o755)
				os.Mkdir(filepath.Join(dir, "children"), 0o755)
				dir = filepath.Join(dir, "children")
			}
			if err := os.WriteFile(filepath.Join(pdir, "Parent Disk.vhd"), parent.build(), 0o644); err != nil {
				t.Fatal(err)
			}
			child := vhd{creator: "win ", version: 0x000a0000, typ: 4, size: size, uuid: 8, parent: &parent,
				pname: "Renamed.vhd", locators: c.locs,
				data: sectors(5, 3, 0x60, sectors(4090, 20, 0x61, sectors(9000, 1, 0x62, nil)))}
			path := filepath.Join(dir, "Child Disk.vhd")
			if err := os.WriteFile(path, child.build(), 0o644); err != nil {
				t.Fatal(err)
			}
			if got, want := readAll(t, path), child.disk(size); !bytes.Equal(got, want) {
				t.Errorf("the child reads otherwise than its data over its parent's")
			}
		})
	}
}
