package fusefs

import (
	"imgfuse/coroutine"

	"bytes"
	"errors"
	"log"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/hanwen/go-fuse/v2/fuse"
	"golang.org/x/sys/unix"
)

// syncBuffer is a log destination safe for the daemon's goroutines.
type syncBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuffer) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuffer) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

func inoOf(t *testing.T, path string) uint64 {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	return st.Ino
}

func sizeOf(t *testing.T, path string) int64 {
	t.Helper()
	fi, err := os.Stat(path)
	if err != nil {
		t.Fatal(err)
	}
	return fi.Size()
}

// TestPartitionTableFollowsWrites: a new MBR written through the disk and
// fsynced shows at once: a partition whose range is unchanged keeps its
// inode and its open handle works; one whose size changed gets a new
// inode, and the handle opened before refuses I/O with ESTALE without
// touching the old range; a vanished extended chain takes its logical
// partition away; a new slot appears. Cached entries, attributes and the
// cached listing were all looked at before the change.
func TestPartitionTableFollowsWrites(t *testing.T) {
	const size = 1 << 20
	d := newMemDriver(mbrDisk(size))
	var logBuf syncBuffer
	mp := t.TempDir()
	s := mountT(t, mp, d, Options{Logger: log.New(&logBuf, "", 0)})
	path := func(n string) string { return filepath.Join(mp, n) }
	if got := dirNames(t, mp); !slices.Equal(got, []string{"disk", "part1", "part2", "part5"}) {
		t.Fatalf("directory %v", got)
	}
	ino1, ino2 := inoOf(t, path("part1")), inoOf(t, path("part2"))
	if sizeOf(t, path("part2")) != 64*512 {
		t.Fatal("part2 size before")
	}
	if _, err := os.Stat(path("part4")); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("part4 before: %v", err) // and the kernel caches the miss
	}
	p1, err := os.OpenFile(path("part1"), os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer p1.Close()
	p2, err := os.OpenFile(path("part2"), os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer p2.Close()

	// The new table: 1 as it was, 2 half as long, no extended 3, a new 4.
	mbr := make([]byte, 512)
	putMBREntry(mbr, 0, 0x83, 8, 16)
	putMBREntry(mbr, 1, 0x83, 64, 32)
	putMBREntry(mbr, 3, 0x83, 512, 256)
	writeSynced(t, path("disk"), mbr, 0)

	if got := dirNames(t, mp); !slices.Equal(got, []string{"disk", "part1", "part2", "part4"}) {
		t.Errorf("directory after the new table %v", got)
	}
	if got := sizeOf(t, path("part2")); got != 32*512 {
		t.Errorf("part2 is %d bytes, want %d", got, 32*512)
	}
	if got := sizeOf(t, path("part4")); got != 256*512 {
		t.Errorf("part4 is %d bytes, want %d", got, 256*512)
	}
	if _, err := os.Stat(path("part5")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("part5 after the extended partition went: %v", err)
	}
	if got := inoOf(t, path("part1")); got != ino1 {
		t.Errorf("part1 changed inode %d → %d with an unchanged range", ino1, got)
	}
	if got := inoOf(t, path("part2")); got == ino2 {
		t.Errorf("part2 kept inode %d with a new range", got)
	}
	if n := len(s.Partitions()); n != 3 {
		t.Errorf("Server.Partitions: %d", n)
	}

	// The stale handle: no I/O, not even a read, and no byte of the old
	// range written.
	before := d.snapshot()
	buf := make([]byte, 512)
	if _, err := p2.ReadAt(buf, 0); !errors.Is(err, syscall.ESTALE) {
		t.Errorf("read through the stale part2: %v; want ESTALE", err)
	}
	if _, err := p2.WriteAt(pattern(512, 5), 40*512); !errors.Is(err, syscall.ESTALE) {
		t.Errorf("write through the stale part2: %v; want ESTALE", err)
	}
	if err := unix.Fallocate(int(p2.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, 0, 4096); !errors.Is(err, syscall.ESTALE) {
		t.Errorf("punch hole through the stale part2: %v; want ESTALE", err)
	}
	if !bytes.Equal(d.snapshot(), before) {
		t.Error("the stale handle changed the disk")
	}

	// The unchanged partition's handle goes on, at its range.
	w := pattern(1024, 6)
	if _, err := p1.WriteAt(w, 512); err != nil {
		t.Errorf("write through part1 opened before: %v", err)
	}
	if got := d.snapshot()[8*512+512:][:1024]; !bytes.Equal(got, w) {
		t.Error("part1's write did not land at its range")
	}
	if _, err := p1.ReadAt(buf, 0); err != nil {
		t.Errorf("read through part1 opened before: %v", err)
	}
	if l := logBuf.String(); !strings.Contains(l, "partition table changed: part2 now 32768+16384 (was 32768+32768), part5 removed, part4 added") {
		t.Errorf("log %q", l)
	}
}

// TestPartitionTableBeforeLookup: a table written and not yet flushed
// (the writer keeps its descriptor) shows at the next listing or lookup,
// even though the kernel cached the listing.
func TestPartitionTableBeforeLookup(t *testing.T) {
	d := newMemDriver(mbrDisk(1 << 20))
	mp := t.TempDir()
	mountT(t, mp, d, Options{Logger: log.New(&syncBuffer{}, "", 0)})
	if got := dirNames(t, mp); !slices.Equal(got, []string{"disk", "part1", "part2", "part5"}) {
		t.Fatalf("directory %v", got)
	}
	disk, err := os.OpenFile(filepath.Join(mp, "disk"), os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer disk.Close()
	// Logical 5 moves in its EBR (sector 256): 4 sectors later.
	ebr := make([]byte, 512)
	putMBREntry(ebr, 0, 0x83, 6, 32)
	if _, err := disk.WriteAt(ebr, 256*512); err != nil {
		t.Fatal(err)
	}
	if got := dirNames(t, mp); !slices.Equal(got, []string{"disk", "part1", "part2", "part5"}) {
		t.Fatalf("directory %v", got)
	}
	// The data of the moved partition, through a new open by path.
	got, err := os.ReadFile(filepath.Join(mp, "part5"))
	if err != nil || !bytes.Equal(got, d.snapshot()[262*512:][:32*512]) {
		t.Errorf("part5 after its EBR moved it: %d bytes, %v", len(got), err)
	}
}

// TestNoteWrite: only writes, discards and zeroing that meet what the
// table was read from (the MBR, an EBR; the GPT headers and arrays) mark
// the table for a re-read; reads and writes elsewhere do not, and a
// read-only or file mount never does.
func TestNoteWrite(t *testing.T) {
	type op struct {
		name   string
		ino    uint64
		off, n uint64
		zero   bool
		dirty  bool
	}
	for _, c := range []op{
		{"MBR", diskDirIno, 0, 512, false, true},
		{"last byte of the MBR", diskDirIno, 511, 1, false, true},
		{"just after the MBR", diskDirIno, 512, 512, false, false},
		{"EBR", diskDirIno, 256 * 512, 4096, false, true},
		{"ending at the EBR", diskDirIno, 255 * 512, 512, false, false},
		{"across the EBR", diskDirIno, 200 * 512, 100 * 512, false, true},
		{"data", diskDirIno, 64 * 512, 4096, false, false},
		{"partition 1", firstPartIno, 0, 4096, false, false},
		{"discard over the EBR", diskDirIno, 256 * 512, 512, true, true},
		{"discard elsewhere", diskDirIno, 300 * 512, 512, true, false},
	} {
		t.Run(c.name, func(t *testing.T) {
			fs := newDiskFS(newMemDriver(mbrDisk(1<<20)), Options{Name: "disk", Logger: log.New(&syncBuffer{}, "", 0)}, true, nil)
			fs.readTable()
			if c.zero {
				st := onLoop(fs).Fallocate(nil, &fuse.FallocateIn{InHeader: fuse.InHeader{NodeId: c.ino}, Offset: c.off, Length: c.n,
					Mode: unix.FALLOC_FL_PUNCH_HOLE | unix.FALLOC_FL_KEEP_SIZE})
				if st != fuse.OK {
					t.Fatal(st)
				}
			} else if n, st := onLoop(fs).Write(nil, &fuse.WriteIn{InHeader: fuse.InHeader{NodeId: c.ino}, Offset: c.off}, make([]byte, c.n)); st != fuse.OK || uint64(n) != c.n {
				t.Fatal(n, st)
			}
			if got := fs.tableDirty.Load(); got != c.dirty {
				t.Errorf("table marked for a re-read: %v, want %v", got, c.dirty)
			}
		})
	}
	// A regular-file mountpoint has no partitions to follow.
	fs := newDiskFS(newMemDriver(mbrDisk(1<<20)), Options{}, false, nil)
	if _, st := onLoop(fs).Write(nil, &fuse.WriteIn{InHeader: fuse.InHeader{NodeId: fuse.FUSE_ROOT_ID}}, make([]byte, 512)); st != fuse.OK || fs.tableDirty.Load() {
		t.Errorf("file mount: %v, dirty %v", st, fs.tableDirty.Load())
	}
}

// TestFootprintOverlaps checks the binary search against a linear scan.
func TestFootprintOverlaps(t *testing.T) {
	tab := &partTable{footprint: []diskRange{{0, 512}, {1024, 2048}, {4096, 4608}, {10000, 10001}}}
	for off := int64(-10); off < 10100; off += 7 {
		for _, n := range []int64{0, 1, 100, 600, 5000} {
			want := false
			for _, r := range tab.footprint {
				if n > 0 && off < r.end && r.off < off+n {
					want = true
				}
			}
			if got := tab.overlaps(off, n); got != want {
				t.Fatalf("overlaps(%d, %d) = %v, want %v", off, n, got, want)
			}
		}
	}
	if (&partTable{}).overlaps(0, 1) {
		t.Error("an empty footprint overlaps")
	}
}

// TestFootprintRecorded: the footprint is what the parser read, merged.
func TestFootprintRecorded(t *testing.T) {
	_, fp := readPartitions(newMemDriver(mbrDisk(1<<20)), log.New(&syncBuffer{}, "", 0))
	if want := []diskRange{{0, 512}, {256 * 512, 257 * 512}}; !slices.Equal(fp, want) {
		t.Errorf("MBR footprint %v, want %v", fp, want)
	}
}

func dirNames(t *testing.T, dir string) []string {
	t.Helper()
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range ents {
		names = append(names, e.Name())
	}
	return names
}

// TestTableChecksAllocateNothing: what every write and every partition
// request adds for the table – the footprint check and the partition
// lookup with its read lock – allocates nothing.
func TestTableChecksAllocateNothing(t *testing.T) {
	fs := newDiskFS(newMemDriver(mbrDisk(1<<20)), Options{Name: "disk", Logger: log.New(&syncBuffer{}, "", 0)}, true, nil)
	fs.readTable()
	p5 := fs.table.Load().byName["part5"]
	var allocs float64
	var ok, locked bool
	coroutine.Run(func(co *coroutine.Co) {
		allocs = testing.AllocsPerRun(200, func() {
			fs.noteWrite(64*512, 4096)
			fs.noteWrite(256*512, 512)
			_, _, _, ok, locked = fs.window(co, p5)
			if ok && locked {
				fs.ioMu.RUnlock()
			}
		})
	})
	if !ok || !locked {
		t.Fatal("part5 has no window")
	}
	if allocs != 0 {
		t.Errorf("%v allocations per write check and partition lookup", allocs)
	}
	if !fs.tableDirty.Load() {
		t.Error("the write over the EBR was not noted")
	}
}

// TestPartitionTableUnderLoad: writers and readers keep going on part2
// while the table moves part2 elsewhere. Once the fsync that published the
// new table has returned, no write reaches the old range (the writers
// stop at their first ESTALE), and the new part2 is a new file.
func TestPartitionTableUnderLoad(t *testing.T) {
	d := newMemDriver(mbrDisk(1 << 20))
	mp := t.TempDir()
	mountT(t, mp, d, Options{Logger: log.New(&syncBuffer{}, "", 0)})
	old := diskRange{64 * 512, 128 * 512}
	var wg sync.WaitGroup
	errs := make(chan error, 4)
	for i := range 4 {
		f, err := os.OpenFile(filepath.Join(mp, "part2"), os.O_RDWR, 0)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		wg.Add(1)
		go func() {
			defer wg.Done()
			buf := bytes.Repeat([]byte{byte(0xE0 + i)}, 4096)
			for n := 0; ; n++ {
				off := int64(n%8) * 4096
				var err error
				if i%2 == 0 {
					_, err = f.WriteAt(buf, off)
				} else {
					_, err = f.ReadAt(buf, off)
				}
				if err != nil {
					errs <- err
					return
				}
			}
		}()
	}
	mbr := d.snapshot()[:512]
	putMBREntry(mbr, 1, 0x83, 128, 64) // part2 moves just past its old end
	writeSynced(t, filepath.Join(mp, "disk"), mbr, 0)
	after := d.snapshot()[old.off:old.end]
	done := make(chan struct{})
	go func() { wg.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("requests on the old part2 still succeed 10 s after the new table")
	}
	close(errs)
	for err := range errs {
		if !errors.Is(err, syscall.ESTALE) {
			t.Errorf("a request on the old part2 ended with %v; want ESTALE", err)
		}
	}
	if !bytes.Equal(d.snapshot()[old.off:old.end], after) {
		t.Error("the old part2 range was written after the new table was out")
	}
	if !bytes.Equal(d.snapshot()[128*512:192*512], mbrDisk(1 << 20)[128*512:192*512]) {
		t.Error("the new part2 range was written through an old handle")
	}
}

// writeSynced writes p at off of the file at path and fsyncs it, as a
// partitioning tool does.
func writeSynced(t *testing.T, path string, p []byte, off int64) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteAt(p, off); err != nil {
		t.Fatal(err)
	}
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
}
