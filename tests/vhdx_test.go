package tests

import (
	"bytes"
	"encoding/binary"
	"hash/crc32"
	"os"
	"path/filepath"
	"testing"

	"imgfuse/drivers/driverstest"
)

// plantVHDXLog writes, with an encoder of its own ([MS-VHDX] 2.3), a log
// entry into a qemu-img VHDX image of 1 MiB blocks and sets its LogGuid:
// the entry makes block 5 fully present at the old end of the file and
// fills that block's last 4 KiB sector with 0x77, as a writer killed
// between its log write and the in-place writes would leave it.
func plantVHDXLog(t *testing.T, path string) {
	t.Helper()
	le := binary.LittleEndian
	crc := func(b []byte, at int) {
		le.PutUint32(b[at:], 0)
		le.PutUint32(b[at:], crc32.Checksum(b, crc32.MakeTable(crc32.Castagnoli)))
	}
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	hdr := b[64<<10 : 68<<10]
	if h2 := b[128<<10 : 132<<10]; le.Uint64(h2[8:]) > le.Uint64(hdr[8:]) {
		hdr = h2
	}
	logOff := int64(le.Uint64(hdr[72:]))
	// The BAT region: the region table entry whose GUID is
	// 2DC27766-F623-4200-9D64-115E9BFD4A08.
	batGUID := []byte{0x66, 0x77, 0xc2, 0x2d, 0x23, 0xf6, 0x00, 0x42, 0x9d, 0x64, 0x11, 0x5e, 0x9b, 0xfd, 0x4a, 0x08}
	var batOff int64
	rt := b[192<<10:]
	for i := 0; i < int(le.Uint32(rt[8:])); i++ {
		if e := rt[16+32*i:]; bytes.Equal(e[:16], batGUID) {
			batOff = int64(le.Uint64(e[16:]))
		}
	}
	if batOff == 0 {
		t.Fatal("no BAT region")
	}
	end := (int64(len(b)) + 1<<20 - 1) &^ (1<<20 - 1)
	batSec := bytes.Clone(b[batOff : batOff+4096])
	le.PutUint64(batSec[8*5:], uint64(end)|6)
	data := bytes.Repeat([]byte{0x77}, 4096)
	writes := []struct {
		off int64
		p   []byte
	}{{batOff, batSec}, {end + 1<<20 - 4096, data}}
	g := []byte("planted log guid")
	e := make([]byte, 3*4096)
	copy(e, "loge")
	le.PutUint32(e[8:], uint32(len(e)))
	le.PutUint64(e[16:], 1) // sequence number
	le.PutUint32(e[24:], uint32(len(writes)))
	copy(e[32:48], g)
	le.PutUint64(e[48:], uint64(len(b)))
	le.PutUint64(e[56:], uint64(end+1<<20))
	for i, w := range writes {
		d := e[64+32*i:]
		copy(d, "desc")
		copy(d[4:8], w.p[4092:])
		copy(d[8:16], w.p[:8])
		le.PutUint64(d[16:], uint64(w.off))
		le.PutUint64(d[24:], 1)
		s := e[4096*(i+1):]
		copy(s, "data")
		copy(s[8:4092], w.p[8:4092])
		le.PutUint32(s[4092:], 1)
	}
	crc(e, 4)
	copy(b[logOff:], e)
	copy(hdr[48:64], g)
	crc(hdr, 4)
	if err := os.WriteFile(path, b, 0o644); err != nil {
		t.Fatal(err)
	}
}

// TestVHDXDirtyLog: an image with a dirty log (QEMU refuses to open it
// read-only) mounts read-only and reads as QEMU's replay (qemu-img check
// -r all) makes it, without a byte of the file changed; info describes
// it; check exits as qemu-img check does (1: the log needs a replay);
// check -r all replays it (exit 0, as qemu-img), after which qemu-img
// check is clean (and check says what it says) and the image reads the
// same.
func TestVHDXDirtyLog(t *testing.T) {
	requireE2E(t)
	t.Parallel()
	dir := t.TempDir()
	img := filepath.Join(dir, "dirty.vhdx")
	driverstest.Cmd(t, "qemu-img", "create", "-q", "-f", "vhdx", "-o", "block_size=1M", img, "8M")
	driverstest.Cmd(t, "qemu-io", "-f", "vhdx", "-c", "write -P 0xaa 0 64k", "-c", "write -P 0xbb 3M 4k", img)
	plantVHDXLog(t, img)
	qemuCopy := filepath.Join(dir, "qemu.vhdx")
	driverstest.Cmd(t, "cp", img, qemuCopy)
	if code, out := exitCode(t, "qemu-img", "check", "-r", "all", "-f", "vhdx", qemuCopy); code != 0 {
		t.Fatalf("qemu-img check -r all (QEMU's replay): exit %d\n%s", code, out)
	}
	ref, err := os.ReadFile(driverstest.ConvertRefFormat(t, "vhdx", qemuCopy, "", t.TempDir()))
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(ref[6<<20-4096:6<<20], bytes.Repeat([]byte{0x77}, 4096)) {
		t.Fatal("QEMU's replay does not show the planted sector: the planted log is wrong")
	}

	sum := fileSum(t, img)
	mp, disk := mount(t, img, false, "--read-only")
	got, err := os.ReadFile(disk)
	if err != nil {
		t.Fatal(err)
	}
	unmount(t, mp)
	if !bytes.Equal(got, ref) {
		t.Error("the read-only mount differs from QEMU's replay")
	}
	if fileSum(t, img) != sum {
		t.Fatal("a read-only mount changed the image")
	}
	if r := imgfuse(t, nil, "info", img); r.code != 0 {
		t.Errorf("info of a dirty image: %v", r)
	}
	qcode, _ := exitCode(t, "qemu-img", "check", "-f", "vhdx", img)
	if r := imgfuse(t, nil, "check", img); r.code != qcode || fileSum(t, img) != sum {
		t.Errorf("check: exit %d, qemu-img check %d (the file changed: %v)\n%v", r.code, qcode, fileSum(t, img) != sum, r)
	}
	if r := imgfuse(t, nil, "check", "-r", "all", img); r.code != 0 {
		t.Errorf("check -r all: %v", r)
	}
	code, out := exitCode(t, "qemu-img", "check", "-f", "vhdx", img)
	if code != 0 {
		t.Errorf("qemu-img check after our replay: exit %d\n%s", code, out)
	}
	if r := imgfuse(t, nil, "check", img); r.code != 0 || r.stdout != out {
		t.Errorf("check of the replayed image says\n%v\nqemu-img check says\n%s", r, out)
	}
	mine, err := os.ReadFile(driverstest.ConvertRefFormat(t, "vhdx", img, "", t.TempDir()))
	if err != nil || !bytes.Equal(mine, ref) {
		t.Errorf("after our replay the image differs from QEMU's replay (%v)", err)
	}
}
