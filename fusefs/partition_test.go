package fusefs

import (
	"bytes"
	"encoding/binary"
	"errors"
	"log"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"

	"github.com/hanwen/go-fuse/v2/fuse"
	"golang.org/x/sys/unix"

	"imgfuse/drivers"
	"imgfuse/drivers/driverstest"
	"imgfuse/partition"
)

// putMBREntry writes MBR slot i (0–3) of the sector at sec.
func putMBREntry(sec []byte, i int, typ byte, start, count uint32) {
	p := sec[0x1BE+16*i:]
	p[4] = typ
	binary.LittleEndian.PutUint32(p[8:], start)
	binary.LittleEndian.PutUint32(p[12:], count)
	sec[510], sec[511] = 0x55, 0xAA
}

// mbrDisk returns size bytes of pattern holding an MBR: partition 1 at
// sectors 8+16, 2 at 64+64, an extended 3 at 256+128 whose one logical
// (5) is at 258+32.
func mbrDisk(size int) []byte {
	data := pattern(size, 3)
	clear(data[:512])
	putMBREntry(data, 0, 0x83, 8, 16)
	putMBREntry(data, 1, 0x83, 64, 64)
	putMBREntry(data, 2, 0x05, 256, 128)
	ebr := data[256*512 : 257*512]
	clear(ebr)
	putMBREntry(ebr, 0, 0x83, 2, 32)
	return data
}

func TestOpenFlagsPartition(t *testing.T) {
	parts := []partition.Partition{{Number: 1, Start: 4096, Size: 8192}}
	for _, c := range []struct {
		name     string
		readOnly bool
		flags    uint32
		status   fuse.Status
		fh       uint64
	}{
		{"read", false, syscall.O_RDONLY, fuse.OK, 0},
		{"read-write", false, syscall.O_RDWR, fuse.OK, fhWrite},
		{"read-only mount, read", true, syscall.O_RDONLY, fuse.OK, 0},
		{"read-only mount, write", true, syscall.O_WRONLY, fuse.EROFS, 0},
	} {
		t.Run(c.name, func(t *testing.T) {
			fs := newDiskFS(newMemDriver(make([]byte, 65536)), Options{Name: "disk", ReadOnly: c.readOnly}, true, parts)
			fs.backingID = 7 // the disk is passed through; its partitions never
			var out fuse.OpenOut
			st := onLoop(fs).Open(nil, &fuse.OpenIn{InHeader: fuse.InHeader{NodeId: firstPartIno}, Flags: c.flags}, &out)
			if st != c.status {
				t.Fatalf("status %v, want %v", st, c.status)
			}
			if st != fuse.OK {
				return
			}
			if want := uint32(fuse.FOPEN_DIRECT_IO | fuse.FOPEN_PARALLEL_DIRECT_WRITES); out.OpenFlags != want || out.BackingID != 0 || out.Fh != c.fh {
				t.Errorf("open flags %#x backing %d fh %d, want %#x, 0, %d", out.OpenFlags, out.BackingID, out.Fh, want, c.fh)
			}
		})
	}
}

