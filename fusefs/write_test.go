package fusefs

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"imgfuse/coroutine"
	"imgfuse/drivers"
)

// statSize is stat(2)'s size of path, through the path (not an open
// descriptor), as a shell's `stat` sees it.
func statSize(t *testing.T, path string) int64 {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Stat(path, &st); err != nil {
		t.Fatalf("stat %s: %v", path, err)
	}
	return st.Size
}

// TestGrowable: on a Growable mount, writes past the end reach the driver
// whole and grow the disk, and every way of asking the size (fstat, stat
// by path, a descriptor opened before the growth, lseek SEEK_END) reports
// the new one, even though attributes are cached for a long time.
func TestGrowable(t *testing.T) {
	data := pattern(diskSize, 20)
	d := newMemDriver(slices.Clone(data))
	d.growable = true
	mp := t.TempDir()
	mountT(t, mp, d, Options{Growable: true})
	path := filepath.Join(mp, "disk")
	// Opened, and its attributes cached, before any growth.
	early, err := unix.Open(path, unix.O_RDONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(early)
	if got := statSize(t, path); got != diskSize {
		t.Fatalf("size %d before growth", got)
	}
	fd, err := unix.Open(path, unix.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	sizes := func(want int64, after string) {
		t.Helper()
		var st unix.Stat_t
		if err := unix.Fstat(fd, &st); err != nil || st.Size != want {
			t.Errorf("after %s: fstat size %d, %v; want %d", after, st.Size, err, want)
		}
		if err := unix.Fstat(early, &st); err != nil || st.Size != want {
			t.Errorf("after %s: fstat of an older descriptor: size %d, %v; want %d", after, st.Size, err, want)
		}
		if got := statSize(t, path); got != want {
			t.Errorf("after %s: stat size %d, want %d", after, got, want)
		}
		if end, err := unix.Seek(early, 0, unix.SEEK_END); err != nil || end != want {
			t.Errorf("after %s: SEEK_END = %d, %v; want %d", after, end, err, want)
		}
		if got := d.Size(); got != want {
			t.Errorf("after %s: driver size %d, want %d", after, got, want)
		}
	}

	// A write crossing the end is written whole.
	p := pattern(300, 21)
	if n, err := unix.Pwrite(fd, p, diskSize-100); n != len(p) || err != nil {
		t.Fatalf("pwrite crossing the end = %d, %v", n, err)
	}
	data = append(data[:diskSize-100], p...)
	sizes(int64(len(data)), "a write crossing the end")

	// A write past the end leaves a gap that reads as zeros.
	p = pattern(5000, 22)
	off := int64(len(data)) + 70000
	if n, err := unix.Pwrite(fd, p, off); n != len(p) || err != nil {
		t.Fatalf("pwrite past the end = %d, %v", n, err)
	}
	data = append(data, make([]byte, off-int64(len(data)))...)
	data = append(data, p...)
	sizes(int64(len(data)), "a write past the end")

	// A large write past the end, in several FUSE requests.
	p = pattern(3<<20+5, 23)
	off = int64(len(data))
	if n, err := unix.Pwrite(fd, p, off); n != len(p) || err != nil {
		t.Fatalf("pwrite of 3 MiB past the end = %d, %v", n, err)
	}
	data = append(data, p...)
	sizes(int64(len(data)), "a large write past the end")

	// truncate -s grows; the new range reads as zeros.
	grown := int64(len(data)) + 1<<20
	if err := unix.Truncate(path, grown); err != nil {
		t.Fatalf("truncate: %v", err)
	}
	data = append(data, make([]byte, 1<<20)...)
	sizes(grown, "truncate")

	// ZERO_RANGE without KEEP_SIZE past the end grows the disk (through
	// Truncate) and zeroes what was there.
	zoff := grown - 4096
	if err := unix.Fallocate(fd, unix.FALLOC_FL_ZERO_RANGE, zoff, 8192); err != nil {
		t.Fatalf("fallocate ZERO_RANGE past the end: %v", err)
	}
	data = append(data, make([]byte, 4096)...)
	sizes(int64(len(data)), "fallocate ZERO_RANGE")

	// O_APPEND writes land at the end.
	af, err := os.OpenFile(path, os.O_WRONLY|os.O_APPEND, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := af.Write([]byte("appended")); err != nil {
		t.Fatalf("append: %v", err)
	}
	af.Close()
	data = append(data, "appended"...)
	sizes(int64(len(data)), "an O_APPEND write")

	if got := d.snapshot(); !bytes.Equal(got, data) {
		t.Errorf("driver contents differ from the model (%d vs %d bytes)", len(got), len(data))
	}
	got, err := os.ReadFile(path)
	if err != nil || !bytes.Equal(got, data) {
		t.Errorf("read back: %d bytes (want %d), %v", len(got), len(data), err)
	}
	// Writes far past any size a disk can have fail, not wrap.
	if _, err := unix.Pwrite(fd, []byte("x"), 1<<62); err == nil {
		t.Errorf("pwrite at 2^62 succeeded")
	}
}

// TestNotGrowable: without Growable, a write past the end and a ZERO_RANGE
// that would extend the disk are refused, and the size does not move.
// (Refusing to shrink is the drivers' part: TestRawGrow on raw, and
// tests/grow_test.go on qcow2, check the EOPNOTSUPP.)
func TestNotGrowable(t *testing.T) {
	d := newMemDriver(pattern(diskSize, 24))
	mp := t.TempDir()
	mountT(t, mp, d, Options{})
	path := filepath.Join(mp, "disk")
	fd, err := unix.Open(path, unix.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	if _, err := unix.Pwrite(fd, []byte("x"), diskSize+10); !errors.Is(err, syscall.ENOSPC) {
		t.Errorf("pwrite past the end: %v, want ENOSPC", err)
	}
	if err := unix.Fallocate(fd, unix.FALLOC_FL_ZERO_RANGE, diskSize-10, 100); !errors.Is(err, syscall.ENOSPC) {
		t.Errorf("ZERO_RANGE past the end: %v, want ENOSPC", err)
	}
	if got := statSize(t, path); got != diskSize {
		t.Errorf("size %d, want %d", got, diskSize)
	}
}

// TestFlushErrors: a failing driver Flush reaches fsync, fdatasync and
// close(2) as an error the caller acts on (EIO, or ENOSPC), never ENOSYS
// (which would switch fsync off in the kernel) and never success.
func TestFlushErrors(t *testing.T) {
	for _, tc := range []struct {
		name string
		err  error
		want syscall.Errno
	}{
		{"EIO", fmt.Errorf("qcow2: writing L2 table: %w", syscall.EIO), syscall.EIO},
		{"ENOSYS", fmt.Errorf("aio: fdatasync: %w", syscall.ENOSYS), syscall.EIO},
		{"unsupported", fmt.Errorf("x: %w", drivers.ErrUnsupported), syscall.EIO},
		{"corrupt", fmt.Errorf("x: %w", drivers.ErrCorrupt), syscall.EIO},
		{"ENOSPC", fmt.Errorf("aio: fdatasync: %w", syscall.ENOSPC), syscall.ENOSPC},
		{"plain", errors.New("something"), syscall.EIO},
	} {
		t.Run(tc.name, func(t *testing.T) {
			d := newMemDriver(make([]byte, diskSize))
			mp := t.TempDir()
			mountT(t, mp, d, Options{})
			path := filepath.Join(mp, "disk")
			fd, err := unix.Open(path, unix.O_RDWR, 0)
			if err != nil {
				t.Fatal(err)
			}
			d.mu.Lock()
			d.flushErr = tc.err
			d.mu.Unlock()
			// Twice each: the first answer must not switch fsync
			// off in the kernel for the second.
			for i := range 2 {
				if err := unix.Fsync(fd); !errors.Is(err, tc.want) {
					t.Errorf("fsync %d = %v, want %v", i, err, tc.want)
				}
				if err := unix.Fdatasync(fd); !errors.Is(err, tc.want) {
					t.Errorf("fdatasync %d = %v, want %v", i, err, tc.want)
				}
			}
			// close(2) of a writable descriptor flushes and reports it.
			if err := unix.Close(fd); !errors.Is(err, tc.want) {
				t.Errorf("close = %v, want %v", err, tc.want)
			}
			d.mu.Lock()
			flushes := d.flushes
			d.flushErr = nil
			d.mu.Unlock()
			if flushes < 5 {
				t.Errorf("driver saw %d flushes, want 5", flushes)
			}
			// Once the driver recovers, fsync succeeds again.
			fd, err = unix.Open(path, unix.O_RDWR, 0)
			if err != nil {
				t.Fatal(err)
			}
			if err := unix.Fsync(fd); err != nil {
				t.Errorf("fsync after recovery: %v", err)
			}
			if err := unix.Close(fd); err != nil {
				t.Errorf("close after recovery: %v", err)
			}
		})
	}
}

// barrierDriver is a memDriver whose WriteAt holds each write until want
// writes are inside WriteAt at once, or until a deadline passes; peak is
// the largest number seen inside at once.
type barrierDriver struct {
	*memDriver
	want     int
	deadline time.Time

	bmu     sync.Mutex
	inside  int // protected by bmu
	peak    int // protected by bmu
	reached chan struct{}
}

func (b *barrierDriver) WriteAt(co *coroutine.Co, p []byte, off int64) (int, error) {
	b.bmu.Lock()
	b.inside++
	if b.inside > b.peak {
		b.peak = b.inside
	}
	if b.inside == b.want {
		close(b.reached)
	}
	b.bmu.Unlock()
	// Wait off the loop: the other writes reach the driver through the
	// same loops.
	coroutine.RunInWorker(co, func() {
		select {
		case <-b.reached:
		case <-time.After(time.Until(b.deadline)):
		}
	})
	n, err := b.memDriver.WriteAt(co, p, off)
	b.bmu.Lock()
	b.inside--
	b.bmu.Unlock()
	return n, err
}

// TestParallelDirectWrites: O_DIRECT writes from several threads to
// different places reach the driver at the same time. Without
// FOPEN_PARALLEL_DIRECT_WRITES the kernel takes the inode lock exclusively
// for every direct write to a FUSE file, and writes reach the server one
// at a time: a QD32 writer then gets the throughput of QD1. The driver
// holds each write until four are inside it at once; serialised writes
// would see one.
func TestParallelDirectWrites(t *testing.T) {
	const writers = 4
	d := &barrierDriver{
		memDriver: newMemDriver(make([]byte, diskSize)),
		want:      writers,
		deadline:  time.Now().Add(5 * time.Second),
		reached:   make(chan struct{}),
	}
	mp := t.TempDir()
	mountT(t, mp, d, Options{})
	path := filepath.Join(mp, "disk")
	var wg sync.WaitGroup
	errs := make([]error, writers)
	for i := range writers {
		wg.Go(func() {
			fd, err := unix.Open(path, unix.O_RDWR|unix.O_DIRECT, 0)
			if err != nil {
				errs[i] = err
				return
			}
			defer unix.Close(fd)
			buf := alignedBuf(4096)
			copy(buf, pattern(4096, uint64(i)))
			_, errs[i] = unix.Pwrite(fd, buf, int64(i)*65536)
		})
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Errorf("writer %d: %v", i, err)
		}
	}
	d.bmu.Lock()
	peak := d.peak
	d.bmu.Unlock()
	if peak < writers {
		t.Errorf("at most %d of %d O_DIRECT writes reached the driver at once, want all: the kernel serialises them", peak, writers)
	}
	got := d.snapshot()
	for i := range writers {
		if want := pattern(4096, uint64(i)); !bytes.Equal(got[i*65536:i*65536+4096], want) {
			t.Errorf("writer %d: data not on the disk", i)
		}
	}
}
