package fusefs

import (
	"bytes"
	"errors"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"syscall"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"imgfuse/drivers"
	"imgfuse/internal/testenv"
)

// requireFUSE skips a test that needs a kernel FUSE mount when /dev/fuse is
// missing, or fails it where coverage is required (testenv.Skip).
func requireFUSE(t testing.TB) {
	t.Helper()
	if _, err := os.Stat("/dev/fuse"); err != nil {
		testenv.Skip(t, "no /dev/fuse: %v", err)
	}
}

// mountT mounts d at mp and unmounts it when the test ends.
func mountT(t *testing.T, mp string, d drivers.Driver, opts Options) *Server {
	t.Helper()
	requireFUSE(t)
	s, err := Mount(mp, d, opts)
	if err != nil {
		t.Fatalf("Mount(%s): %v", mp, err)
	}
	t.Cleanup(func() {
		if err := s.Unmount(); err != nil {
			t.Errorf("Unmount: %v", err)
		}
		waitT(t, s)
	})
	return s
}

func waitT(t *testing.T, s *Server) {
	t.Helper()
	done := make(chan struct{})
	go func() { s.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		t.Fatal("Wait did not return after Unmount")
	}
}

func pattern(n int, seed uint64) []byte {
	r := rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15))
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(r.Uint32())
	}
	return b
}

// alignedBuf returns n bytes at a 4096-aligned address, for O_DIRECT.
func alignedBuf(n int) []byte {
	b := make([]byte, n+4096)
	skip := (4096 - int(uintptr(unsafe.Pointer(&b[0]))%4096)) % 4096
	return b[skip : skip+n]
}

// diskSize is deliberately not a multiple of 4096.
const diskSize = 1<<20 + 1234

func TestMountDirectory(t *testing.T) {
	for _, tc := range []struct{ name, want string }{
		{"", "disk"},
		{"image.raw", "image.raw"},
	} {
		t.Run(tc.want, func(t *testing.T) {
			data := pattern(diskSize, 1)
			mp := t.TempDir()
			mountT(t, mp, newMemDriver(slices.Clone(data)), Options{Name: tc.name})

			var st syscall.Stat_t
			if err := syscall.Stat(filepath.Join(mp, tc.want), &st); err != nil {
				t.Fatal(err)
			}
			if st.Mode != syscall.S_IFREG|0o644 || st.Size != diskSize || st.Nlink != 1 ||
				st.Uid != uint32(os.Getuid()) || st.Gid != uint32(os.Getgid()) ||
				st.Blocks != (diskSize+511)/512 {
				t.Errorf("stat: mode %o size %d nlink %d uid %d gid %d blocks %d",
					st.Mode, st.Size, st.Nlink, st.Uid, st.Gid, st.Blocks)
			}
			ents, err := os.ReadDir(mp)
			if err != nil {
				t.Fatal(err)
			}
			if len(ents) != 1 || ents[0].Name() != tc.want || !ents[0].Type().IsRegular() {
				t.Errorf("ReadDir = %v, want one regular file %q", ents, tc.want)
			}
			if _, err := os.Stat(filepath.Join(mp, "other")); !errors.Is(err, os.ErrNotExist) {
				t.Errorf("stat of a missing name: %v, want ENOENT", err)
			}
			got, err := os.ReadFile(filepath.Join(mp, tc.want))
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, data) {
				t.Errorf("whole read differs (got %d bytes)", len(got))
			}
		})
	}
}

func TestMountFile(t *testing.T) {
	data := pattern(diskSize, 2)
	mp := filepath.Join(t.TempDir(), "disk.img")
	if err := os.WriteFile(mp, []byte("placeholder"), 0o600); err != nil {
		t.Fatal(err)
	}
	mountT(t, mp, newMemDriver(slices.Clone(data)), Options{})
	fi, err := os.Stat(mp)
	if err != nil {
		t.Fatal(err)
	}
	if !fi.Mode().IsRegular() || fi.Size() != diskSize {
		t.Errorf("stat: mode %v size %d", fi.Mode(), fi.Size())
	}
	got, err := os.ReadFile(mp)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, data) {
		t.Errorf("whole read differs (got %d bytes)", len(got))
	}
}

