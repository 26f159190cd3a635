package fusefs

import (
	"os"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	"github.com/hanwen/go-fuse/v2/fuse"
	"golang.org/x/sys/unix"

	"imgfuse/drivers"
	"imgfuse/drivers/qcow2"
	"imgfuse/drivers/raw"
	"imgfuse/internal/testenv"
	"imgfuse/partition"
)

// allocMemDriver is a memDriver that reports alloc as its allocation.
type allocMemDriver struct {
	*memDriver
	alloc atomic.Int64
	calls atomic.Int64
}

var _ drivers.Allocator = (*allocMemDriver)(nil)

func (m *allocMemDriver) Allocated() int64 {
	m.calls.Add(1)
	return m.alloc.Load()
}

func TestShare(t *testing.T) {
	for _, c := range []struct {
		alloc, disk, part, want int64
	}{
		{0, 1 << 20, 1 << 10, 0},
		{1 << 20, 1 << 20, 1 << 10, 1 << 10},       // a full disk: full partitions
		{1 << 19, 1 << 20, 1 << 10, 1 << 9},        // half
		{2 << 20, 1 << 20, 1 << 10, 1 << 10},       // more than the disk: clamped
		{1, 3, 1, 0},                               // rounds down
		{-5, 1 << 20, 1 << 10, 0},                  // nonsense in, nothing out
		{1 << 20, 0, 1 << 10, 0},                   // empty disk
		{1 << 62, 1 << 62, 1 << 61, 1 << 61},       // no overflow
		{1<<62 - 1, 1 << 62, 1<<62 - 7, 1<<62 - 8}, // 128-bit product
	} {
		if got := share(c.alloc, c.disk, c.part); got != c.want {
			t.Errorf("share(%d, %d, %d) = %d, want %d", c.alloc, c.disk, c.part, got, c.want)
		}
	}
}

// statBlocks returns st_blocks of path, asking the daemon (no cached
// attributes) if force is set.
func statBlocks(t *testing.T, path string, force bool) int64 {
	t.Helper()
	flags := 0
	if force {
		flags = unix.AT_STATX_FORCE_SYNC
	}
	var st unix.Statx_t
	if err := unix.Statx(unix.AT_FDCWD, path, flags, unix.STATX_BLOCKS|unix.STATX_SIZE, &st); err != nil {
		t.Fatal(err)
	}
	return int64(st.Blocks)
}

