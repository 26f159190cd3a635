package vmdk_test

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"imgfuse/drivers"
	"imgfuse/drivers/driverstest"
	"imgfuse/drivers/vmdk"
)

// Images as VMware Workstation writes them, from the Virtual Disk Format
// 5.0 specification rather than from qemu-img: the hosted sparse header
// (version 1, flags "valid newline test" and "redundant grain table":
// 0x3, grainSize 128 sectors, numGTEsPerGT 512, descriptor at sector 1
// for 20 sectors), then the redundant grain directory and its grain
// tables, then the grain directory and its grain tables, all
// preallocated, the first grain at overHead (rounded up to a grain), and
// an embedded descriptor in VMware's words: an encoding line, a
// "isNativeSnapshot" line, blank lines, an extent file name with spaces
// and a disk database with its uuid and longContentID.

// vmwareSparse is one hosted sparse extent: capacity in sectors, grains
// (by grain number) of data in the order VMware appended them, and the
// embedded descriptor (none when "", as in the extents of a split image).
type vmwareSparse struct {
	capacity int64
	grains   []int64
	desc     string
}

// build returns the extent file and the disk it holds (grain g filled
// with byte g+1, except its last 100 bytes, zero).
func (v vmwareSparse) build() (file, disk []byte) {
	const grainSize, numGTEs = 128, 512
	le := binary.LittleEndian
	grainBytes := int64(grainSize * 512)
	nGrains := (v.capacity + grainSize - 1) / grainSize
	nGTs := (nGrains + numGTEs - 1) / numGTEs
	gdSectors := (nGTs*4 + 511) / 512
	gtSectors := int64(numGTEs * 4 / 512)
	descOff, descSize := int64(0), int64(0)
	next := int64(1)
	if v.desc != "" {
		descOff, descSize = 1, 20
		next = 21
	}
	rgd := next
	rgts := rgd + gdSectors
	gd := rgts + nGTs*gtSectors
	gts := gd + gdSectors
	overHead := (gts + nGTs*gtSectors + grainSize - 1) / grainSize * grainSize
	file = make([]byte, (overHead+int64(len(v.grains))*grainSize)*512)
	h := file[:512]
	copy(h, "KDMV")
	le.PutUint32(h[4:], 1)
	le.PutUint32(h[8:], 3)
	le.PutUint64(h[12:], uint64(v.capacity))
	le.PutUint64(h[20:], grainSize)
	le.PutUint64(h[28:], uint64(descOff))
	le.PutUint64(h[36:], uint64(descSize))
	le.PutUint32(h[44:], numGTEs)
	le.PutUint64(h[48:], uint64(rgd))
	le.PutUint64(h[56:], uint64(gd))
	le.PutUint64(h[64:], uint64(overHead))
	copy(h[73:], "\n \r\n")
	copy(file[512:], v.desc)
	for i := int64(0); i < nGTs; i++ {
		le.PutUint32(file[rgd*512+4*i:], uint32(rgts+i*gtSectors))
		le.PutUint32(file[gd*512+4*i:], uint32(gts+i*gtSectors))
	}
	disk = make([]byte, v.capacity*512)
	for k, g := range v.grains {
		at := overHead + int64(k)*grainSize
		for _, t := range []int64{rgts, gts} {
			le.PutUint32(file[t*512+4*g:], uint32(at))
		}
		data := bytes.Repeat([]byte{byte(g + 1)}, int(grainBytes)-100)
		copy(file[at*512:], data)
		copy(disk[g*grainBytes:], data)
	}
	return file, disk
}

// vmwareDescriptor is a descriptor as VMware Workstation writes it.
func vmwareDescriptor(createType string, extents ...string) string {
	return `# Disk DescriptorFile
version=1
encoding="UTF-8"
CID=5a2c7f3e
parentCID=ffffffff
isNativeSnapshot="no"
createType="` + createType + `"

# Extent description
` + strings.Join(extents, "\n") + `

# The Disk Data Base 
#DDB

ddb.adapterType = "lsilogic"
ddb.geometry.cylinders = "522"
ddb.geometry.heads = "255"
ddb.geometry.sectors = "63"
ddb.longContentID = "2b0f4d51e3c8a9f77a4c1e0d5a2c7f3e"
ddb.thinProvisioned = "1"
ddb.uuid = "60 00 C2 9b 1e 35 a4 1c-7f 0e 8c 8e 32 4b 2d 11"
ddb.virtualHWVersion = "19"
`
}

// TestVMwareImages: a monolithicSparse image and a twoGbMaxExtentSparse
// one (a descriptor file and extents without embedded descriptors, every
// name with spaces) laid out as VMware Workstation lays them out read as
// the layout says, and as qemu-img convert reads them.
func TestVMwareImages(t *testing.T) {
	driverstest.RequireTools(t, "qemu-img")
	// An odd capacity: the last grain table and grain are partial.
	const capacity = 2*512*128 + 300
	cases := []struct {
		name  string
		files func(dir string) (string, []byte)
	}{
		{"monolithicSparse", func(dir string) (string, []byte) {
			name := "Windows 10 x64.vmdk"
			v := vmwareSparse{capacity: capacity, grains: []int64{7, 0, 600, 1024, 3},
				desc: vmwareDescriptor("monolithicSparse", fmt.Sprintf(`RW %d SPARSE "%s"`, capacity, name))}
			f, disk := v.build()
			writeFile(t, filepath.Join(dir, name), f)
			return filepath.Join(dir, name), disk
		}},
		{"twoGbMaxExtentSparse", func(dir string) (string, []byte) {
			a := vmwareSparse{capacity: 4096, grains: []int64{31, 2}}
			b := vmwareSparse{capacity: capacity, grains: []int64{1, 1024, 0}}
			fa, da := a.build()
			fb, db := b.build()
			writeFile(t, filepath.Join(dir, "My Disk-s001.vmdk"), fa)
			writeFile(t, filepath.Join(dir, "My Disk-s002.vmdk"), fb)
			desc := vmwareDescriptor("twoGbMaxExtentSparse", `RW 4096 SPARSE "My Disk-s001.vmdk"`,
				fmt.Sprintf(`RW %d SPARSE "My Disk-s002.vmdk"`, capacity))
			writeFile(t, filepath.Join(dir, "My Disk.vmdk"), []byte(desc))
			return filepath.Join(dir, "My Disk.vmdk"), append(da, db...)
		}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			dir := t.TempDir()
			path, want := c.files(dir)
			ref, err := os.ReadFile(driverstest.ConvertRefFormat(t, "vmdk", path, "", t.TempDir()))
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(ref, want) {
				t.Fatalf("qemu-img reads the image otherwise than its layout says (%d bytes, want %d)", len(ref), len(want))
			}
			d, err := vmdk.Open(path, drivers.OpenOptions{ReadOnly: true})
			if err != nil {
				t.Fatal(err)
			}
			defer d.Close()
			got := make([]byte, len(want))
			if _, err := driverstest.ReadAt(d, got, 0); err != nil || !bytes.Equal(got, want) {
				t.Errorf("read: %v (equal %v)", err, bytes.Equal(got, want))
			}
			if ct := d.Info().FormatSpecific.Data; !strings.Contains(fmt.Sprint(ct), c.name) {
				t.Errorf("info: %v, want create type %s", ct, c.name)
			}
		})
	}
}

func writeFile(t *testing.T, path string, b []byte) {
	t.Helper()
	if err := os.WriteFile(path, b, 0o644); err != nil {
		t.Fatal(err)
	}
}