func TestReads(t *testing.T) {
	data := pattern(diskSize, 3)
	mp := t.TempDir()
	d := &directMemDriver{memDriver: newMemDriver(slices.Clone(data))}
	mountT(t, mp, d, Options{})
	path := filepath.Join(mp, "disk")

	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	df, err := os.OpenFile(path, os.O_RDONLY|syscall.O_DIRECT, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer df.Close()

	for _, tc := range []struct {
		name    string
		direct  bool
		off     int64
		n, want int
	}{
		{"start", false, 0, 4096, 4096},
		{"unaligned", false, 1234, 5000, 5000},
		{"max request", false, 4096, 1 << 20, diskSize - 4096},
		{"crossing the end", false, diskSize - 100, 4096, 100},
		{"at the end", false, diskSize, 10, 0},
		{"past the end", false, diskSize + 4096, 10, 0},
		{"O_DIRECT aligned", true, 8192, 65536, 65536},
		{"O_DIRECT unaligned", true, 700, 100, 100},
		{"O_DIRECT crossing the end", true, diskSize - 1234, 4096, 1234},
	} {
		t.Run(tc.name, func(t *testing.T) {
			buf := alignedBuf(tc.n)
			file := f
			if tc.direct {
				file = df
			}
			n, err := file.ReadAt(buf, tc.off)
			if n != tc.want || (n < tc.n && err != io.EOF) || (n == tc.n && err != nil) {
				t.Fatalf("ReadAt(%d, %d) = %d, %v; want %d", tc.n, tc.off, n, err, tc.want)
			}
			if n > 0 && !bytes.Equal(buf[:n], data[tc.off:tc.off+int64(n)]) {
				t.Errorf("data differs")
			}
		})
	}
	if d.directReads() == 0 {
		t.Errorf("no read took the DirectReader path")
	}
}

func TestMmapShared(t *testing.T) {
	data := pattern(diskSize, 4)
	mp := t.TempDir()
	mountT(t, mp, newMemDriver(slices.Clone(data)), Options{})
	f, err := os.Open(filepath.Join(mp, "disk"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	m, err := unix.Mmap(int(f.Fd()), 0, diskSize, unix.PROT_READ, unix.MAP_SHARED)
	if err != nil {
		t.Fatalf("mmap MAP_SHARED of the disk: %v", err)
	}
	defer unix.Munmap(m)
	// A page fault on our own FUSE mount blocks a thread the Go runtime
	// believes is running, so a garbage collection would wait for it while
	// the server that must answer the fault waits for the collection.
	// mlock faults every page in from inside a system call, and keeps
	// them resident for the comparison.
	if err := unix.Mlock(m); err != nil {
		t.Fatalf("mlock: %v", err)
	}
	defer unix.Munlock(m)
	if !bytes.Equal(m, data) {
		t.Error("mmap contents differ")
	}
}

func TestReadOnly(t *testing.T) {
	data := pattern(diskSize, 5)
	mp := t.TempDir()
	d := newMemDriver(slices.Clone(data))
	mountT(t, mp, d, Options{ReadOnly: true})
	path := filepath.Join(mp, "disk")

	for _, flag := range []int{os.O_RDWR, os.O_WRONLY} {
		f, err := os.OpenFile(path, flag, 0)
		if err == nil {
			f.Close()
		}
		if !errors.Is(err, syscall.EROFS) {
			t.Errorf("open(%#x) = %v, want EROFS (we run as uid %d)", flag, err, os.Getuid())
		}
	}
	var st syscall.Stat_t
	if err := syscall.Stat(path, &st); err != nil {
		t.Fatal(err)
	}
	if st.Mode != syscall.S_IFREG|0o444 {
		t.Errorf("mode %o, want 0100444", st.Mode)
	}
	if err := os.Truncate(path, 4096); !errors.Is(err, syscall.EROFS) {
		t.Errorf("truncate = %v, want EROFS", err)
	}
	// The mount itself is read-only, so the kernel refuses what the
	// handlers would let through: SetAttr accepts and ignores a mode
	// change on any mount.
	var sfs syscall.Statfs_t
	if err := syscall.Statfs(mp, &sfs); err != nil {
		t.Fatal(err)
	}
	if sfs.Flags&unix.ST_RDONLY == 0 {
		t.Errorf("statfs flags %#x: no ST_RDONLY", sfs.Flags)
	}
	if err := os.Chmod(path, 0o644); !errors.Is(err, syscall.EROFS) {
		t.Errorf("chmod = %v, want EROFS from the kernel", err)
	}
	got, err := os.ReadFile(path)
	if err != nil || !bytes.Equal(got, data) {
		t.Errorf("read on a read-only mount: %d bytes, %v", len(got), err)
	}
	d.mu.Lock()
	if len(d.truncates) != 0 || len(d.writes) != 0 {
		t.Errorf("driver saw writes %v truncates %v", d.writes, d.truncates)
	}
	d.mu.Unlock()
}

// TestWritableMountNotReadOnly: the control of TestReadOnly's statfs and
// chmod checks: a writable mount is not ST_RDONLY and takes (and ignores)
// a mode change.
func TestWritableMountNotReadOnly(t *testing.T) {
	mp := t.TempDir()
	mountT(t, mp, newMemDriver(make([]byte, diskSize)), Options{})
	var sfs syscall.Statfs_t
	if err := syscall.Statfs(mp, &sfs); err != nil {
		t.Fatal(err)
	}
	if sfs.Flags&unix.ST_RDONLY != 0 {
		t.Errorf("statfs flags %#x: ST_RDONLY on a writable mount", sfs.Flags)
	}
	if err := os.Chmod(filepath.Join(mp, "disk"), 0o644); err != nil {
		t.Errorf("chmod on a writable mount: %v", err)
	}
}

func TestModTime(t *testing.T) {
	mtime := time.Date(2021, 3, 4, 5, 6, 7, 123456789, time.UTC)
	mp := t.TempDir()
	mountT(t, mp, newMemDriver(make([]byte, diskSize)), Options{ModTime: mtime})
	path := filepath.Join(mp, "disk")
	for i := range 3 {
		var st syscall.Stat_t
		if err := syscall.Stat(path, &st); err != nil {
			t.Fatal(err)
		}
		for name, ts := range map[string]syscall.Timespec{"mtime": st.Mtim, "ctime": st.Ctim, "atime": st.Atim} {
			if got := time.Unix(ts.Unix()); !got.Equal(mtime) {
				t.Errorf("stat %d: %s = %v, want %v", i, name, got, mtime)
			}
		}
		// Reads and writes in between must not move the times.
		// (O_TRUNC would resize the disk: open without it.)
		f, err := os.OpenFile(path, os.O_WRONLY, 0)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := f.WriteAt([]byte("x"), 4096); err != nil {
			t.Fatal(err)
		}
		f.Close()
		if _, err := os.ReadFile(path); err != nil {
			t.Fatal(err)
		}
	}
}

func TestSeekDataHole(t *testing.T) {
	const k = 65536
	const size = 5 * k
	d := newMemDriver(make([]byte, size))
	d.extents = []drivers.Extent{
		{Off: 0, Len: k, Flags: drivers.ExtentData},
		{Off: k, Len: 2 * k, Flags: 0},
		{Off: 3 * k, Len: k, Flags: drivers.ExtentData | drivers.ExtentZero},
		{Off: 4 * k, Len: k, Flags: drivers.ExtentZero},
	}
	allData := newMemDriver(make([]byte, size))
	for _, tc := range []struct {
		name   string
		d      *memDriver
		off    int64
		whence int
		want   int64
		err    error
	}{
		{"data in data", d, 100, unix.SEEK_DATA, 100, nil},
		{"data in hole", d, k + 5, unix.SEEK_DATA, 3 * k, nil},
		{"data in trailing hole", d, 4*k + 1, unix.SEEK_DATA, 0, syscall.ENXIO},
		{"hole in data", d, 0, unix.SEEK_HOLE, k, nil},
		{"hole in hole", d, k, unix.SEEK_HOLE, k, nil},
		{"hole after zero data", d, 3 * k, unix.SEEK_HOLE, 4 * k, nil},
		{"data at end", d, size, unix.SEEK_DATA, 0, syscall.ENXIO},
		{"hole at end", d, size, unix.SEEK_HOLE, 0, syscall.ENXIO},
		{"hole in all data", allData, 10, unix.SEEK_HOLE, size, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			mp := t.TempDir()
			mountT(t, mp, tc.d, Options{})
			fd, err := unix.Open(filepath.Join(mp, "disk"), unix.O_RDONLY, 0)
			if err != nil {
				t.Fatal(err)
			}
			defer unix.Close(fd)
			got, err := unix.Seek(fd, tc.off, tc.whence)
			if tc.err != nil {
				if !errors.Is(err, tc.err) {
					t.Errorf("lseek = %d, %v; want %v", got, err, tc.err)
				}
				return
			}
			if err != nil || got != tc.want {
				t.Errorf("lseek = %d, %v; want %d", got, err, tc.want)
			}
		})
	}
}

func TestWritesReachDriver(t *testing.T) {
	data := pattern(diskSize, 6)
	d := newMemDriver(slices.Clone(data))
	mp := t.TempDir()
	mountT(t, mp, d, Options{})
	path := filepath.Join(mp, "disk")
	fd, err := unix.Open(path, unix.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)

	payload := pattern(10000, 7)
	if n, err := unix.Pwrite(fd, payload, 4096+7); n != len(payload) || err != nil {
		t.Fatalf("pwrite = %d, %v", n, err)
	}
	copy(data[4096+7:], payload)
	// A write crossing the end writes what fits; the next one fails.
	if n, err := unix.Pwrite(fd, payload[:300], diskSize-100); n != 100 || err != nil {
		t.Errorf("pwrite crossing the end = %d, %v; want 100", n, err)
	}
	copy(data[diskSize-100:], payload[:100])
	if n, err := unix.Pwrite(fd, payload[:300], diskSize); !errors.Is(err, syscall.ENOSPC) {
		t.Errorf("pwrite at the end = %d, %v; want ENOSPC", n, err)
	}

	for _, tc := range []struct {
		name     string
		mode     uint32
		off, n   int64
		err      error
		discards int
		zeroes   int
	}{
		{"punch hole", unix.FALLOC_FL_PUNCH_HOLE | unix.FALLOC_FL_KEEP_SIZE, 8192, 4096, nil, 1, 0},
		{"zero range", unix.FALLOC_FL_ZERO_RANGE | unix.FALLOC_FL_KEEP_SIZE, 20000, 3000, nil, 1, 1},
		{"punch past the end is clamped", unix.FALLOC_FL_PUNCH_HOLE | unix.FALLOC_FL_KEEP_SIZE, diskSize - 10, 4096, nil, 2, 1},
		{"allocate", 0, 0, 4096, syscall.EOPNOTSUPP, 2, 1},
	} {
		err := unix.Fallocate(fd, tc.mode, tc.off, tc.n)
		if !errors.Is(err, tc.err) && !(tc.err == nil && err == nil) {
			t.Errorf("%s: fallocate = %v, want %v", tc.name, err, tc.err)
		}
		if tc.err == nil {
			end := min(tc.off+tc.n, diskSize)
			clear(data[tc.off:end])
		}
		d.mu.Lock()
		if len(d.discards) != tc.discards || len(d.zeroes) != tc.zeroes {
			t.Errorf("%s: driver saw discards %v zeroes %v", tc.name, d.discards, d.zeroes)
		}
		d.mu.Unlock()
	}
	d.mu.Lock()
	if last := d.discards[len(d.discards)-1]; last != (span{diskSize - 10, 10}) {
		t.Errorf("clamped discard = %v", last)
	}
	d.mu.Unlock()

	if err := unix.Fsync(fd); err != nil {
		t.Errorf("fsync: %v", err)
	}
	if err := unix.Fdatasync(fd); err != nil {
		t.Errorf("fdatasync: %v", err)
	}
	d.mu.Lock()
	if d.flushes < 2 {
		t.Errorf("flushes = %d after fsync and fdatasync", d.flushes)
	}
	d.mu.Unlock()
	if got := d.snapshot(); !bytes.Equal(got, data) {
		t.Errorf("driver contents differ from the model")
	}
	// What was written reads back through the mount.
	got, err := os.ReadFile(path)
	if err != nil || !bytes.Equal(got, data) {
		t.Errorf("read back: %d bytes, %v", len(got), err)
	}

	// A resize reaches the driver, and the new size is visible.
	if err := unix.Ftruncate(fd, diskSize+4096); err != nil {
		t.Fatalf("ftruncate: %v", err)
	}
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil || st.Size != diskSize+4096 {
		t.Errorf("size after ftruncate = %d, %v", st.Size, err)
	}
	d.mu.Lock()
	if !slices.Equal(d.truncates, []int64{diskSize + 4096}) {
		t.Errorf("truncates = %v", d.truncates)
	}
	d.mu.Unlock()
}

func TestUnmountWait(t *testing.T) {
	requireFUSE(t)
	mp := t.TempDir()
	s, err := Mount(mp, newMemDriver(make([]byte, diskSize)), Options{})
	if err != nil {
		t.Fatal(err)
	}
	if err := s.Unmount(); err != nil {
		t.Fatal(err)
	}
	waitT(t, s)
	var st, parent syscall.Stat_t
	if err := syscall.Stat(mp, &st); err != nil {
		t.Fatal(err)
	}
	if err := syscall.Stat(filepath.Dir(mp), &parent); err != nil {
		t.Fatal(err)
	}
	if st.Dev != parent.Dev {
		t.Errorf("mountpoint still on another device after Unmount")
	}
}

func TestMountErrors(t *testing.T) {
	d := newMemDriver(make([]byte, 4096))
	for _, tc := range []struct {
		name string
		mp   string
		opts Options
	}{
		{"missing mountpoint", filepath.Join(t.TempDir(), "nope"), Options{}},
		{"name with a slash", t.TempDir(), Options{Name: "a/b"}},
		{"dot name", t.TempDir(), Options{Name: ".."}},
		{"device mountpoint", "/dev/null", Options{}},
	} {
		if s, err := Mount(tc.mp, d, tc.opts); err == nil {
			s.Unmount()
			t.Errorf("%s: Mount succeeded", tc.name)
		}
	}
}
