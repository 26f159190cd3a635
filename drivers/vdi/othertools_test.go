package vdi_test

import (
	"bytes"
	"encoding/binary"
	"os"
	"path/filepath"
	"testing"

	"imgfuse/drivers"
	"imgfuse/drivers/driverstest"
	"imgfuse/drivers/vdi"
)

// virtualBoxVDI lays a VDI out as VirtualBox writes it (VBox's VDICore.h
// and vdiCreateImage, not qemu-img): the pre-header banner "<<< Oracle VM
// VirtualBox Disk Image >>>", header version 1.1 of 0x190 bytes, the block
// map at 1 MiB and the data at the next 1 MiB boundary after it
// (VDI_DATA_ALIGN), the legacy geometry filled (cylinders, 16 heads, 63
// sectors, 512), the creation and modification UUIDs set. Dynamic images
// allocate blocks in the order they are written; a block VirtualBox
// discarded (compaction) is 0xFFFFFFFE, a block never written 0xFFFFFFFF.
// Static images map block i to i. size is the disk size in bytes, order
// the guest blocks in allocation order (dynamic); block b holds byte b+1
// up to 1000 bytes before its end.
func virtualBoxVDI(size int64, static bool, order []uint32, discarded []uint32) (file, disk []byte) {
	const mib = 1 << 20
	le := binary.LittleEndian
	blocks := uint32((size + mib - 1) / mib)
	bmapOff := uint32(mib)
	dataOff := (bmapOff + 4*blocks + mib - 1) / mib * mib
	if static {
		order = nil
		for b := range blocks {
			order = append(order, b)
		}
	}
	file = make([]byte, int64(dataOff)+int64(len(order))*mib)
	copy(file, "<<< Oracle VM VirtualBox Disk Image >>>\n")
	le.PutUint32(file[0x40:], 0xBEDA107F)
	le.PutUint32(file[0x44:], 0x00010001)
	le.PutUint32(file[0x48:], 0x190)
	typ := uint32(1)
	if static {
		typ = 2
	}
	le.PutUint32(file[0x4C:], typ)
	le.PutUint32(file[0x154:], bmapOff)
	le.PutUint32(file[0x158:], dataOff)
	le.PutUint32(file[0x15C:], uint32(size/512/16/63)) // legacy cylinders
	le.PutUint32(file[0x160:], 16)
	le.PutUint32(file[0x164:], 63)
	le.PutUint32(file[0x168:], 512) // the legacy geometry's sector size
	le.PutUint64(file[0x170:], uint64(size))
	le.PutUint32(file[0x178:], mib)
	le.PutUint32(file[0x17C:], 0)
	le.PutUint32(file[0x180:], blocks)
	le.PutUint32(file[0x184:], uint32(len(order)))
	copy(file[0x188:], "\x3b\x1a\x0e\x51\x9c\x2d\x4f\x4e\x8a\x31\x17\x6d\x5c\x40\x22\x90")
	copy(file[0x198:], "\x7e\x02\x61\x4d\x0b\x35\x4b\x45\x9f\x21\x6a\x0c\x3e\x7d\x51\x02")
	for b := range blocks {
		le.PutUint32(file[int(bmapOff)+4*int(b):], 0xFFFFFFFF)
	}
	for _, b := range discarded {
		le.PutUint32(file[int(bmapOff)+4*int(b):], 0xFFFFFFFE)
	}
	disk = make([]byte, size)
	for i, b := range order {
		le.PutUint32(file[int(bmapOff)+4*int(b):], uint32(i))
		at := int64(dataOff) + int64(i)*mib
		data := bytes.Repeat([]byte{byte(b + 1)}, mib-1000)
		copy(file[at:], data)
		copy(disk[int64(b)*mib:min(size, int64(b+1)*mib)], data)
	}
	return file, disk
}

// TestVirtualBoxImages: dynamic (blocks out of order, one discarded) and
// static images laid out as VirtualBox lays them out read as the layout
// says, and as qemu-img convert reads them; qemu-img check finds them
// clean.
func TestVirtualBoxImages(t *testing.T) {
	driverstest.RequireTools(t, "qemu-img")
	const size = 6<<20 + 512*7 // an odd size: the last block is partial
	for _, c := range []struct {
		name   string
		static bool
	}{{"dynamic", false}, {"static", true}} {
		t.Run(c.name, func(t *testing.T) {
			file, want := virtualBoxVDI(size, c.static, []uint32{4, 0, 6, 2}, []uint32{5})
			path := filepath.Join(t.TempDir(), "VirtualBox Disk.vdi")
			if err := os.WriteFile(path, file, 0o644); err != nil {
				t.Fatal(err)
			}
			ref, err := os.ReadFile(driverstest.ConvertRefFormat(t, "vdi", path, "", t.TempDir()))
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(ref, want) {
				t.Fatalf("qemu-img reads the image otherwise than its layout says (%d bytes, want %d)", len(ref), len(want))
			}
			driverstest.Cmd(t, "qemu-img", "check", "-f", "vdi", path)
			d, err := vdi.Open(path, drivers.OpenOptions{ReadOnly: true})
			if err != nil {
				t.Fatal(err)
			}
			defer d.Close()
			got := make([]byte, len(want))
			if _, err := driverstest.ReadAt(d, got, 0); err != nil || !bytes.Equal(got, want) {
				t.Errorf("read: %v (equal %v)", err, bytes.Equal(got, want))
			}
		})
	}
}
