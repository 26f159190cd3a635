package vmdk

import (
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

// seedImage is a small valid monolithicSparse extent: 1024 sectors of
// 4 KiB grains, 16 entries per grain table (8 tables), an embedded
// descriptor, the redundant directory and tables, and grain 0 allocated
// at sector 8, filled with 0x5a.
func seedImage() []byte {
	b := make([]byte, 16*512)
	le := binary.LittleEndian
	copy(b, "KDMV")
	le.PutUint32(b[offVersion:], 1)
	le.PutUint32(b[offFlags:], flagNewlineTest|flagRGD)
	le.PutUint64(b[offCapacity:], 1024)
	le.PutUint64(b[offGrainSize:], 8)
	le.PutUint64(b[offDescOff:], 1)
	le.PutUint64(b[offDescSize:], 2)
	le.PutUint32(b[offNumGTEs:], 16)
	le.PutUint64(b[offRGDOff:], 3)
	le.PutUint64(b[offGDOff:], 5)
	le.PutUint64(b[offOverHead:], 8)
	copy(b[512:], "# Disk DescriptorFile\nversion=1\nCID=12345678\nparentCID=ffffffff\ncreateType=\"monolithicSparse\"\nRW 1024 SPARSE \"x.vmdk\"\n")
	// Directories at sectors 3 and 5: 8 tables of 64 bytes, in sectors
	// 4 and 6.
	for i := 0; i < 8; i++ {
		le.PutUint32(b[3*512+4*i:], 4)
		le.PutUint32(b[5*512+4*i:], 6)
	}
	// The tables of both share one sector each: table i at +64i. Give
	// every directory entry its own table offset within the sector is not
	// possible in sectors, so all name the same table: grain 0 of every
	// table is at sector 8.
	le.PutUint32(b[4*512:], 8)
	le.PutUint32(b[6*512:], 8)
	for i := 8 * 512; i < 16*512; i++ {
		b[i] = 0x5a
	}
	return b
}

// FuzzOpen: no sparse extent makes the driver panic, allocate without
// bound or return a short read without an error (the header, tables and
// embedded descriptor are the fuzzer's; the magic stays "KDMV"); it opens (and then
// reads, maps and checks) or fails with a sentinel error.
func FuzzOpen(f *testing.F) {
	seed := seedImage()
	f.Add(seed[:4096])
	f.Add(seed[:512])
	dir := f.TempDir()
	if d, err := os.MkdirTemp("/dev/shm", "vmdkfuzz"); err == nil {
		dir = d
		f.Cleanup(func() { os.RemoveAll(d) })
	}
	path := filepath.Join(dir, "f.vmdk")
	f.Fuzz(func(t *testing.T, data []byte) {
		img := make([]byte, max(len(data), len(seed)))
		copy(img, seed)
		copy(img, data)
		// Sparse extents only: a fuzzed text descriptor would name
		// arbitrary files to open (its parser has FuzzDescriptor); and
		// no parent, which an embedded descriptor may name
		// (parentFileNameHint; chain_test.go opens parents).
		copy(img, "KDMV")
		if err := os.WriteFile(path, img, 0o644); err != nil {
			t.Fatal(err)
		}
		d, err := Open(path, drivers.OpenOptions{ReadOnly: true, NoDirectIO: true, NoBacking: true})
		if err != nil {
			if !errors.Is(err, drivers.ErrCorrupt) && !errors.Is(err, drivers.ErrUnsupported) {
				t.Fatalf("open failed without a sentinel: %v", err)
			}
			return
		}
		defer d.Close()
		driverstest.Poke(t, d)
		if d.Size() <= 1<<30 {
			if _, err := d.Check(drivers.CheckOnly, nil); err != nil {
				t.Fatalf("check: %v", err)
			}
		}
	})
}

// TestSeedImage: the fuzz seed opens and reads as built (so the fuzzer
// starts from a valid image).
func TestSeedImage(t *testing.T) {
	path := filepath.Join(t.TempDir(), "s.vmdk")
	os.WriteFile(path, seedImage(), 0o644)
	d, err := Open(path, drivers.OpenOptions{ReadOnly: true, NoDirectIO: true})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	buf := make([]byte, 8192)
	coroutine.Run(func(co *coroutine.Co) { _, err = d.ReadAt(co, buf, 0) })
	if err != nil || buf[0] != 0x5a || buf[4095] != 0x5a || buf[4096] != 0 || d.Size() != 1024*512 {
		t.Errorf("read %v: % x ... % x, size %d", err, buf[:2], buf[4095:4097], d.Size())
	}
	if d.desc == nil || d.desc.cid != 0x12345678 {
		t.Errorf("descriptor %+v", d.desc)
	}
}

// FuzzDescriptor: no text makes the descriptor parser or probe panic or
// keep more than maxExtents extents; every extent it returns has a size
// and, but ZERO, a file.
func FuzzDescriptor(f *testing.F) {
	f.Add([]byte("# Disk DescriptorFile\nversion=1\nCID=6c962b36\nparentCID=ffffffff\ncreateType=\"monolithicFlat\"\n\nRW 10240 FLAT \"a b-flat.vmdk\" 0\nRDONLY 20 ZERO\nddb.adapterType = \"ide\"\n"))
	f.Add([]byte("version=1\r\nCID=1\r\nparentFileNameHint=\"p.vmdk\"\r\nRW 4194304 SPARSE \"x-s001.vmdk\"\r\n"))
	f.Add([]byte("  \n#c\nversion=3\n"))
	f.Fuzz(func(t *testing.T, text []byte) {
		probeDescriptor(text)
		d, err := parseDescriptor(text)
		if err != nil {
			if !errors.Is(err, drivers.ErrCorrupt) && !errors.Is(err, drivers.ErrUnsupported) {
				t.Fatalf("parse failed without a sentinel: %v", err)
			}
			return
		}
		if len(d.extents) > maxExtents {
			t.Fatalf("%d extents", len(d.extents))
		}
		for _, e := range d.extents {
			if e.sectors <= 0 || (e.typ != "ZERO" && e.file == "") || e.offset < 0 {
				t.Fatalf("extent %+v", e)
			}
		}
		if d.cidAt >= 0 && (d.cidAt+8 > len(text) || strings.ContainsAny(string(text[d.cidAt:d.cidAt+8]), " =\n")) {
			t.Fatal("cidAt outside the text")
		}
	})
}

// TestParseDescriptor: keys are whole lines, not substrings (QEMU would
// read parentCID's value as the CID, and a key in a comment); extent lines
// must parse.
func TestParseDescriptor(t *testing.T) {
	d, err := parseDescriptor([]byte("# CID=99999999\nversion=1\nparentCID=aaaaaaaa\nCID=0000abcd\ncreateType=\"twoGbMaxExtentFlat\"\nRW 8 FLAT \"dir/a b.vmdk\" 16\nRW 2 ZERO\n"))
	if err != nil {
		t.Fatal(err)
	}
	if d.cid != 0xabcd || d.parentCID != 0xaaaaaaaa || d.createType != "twoGbMaxExtentFlat" || len(d.extents) != 2 {
		t.Fatalf("%+v", d)
	}
	if e := d.extents[0]; e.file != "dir/a b.vmdk" || e.offset != 16 || e.sectors != 8 || e.typ != "FLAT" {
		t.Errorf("extent %+v", e)
	}
	for _, bad := range []string{
		"version=1\nRW 8 FLAT \"a.vmdk\"\n", // FLAT without an offset
		"version=1\nRW x FLAT \"a.vmdk\" 0\n",
		"version=1\nRW 8 FLAT a.vmdk 0\n",
		"version=1\nWHAT 8 FLAT \"a.vmdk\" 0\n",
		"CID=1\n",
		"version=1\nCID=1\nCID=2\n",
	} {
		if _, err := parseDescriptor([]byte(bad)); !errors.Is(err, drivers.ErrCorrupt) {
			t.Errorf("%q: %v", bad, err)
		}
	}
	if _, err := parseDescriptor([]byte("version=4\n")); !errors.Is(err, drivers.ErrUnsupported) {
		t.Errorf("version 4: %v", err)
	}
}
