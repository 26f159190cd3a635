package vdi_test

import (
	"encoding/binary"
	"errors"
	"os"
	"path/filepath"
	"testing"

	"imgfuse/drivers"
	"imgfuse/drivers/driverstest"
	"imgfuse/drivers/vdi"
)

// seedImage is a small valid dynamic VDI: 4 blocks, block 1 allocated at
// index 0 and filled with 0x5a.
func seedImage() []byte {
	b := make([]byte, 1024+1<<20)
	copy(b, "<<< QEMU VM Virtual Disk Image >>>\n")
	le := binary.LittleEndian
	le.PutUint32(b[0x40:], 0xbeda107f)
	le.PutUint32(b[0x44:], 0x00010001)
	le.PutUint32(b[0x48:], 0x180)
	le.PutUint32(b[0x4c:], 1)
	le.PutUint32(b[0x154:], 512)
	le.PutUint32(b[0x158:], 1024)
	le.PutUint32(b[0x168:], 512)
	le.PutUint64(b[0x170:], 4<<20)
	le.PutUint32(b[0x178:], 1<<20)
	le.PutUint32(b[0x180:], 4)
	le.PutUint32(b[0x184:], 1)
	for i := 0; i < 4; i++ {
		le.PutUint32(b[512+4*i:], 0xffffffff)
	}
	le.PutUint32(b[512+4:], 0)
	for i := 1024; i < len(b); i++ {
		b[i] = 0x5a
	}
	return b
}

// FuzzOpen: no file makes the driver panic, allocate without bound or
// return a short read without an error; it opens (and then reads, maps
// and checks) or fails with a sentinel error.
func FuzzOpen(f *testing.F) {
	seed := seedImage()
	f.Add(seed[:4096])
	f.Add(seed[:1024])
	dir := f.TempDir()
	if d, err := os.MkdirTemp("/dev/shm", "vdifuzz"); err == nil {
		dir = d
		f.Cleanup(func() { os.RemoveAll(d) })
	}
	path := filepath.Join(dir, "f.vdi")
	f.Fuzz(func(t *testing.T, data []byte) {
		// The fuzzer's mutations land in the header and the map; the
		// data area past them is the seed's, so blocks read something.
		img := make([]byte, max(len(data), 1024+1<<20))
		copy(img[1024:], seed[1024:])
		copy(img, data)
		if err := os.WriteFile(path, img, 0o644); err != nil {
			t.Fatal(err)
		}
		d, err := vdi.Open(path, drivers.OpenOptions{ReadOnly: true, NoDirectIO: true})
		if err != nil {
			if !errors.Is(err, drivers.ErrCorrupt) && !errors.Is(err, drivers.ErrUnsupported) {
				t.Fatalf("open failed without a sentinel: %v", err)
			}
			return
		}
		defer d.Close()
		driverstest.Poke(t, d)
		if _, err := d.Check(drivers.CheckOnly, nil); err != nil {
			t.Fatalf("check: %v", err)
		}
	})
}