// TestPartitionFiles: the directory lists part1, part2 and part5 (not the
// extended 3); each reads, writes (clamped at its end), discards and
// zeroes its own byte range of the disk; a write at its end is ENOSPC.
// The disk is a raw image with passthrough when the kernel offers it:
// a partition's reads still reach the driver, alongside a passed-through
// open of the disk.
func TestPartitionFiles(t *testing.T) {
	const size = 1 << 20
	model := mbrDisk(size)
	c, s, image, disk := mountCounting(t, model, drivers.OpenOptions{}, Options{})
	mp := filepath.Dir(disk)
	names := dirNames(t, mp)
	if want := []string{"disk", "part1", "part2", "part5"}; !slices.Equal(names, want) {
		t.Fatalf("directory %v, want %v", names, want)
	}
	if n := len(s.Partitions()); n != 3 {
		t.Errorf("Server.Partitions: %d", n)
	}
	type win struct {
		name       string
		start, len int64
	}
	wins := []win{{"part1", 8 * 512, 16 * 512}, {"part2", 64 * 512, 64 * 512}, {"part5", 258 * 512, 32 * 512}}
	for _, w := range wins {
		fi, err := os.Stat(filepath.Join(mp, w.name))
		if err != nil || fi.Size() != w.len || !fi.Mode().IsRegular() {
			t.Fatalf("stat %s: %v, %v", w.name, fi, err)
		}
		got, err := os.ReadFile(filepath.Join(mp, w.name))
		if err != nil || !bytes.Equal(got, model[w.start:w.start+w.len]) {
			t.Errorf("read %s: %d bytes, %v", w.name, len(got), err)
		}
	}

	// Reads of a partition reach the driver even while the disk is open
	// (and passed through, when the kernel can) for reading.
	dfd, err := unix.Open(disk, unix.O_RDONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(dfd)
	before := c.reads.Load()
	if _, err := unix.Pread(dfd, make([]byte, 4096), 0); err != nil {
		t.Fatal(err)
	}
	if on, why := s.Passthrough(); !on {
		t.Logf("passthrough off (%s): only the partition's reads are checked", why)
	} else if c.reads.Load() != before {
		t.Error("a read of the passed-through disk reached the driver")
	}
	pfd, err := unix.Open(filepath.Join(mp, "part2"), unix.O_RDONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	before = c.reads.Load()
	buf := make([]byte, 4096)
	if n, err := unix.Pread(pfd, buf, 512); err != nil || n != 4096 || !bytes.Equal(buf, model[64*512+512:][:4096]) {
		t.Errorf("pread part2: %d, %v", n, err)
	}
	if c.reads.Load() == before {
		t.Error("a read of a partition did not reach the driver")
	}
	unix.Close(pfd)

	// Writes: one crossing the end writes what fits, one at the end fails.
	p1 := wins[0]
	fd, err := unix.Open(filepath.Join(mp, "part1"), unix.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	w := pattern(8192, 99)
	if n, err := unix.Pwrite(fd, w, p1.len-4096); err != nil || n != 4096 {
		t.Errorf("write crossing the end: %d, %v; want 4096", n, err)
	}
	copy(model[p1.start+p1.len-4096:], w[:4096])
	if n, err := unix.Pwrite(fd, w, p1.len); !errors.Is(err, syscall.ENOSPC) {
		t.Errorf("write at the end: %d, %v; want ENOSPC", n, err)
	}
	// Punch a hole and zero a range, the latter crossing the end.
	if err := unix.Fallocate(fd, unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, 0, 1024); err != nil {
		t.Errorf("punch hole: %v", err)
	}
	clear(model[p1.start : p1.start+1024])
	if err := unix.Fallocate(fd, unix.FALLOC_FL_ZERO_RANGE|unix.FALLOC_FL_KEEP_SIZE, 2048, 1<<20); err != nil {
		t.Errorf("zero range: %v", err)
	}
	clear(model[p1.start+2048 : p1.start+p1.len])
	if err := unix.Ftruncate(fd, 0); !errors.Is(err, syscall.EPERM) {
		t.Errorf("truncate a partition: %v; want EPERM", err)
	}
	if err := unix.Fsync(fd); err != nil {
		t.Errorf("fsync: %v", err)
	}
	got, err := os.ReadFile(image)
	if err != nil || !bytes.Equal(got, model) {
		t.Errorf("image after partition writes differs (%v)", err)
	}
}

func TestPartitionSeekDataHole(t *testing.T) {
	const k = 65536
	d := newMemDriver(make([]byte, 5*k))
	putMBREntry(d.data, 0, 0x83, k/512, 3*k/512) // [k, 4k)
	d.extents = []drivers.Extent{
		{Off: 0, Len: k, Flags: drivers.ExtentData},
		{Off: k, Len: 2 * k, Flags: 0},
		{Off: 3 * k, Len: k, Flags: drivers.ExtentData},
		{Off: 4 * k, Len: k, Flags: drivers.ExtentData},
	}
	mp := t.TempDir()
	mountT(t, mp, d, Options{})
	f, err := os.Open(filepath.Join(mp, "part1"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	driverstest.CheckSeeks(t, f, []driverstest.Seek{
		{Off: 0, Whence: unix.SEEK_DATA, Want: 2 * k},
		{Off: 0, Whence: unix.SEEK_HOLE, Want: 0},
		{Off: 2*k + 1, Whence: unix.SEEK_DATA, Want: 2*k + 1},
		{Off: 2 * k, Whence: unix.SEEK_HOLE, Want: 3 * k}, // the end, though the disk goes on
		{Off: 3 * k, Whence: unix.SEEK_DATA, Err: syscall.ENXIO},
		{Off: 3 * k, Whence: unix.SEEK_HOLE, Err: syscall.ENXIO},
	})
}

func TestPartitionReadOnly(t *testing.T) {
	mp := t.TempDir()
	mountT(t, mp, newMemDriver(mbrDisk(1<<20)), Options{ReadOnly: true})
	if _, err := os.OpenFile(filepath.Join(mp, "part1"), os.O_RDWR, 0); !errors.Is(err, syscall.EROFS) {
		t.Errorf("open part1 for writing: %v; want EROFS", err)
	}
	if _, err := os.ReadFile(filepath.Join(mp, "part5")); err != nil {
		t.Errorf("read part5: %v", err)
	}
}

// A malformed table is logged once and leaves only the disk; a file
// mountpoint has no partitions.
func TestPartitionMalformedAndFileMount(t *testing.T) {
	data := mbrDisk(1 << 20)
	ebr := data[256*512 : 257*512]
	putMBREntry(ebr, 1, 0x05, 0, 8) // the EBR links to itself
	var logBuf bytes.Buffer
	mp := t.TempDir()
	s := mountT(t, mp, newMemDriver(data), Options{Logger: log.New(&logBuf, "", 0)})
	ents, err := os.ReadDir(mp)
	if err != nil || len(ents) != 1 || ents[0].Name() != "disk" || len(s.Partitions()) != 0 {
		t.Errorf("directory %v, %v; want only disk", ents, err)
	}
	if lines := strings.Split(strings.TrimSpace(logBuf.String()), "\n"); len(lines) != 1 || !strings.Contains(lines[0], "loops") {
		t.Errorf("log %q", logBuf.String())
	}

	file := filepath.Join(t.TempDir(), "disk")
	if err := os.WriteFile(file, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if s := mountT(t, file, newMemDriver(mbrDisk(1<<20)), Options{}); len(s.Partitions()) != 0 {
		t.Errorf("file mountpoint has %d partitions", len(s.Partitions()))
	}
}
