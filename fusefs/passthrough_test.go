package fusefs

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"

	"github.com/hanwen/go-fuse/v2/fuse"
	"golang.org/x/sys/unix"

	"imgfuse/coroutine"
	"imgfuse/drivers"
	"imgfuse/drivers/raw"
	"imgfuse/internal/testenv"
)

// TestOpenFlagsPassthrough checks what Open answers in each mode, without a
// mount: a read-only open is passed through whole; an open for writing
// keeps FOPEN_DIRECT_IO (which overrides passthrough for read and write)
// but still names the backing file, as the kernel demands of every open of
// an inode once one is passed through.
func TestOpenFlagsPassthrough(t *testing.T) {
	const (
		pt     = fuse.FOPEN_PASSTHROUGH
		direct = fuse.FOPEN_DIRECT_IO | fuse.FOPEN_PARALLEL_DIRECT_WRITES
	)
	for _, c := range []struct {
		name      string
		backingID int32
		readOnly  bool
		flags     uint32
		status    fuse.Status
		open      uint32
		fh        uint64
	}{
		{"off, read", 0, false, syscall.O_RDONLY, fuse.OK, direct, 0},
		{"off, write", 0, false, syscall.O_RDWR, fuse.OK, direct, fhWrite},
		{"on, read", 7, false, syscall.O_RDONLY, fuse.OK, pt, 0},
		{"on, read O_DIRECT", 7, false, syscall.O_RDONLY | syscall.O_DIRECT, fuse.OK, pt, 0},
		{"on, read-write", 7, false, syscall.O_RDWR, fuse.OK, direct | pt, fhWrite},
		{"on, write-only", 7, false, syscall.O_WRONLY, fuse.OK, direct | pt, fhWrite},
		{"on, read-only mount, read", 7, true, syscall.O_RDONLY, fuse.OK, pt, 0},
		{"on, read-only mount, write", 7, true, syscall.O_RDWR, fuse.EROFS, 0, 0},
	} {
		t.Run(c.name, func(t *testing.T) {
			fs := newDiskFS(newMemDriver(make([]byte, 4096)), Options{Name: "disk", ReadOnly: c.readOnly}, true, nil)
			fs.backingID = c.backingID
			var out fuse.OpenOut
			st := onLoop(fs).Open(nil, &fuse.OpenIn{InHeader: fuse.InHeader{NodeId: diskDirIno}, Flags: c.flags}, &out)
			if st != c.status {
				t.Fatalf("status %v, want %v", st, c.status)
			}
			if st != fuse.OK {
				return
			}
			if out.OpenFlags != c.open || out.Fh != c.fh {
				t.Errorf("open flags %#x fh %d, want %#x fh %d", out.OpenFlags, out.Fh, c.open, c.fh)
			}
			wantID := c.backingID
			if out.BackingID != wantID {
				t.Errorf("backing ID %d, want %d", out.BackingID, wantID)
			}
		})
	}
}

// countingRaw is a raw driver that counts the reads reaching it.
type countingRaw struct {
	*raw.Driver
	reads atomic.Int64
}

func (c *countingRaw) ReadAt(co *coroutine.Co, p []byte, off int64) (int, error) {
	c.reads.Add(1)
	return c.Driver.ReadAt(co, p, off)
}

func (c *countingRaw) ReadDirect(co *coroutine.Co, p []byte, off int64) (int, bool, error) {
	c.reads.Add(1)
	return c.Driver.ReadDirect(co, p, off)
}

var (
	_ drivers.FileBacked   = (*countingRaw)(nil)
	_ drivers.DirectReader = (*countingRaw)(nil)
)

// mountCounting mounts a raw image holding data through a countingRaw.
func mountCounting(t *testing.T, data []byte, ropts drivers.OpenOptions, opts Options) (*countingRaw, *Server, string, string) {
	t.Helper()
	requireFUSE(t)
	dir := t.TempDir()
	image := filepath.Join(dir, "image.raw")
	if err := os.WriteFile(image, data, 0o600); err != nil {
		t.Fatal(err)
	}
	d, err := raw.Open(image, ropts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { d.Close() }) // after the unmount below
	mp := filepath.Join(dir, "mnt")
	if err := os.Mkdir(mp, 0o755); err != nil {
		t.Fatal(err)
	}
	c := &countingRaw{Driver: d}
	s := mountT(t, mp, c, opts)
	return c, s, image, filepath.Join(mp, "disk")
}