// TestBlocks: st_blocks of the disk is the driver's Allocated (clamped to
// the size), of a partition its share of it, of a disk whose driver tells
// nothing its size; a write through the disk refreshes the disk's at once
// and the partitions' within their short attribute timeout.
func TestBlocks(t *testing.T) {
	const size = 1 << 20
	d := &allocMemDriver{memDriver: newMemDriver(mbrDisk(size))}
	d.alloc.Store(256 << 10)
	mp := t.TempDir()
	mountT(t, mp, d, Options{Name: "disk"})
	disk, part2 := filepath.Join(mp, "disk"), filepath.Join(mp, "part2") // 32 KiB
	if got := statBlocks(t, disk, false); got != 512 {
		t.Errorf("disk: %d blocks, want 512", got)
	}
	if got := statBlocks(t, part2, false); got != 16 {
		t.Errorf("part2: %d blocks, want 16 (a quarter of 32 KiB)", got)
	}

	// The allocation changes with a write through the disk.
	d.alloc.Store(3 << 20) // more than the disk: clamped
	f, err := os.OpenFile(disk, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt([]byte{1}, 4096); err != nil {
		t.Fatal(err)
	}
	f.Close()
	if got := statBlocks(t, disk, false); got != size/512 {
		t.Errorf("disk after a write: %d blocks, want %d", got, size/512)
	}
	deadline := time.Now().Add(3 * siblingTimeout)
	for statBlocks(t, part2, false) != 64 {
		if time.Now().After(deadline) {
			t.Fatalf("part2: %d blocks %v after the disk's write, want 64", statBlocks(t, part2, false), 3*siblingTimeout)
		}
		time.Sleep(50 * time.Millisecond)
	}

	// A driver that is not an Allocator shows its size, rounded up.
	mp2 := filepath.Join(t.TempDir(), "f")
	if err := os.WriteFile(mp2, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	mountT(t, mp2, newMemDriver(make([]byte, 1000)), Options{})
	if got := statBlocks(t, mp2, true); got != 2 {
		t.Errorf("a disk of 1000 bytes without Allocated: %d blocks, want 2", got)
	}
}

// TestAttrTimeout: only the files of a directory mount with partitions get
// the short attribute timeout.
func TestAttrTimeout(t *testing.T) {
	d := newMemDriver(mbrDisk(1 << 20))
	withParts := newDiskFS(d, Options{Name: "disk"}, true, []partition.Partition{{Number: 1, Start: 4096, Size: 8192}})
	plain := newDiskFS(d, Options{Name: "disk"}, true, nil)
	file := newDiskFS(d, Options{}, false, nil)
	for _, c := range []struct {
		fs   *diskFS
		ino  uint64
		want time.Duration
	}{
		{withParts, fuse.FUSE_ROOT_ID, cacheTimeout},
		{withParts, diskDirIno, siblingTimeout},
		{withParts, firstPartIno, siblingTimeout},
		{plain, diskDirIno, cacheTimeout},
		{file, fuse.FUSE_ROOT_ID, cacheTimeout},
	} {
		var out fuse.AttrOut
		if st := c.fs.GetAttr(nil, &fuse.GetAttrIn{InHeader: fuse.InHeader{NodeId: c.ino}}, &out); st != fuse.OK {
			t.Fatalf("GetAttr(%d): %v", c.ino, st)
		}
		if got := time.Duration(out.AttrValid)*time.Second + time.Duration(out.AttrValidNsec); got != c.want {
			t.Errorf("inode %d (%d partitions): attribute timeout %v, want %v", c.ino, len(c.fs.table.Load().parts), got, c.want)
		}
	}
}

// BenchmarkGetAttr measures what st_blocks costs a GETATTR: fillAttr alone
// (the handler) for drivers that tell nothing (memory), a sparse 1 TiB raw
// file, an empty 1 TiB qcow2 image, and a chain of two qcow2 layers over a
// raw base; and, for the first and the chain, the whole round trip of a
// stat through the mount that bypasses the attribute cache.
func BenchmarkGetAttr(b *testing.B) {
	const tib = 1 << 40
	dir := b.TempDir()
	rawPath := filepath.Join(dir, "base.raw")
	if err := os.WriteFile(rawPath, nil, 0o644); err != nil {
		b.Fatal(err)
	}
	if err := os.Truncate(rawPath, tib); err != nil {
		b.Fatal(err)
	}
	mid, top := filepath.Join(dir, "mid.qcow2"), filepath.Join(dir, "top.qcow2")
	for _, c := range []struct{ path, backing, format string }{
		{filepath.Join(dir, "empty.qcow2"), "", ""},
		{mid, rawPath, "raw"},
		{top, mid, "qcow2"},
	} {
		if err := qcow2.Create(c.path, qcow2.CreateOptions{Size: tib, BackingFile: c.backing, BackingFormat: c.format}); err != nil {
			b.Fatal(err)
		}
	}
	formats := []drivers.Format{qcow2.Format{}, raw.Format{}}
	open := func(b *testing.B, f drivers.Format, path string) drivers.Driver {
		d, err := f.Open(path, drivers.OpenOptions{ReadOnly: true, Formats: formats})
		if err != nil {
			b.Fatal(err)
		}
		b.Cleanup(func() { d.Close() })
		return d
	}
	cases := []struct {
		name string
		d    func(b *testing.B) drivers.Driver
	}{
		{"memory", func(b *testing.B) drivers.Driver { return newMemDriver(make([]byte, 1<<20)) }},
		{"raw-1TiB", func(b *testing.B) drivers.Driver { return open(b, raw.Format{}, rawPath) }},
		{"qcow2-1TiB", func(b *testing.B) drivers.Driver { return open(b, qcow2.Format{}, filepath.Join(dir, "empty.qcow2")) }},
		{"qcow2-chain3", func(b *testing.B) drivers.Driver { return open(b, qcow2.Format{}, top) }},
	}
	for _, c := range cases {
		b.Run("fillAttr/"+c.name, func(b *testing.B) {
			fs := newDiskFS(c.d(b), Options{}, false, nil)
			var a fuse.Attr
			for b.Loop() {
				fs.fillAttr(fuse.FUSE_ROOT_ID, &a)
			}
		})
	}
	for _, c := range []int{0, 3} {
		b.Run("stat/"+cases[c].name, func(b *testing.B) {
			requireFUSE(b)
			mp := filepath.Join(b.TempDir(), "f")
			if err := os.WriteFile(mp, nil, 0o644); err != nil {
				b.Fatal(err)
			}
			s, err := Mount(mp, cases[c].d(b), Options{})
			if err != nil {
				testenv.Skip(b, "mount: %v", err)
			}
			defer func() { s.Unmount(); s.Wait() }()
			var st unix.Statx_t
			for b.Loop() {
				if err := unix.Statx(unix.AT_FDCWD, mp, unix.AT_STATX_FORCE_SYNC, unix.STATX_BLOCKS, &st); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