// requirePassthrough fails t unless the mount is in passthrough mode (when
// the kernel offers it: otherwise it skips, or fails where coverage is
// required, testenv.Skip).
func requirePassthrough(t *testing.T, s *Server) {
	t.Helper()
	on, why := s.Passthrough()
	if on {
		return
	}
	if s.srv.KernelSettings().Flags64()&fuse.CAP_PASSTHROUGH == 0 || os.Geteuid() != 0 {
		testenv.Skip(t, "passthrough unavailable: %s", why)
	}
	t.Fatalf("passthrough is off on a kernel that offers it: %s", why)
}

// TestPassthroughReads: on a raw image, reads through a read-only
// descriptor never reach the driver, reads through a descriptor open for
// writing do; both see every write, punched hole and growth made through
// the driver at once, buffered and O_DIRECT. The same sequence runs
// without passthrough as a control.
func TestPassthroughReads(t *testing.T) {
	for _, noPT := range []bool{false, true} {
		t.Run(map[bool]string{false: "passthrough", true: "no passthrough"}[noPT], func(t *testing.T) {
			testPassthroughReads(t, noPT)
		})
	}
}

func testPassthroughReads(t *testing.T, noPT bool) {
	const size = 4<<20 + 512
	model := pattern(size, 21)
	c, s, image, disk := mountCounting(t, bytes.Clone(model), drivers.OpenOptions{}, Options{NoPassthrough: noPT})
	if !noPT {
		requirePassthrough(t, s)
	}

	ro, err := os.Open(disk)
	if err != nil {
		t.Fatal(err)
	}
	defer ro.Close()
	rod, err := os.OpenFile(disk, os.O_RDONLY|syscall.O_DIRECT, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer rod.Close()
	rw, err := os.OpenFile(disk, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer rw.Close()

	check := func(what string) {
		t.Helper()
		before := c.reads.Load()
		got := make([]byte, size)
		if n, err := ro.ReadAt(got, 0); n != size || err != nil || !bytes.Equal(got, model) {
			t.Fatalf("%s: buffered read %d bytes, %v; equal %v", what, n, err, bytes.Equal(got, model))
		}
		p := alignedBuf(4 << 20)
		if n, err := rod.ReadAt(p, 0); n != len(p) || err != nil || !bytes.Equal(p, model[:len(p)]) {
			t.Fatalf("%s: O_DIRECT read %d bytes, %v", what, n, err)
		}
		switch n := c.reads.Load() - before; {
		case !noPT && n != 0:
			t.Fatalf("%s: %d reads of read-only descriptors reached the driver, want 0 (passthrough)", what, n)
		case noPT && n == 0:
			t.Fatalf("%s: without passthrough, no read reached the driver", what)
		}
	}
	check("first read")

	// The registered descriptor is aio's, O_DIRECT where the filesystem
	// allows it; buffered readers must not inherit O_DIRECT's alignment
	// rules (the kernel opens the image anew with each reader's flags).
	direct := false
	if err := c.LendBackingFd(func(fd int) error {
		fl, err := unix.FcntlInt(uintptr(fd), unix.F_GETFL, 0)
		direct = fl&unix.O_DIRECT != 0
		return err
	}); err != nil {
		t.Fatal(err)
	}
	t.Logf("image descriptor O_DIRECT: %v", direct)
	for _, off := range []int64{0, 1, 4095, 12347, size - 1} {
		b := make([]byte, 3)
		n, err := ro.ReadAt(b, off)
		want := model[off:min(off+3, size)]
		if n != len(want) || !bytes.Equal(b[:n], want) || (err != nil && n == 3) {
			t.Errorf("3-byte buffered read at %d: %d, %v", off, n, err)
		}
	}

	// Reads on a descriptor open for writing reach the driver.
	before := c.reads.Load()
	if _, err := rw.ReadAt(make([]byte, 4096), 8192); err != nil {
		t.Fatal(err)
	}
	if c.reads.Load() == before {
		t.Error("a read through an O_RDWR descriptor did not reach the driver")
	}

	// Writes through the driver (O_DIRECT in aio) replace cached pages.
	w := pattern(70000, 99)
	if _, err := rw.WriteAt(w, 12345); err != nil {
		t.Fatal(err)
	}
	copy(model[12345:], w)
	check("after a write")

	// A punched hole reads as zeros at once.
	if err := unix.Fallocate(int(rw.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, 1<<20, 1<<20); err != nil {
		t.Fatal(err)
	}
	clear(model[1<<20 : 2<<20])
	check("after a punched hole")
	if err := unix.Fallocate(int(rw.Fd()), unix.FALLOC_FL_ZERO_RANGE|unix.FALLOC_FL_KEEP_SIZE, 3<<20, 4096); err != nil {
		t.Fatal(err)
	}
	clear(model[3<<20 : 3<<20+4096])
	check("after a zeroed range")

	// A write crossing the end of a non-growable disk writes what fits;
	// past the end it fails: passthrough changed nothing there.
	if n, err := unix.Pwrite(int(rw.Fd()), make([]byte, 1024), size-512); n != 512 || err != nil {
		t.Errorf("write crossing the end: %d, %v; want 512", n, err)
	}
	if _, err := unix.Pwrite(int(rw.Fd()), make([]byte, 1024), size); !errors.Is(err, syscall.ENOSPC) {
		t.Errorf("write past the end: %v, want ENOSPC", err)
	}
	clear(model[size-512:])
	if fi, err := os.Stat(image); err != nil || fi.Size() != size {
		t.Errorf("image file: %v, %v; want %d bytes", fi, err, size)
	}
	check("after a write at the end")

	// Growing (truncate) shows through passthrough descriptors opened
	// before it; shrinking is refused.
	if err := rw.Truncate(size + 8192); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 8192)
	if n, err := ro.ReadAt(got, size); n != 8192 || err != nil || !bytes.Equal(got, make([]byte, 8192)) {
		t.Errorf("read of the grown range: %d, %v", n, err)
	}
	if fi, err := ro.Stat(); err != nil || fi.Size() != size+8192 {
		t.Errorf("stat after growth: %v, %v", fi, err)
	}
	if err := rw.Truncate(4096); !errors.Is(err, syscall.EOPNOTSUPP) {
		t.Errorf("shrinking the disk: %v, want EOPNOTSUPP (README)", err)
	}
	if err := rw.Sync(); err != nil {
		t.Errorf("fsync: %v", err)
	}
}

// TestPassthroughOff: with NoPassthrough, or a driver that is not one
// file, every read reaches the driver and Server.Passthrough says why.
func TestPassthroughOff(t *testing.T) {
	data := pattern(1<<20, 3)
	c, s, _, disk := mountCounting(t, bytes.Clone(data), drivers.OpenOptions{}, Options{NoPassthrough: true})
	if on, why := s.Passthrough(); on || why == "" {
		t.Errorf("NoPassthrough: Passthrough() = %v, %q", on, why)
	}
	if got, err := os.ReadFile(disk); err != nil || !bytes.Equal(got, data) {
		t.Fatalf("read: %d bytes, %v", len(got), err)
	}
	if c.reads.Load() == 0 {
		t.Error("with NoPassthrough, a read did not reach the driver")
	}

	mp := t.TempDir()
	s = mountT(t, mp, newMemDriver(pattern(4096, 1)), Options{})
	if on, why := s.Passthrough(); on || !strings.Contains(why, "raw") {
		t.Errorf("memory driver: Passthrough() = %v, %q; want off, naming raw images", on, why)
	}
}

// TestPassthroughReadOnly: a read-only mount is passed through, refuses
// every open for writing and leaves the image untouched.
func TestPassthroughReadOnly(t *testing.T) {
	data := pattern(1<<20, 8)
	c, s, image, disk := mountCounting(t, bytes.Clone(data), drivers.OpenOptions{ReadOnly: true}, Options{ReadOnly: true})
	requirePassthrough(t, s)
	c.reads.Store(0) // Mount read the partition table through the driver
	fi0, err := os.Stat(image)
	if err != nil {
		t.Fatal(err)
	}
	for _, flag := range []int{os.O_RDWR, os.O_WRONLY, os.O_RDWR | os.O_TRUNC} {
		f, err := os.OpenFile(disk, flag, 0)
		if err == nil {
			f.Close()
		}
		if !errors.Is(err, syscall.EROFS) {
			t.Errorf("open(%#x) = %v, want EROFS", flag, err)
		}
	}
	f, err := os.Open(disk)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	// A private mapping may be written; it must not reach the image.
	m, err := unix.Mmap(int(f.Fd()), 0, 4096, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE)
	if err != nil {
		t.Fatal(err)
	}
	copy(m, "scribble")
	unix.Munmap(m)
	if _, err := unix.Mmap(int(f.Fd()), 0, 4096, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED); err == nil {
		t.Error("a writable shared mapping of a read-only descriptor succeeded")
	}
	if got, err := os.ReadFile(disk); err != nil || !bytes.Equal(got, data) {
		t.Fatalf("read: %d bytes, %v", len(got), err)
	}
	if n := c.reads.Load(); n != 0 {
		t.Errorf("%d reads reached the driver, want 0 (passthrough)", n)
	}
	if got, err := os.ReadFile(image); err != nil || !bytes.Equal(got, data) {
		t.Errorf("the image changed on a read-only mount (%v)", err)
	}
	if fi, err := os.Stat(image); err != nil || !fi.ModTime().Equal(fi0.ModTime()) || fi.Size() != fi0.Size() {
		t.Errorf("image stat changed: %v -> %v (%v)", fi0, fi, err)
	}
}
