package fusefs

import (
	"bytes"
	"math/rand/v2"
	"os"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"sync"
	"testing"
	"unsafe"

	"golang.org/x/sys/unix"

	"imgfuse/internal/testenv"
)

// enableURing turns FUSE-over-io_uring on for the test (imgfuse itself
// never does).
func enableURing(t *testing.T) {
	t.Helper()
	requireFUSE(t)
	testenv.EnableFUSEURing(t)
}

// openFDs counts the process's open descriptors.
func openFDs(t *testing.T) int {
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(ents)
}

// TestURingServes reads and writes through a mount served by
// FUSE-over-io_uring from every CPU (each CPU has its own queue, served by
// the loop that registered it), with 4 KiB, odd-sized and 1 MiB requests
// (the largest payload an entry holds), and checks every byte against a
// model.
func TestURingServes(t *testing.T) {
	enableURing(t)
	const size = 8 << 20
	data := pattern(size, 21)
	d := newMemDriver(slices.Clone(data))
	mp := t.TempDir()
	s := mountT(t, mp, d, Options{IOURing: true})
	if !strings.Contains(s.Mode, "io_uring") {
		t.Fatalf("serving mode %q: FUSE-over-io_uring not in use", s.Mode)
	}
	path := filepath.Join(mp, "disk")

	cpus := runtime.NumCPU()
	var wg sync.WaitGroup
	errs := make(chan string, 64)
	// Each worker owns a stripe of the disk, so the model needs no lock.
	stripe := size / cpus / (1 << 20) * (1 << 20)
	for w := range cpus {
		wg.Add(1)
		go func() {
			defer wg.Done()
			runtime.LockOSThread()
			defer runtime.UnlockOSThread()
			var set unix.CPUSet
			set.Set(w)
			_ = unix.SchedSetaffinity(0, &set)
			fd, err := unix.Open(path, unix.O_RDWR|unix.O_DIRECT, 0)
			if err != nil {
				errs <- err.Error()
				return
			}
			defer unix.Close(fd)
			r := rand.New(rand.NewPCG(uint64(w), 7))
			base := w * stripe
			buf := alignedBuf(1 << 20)
			for i := range 200 {
				n := 4096 << r.IntN(9) // 4 KiB .. 1 MiB
				off := base + r.IntN(stripe/4096-n/4096+1)*4096
				if i%2 == 0 {
					p := pattern(n, uint64(w*1000+i))
					copy(buf, p)
					if m, err := unix.Pwrite(fd, buf[:n], int64(off)); m != n || err != nil {
						errs <- "pwrite: " + errString(err)
						return
					}
					copy(data[off:], p)
					continue
				}
				if m, err := unix.Pread(fd, buf[:n], int64(off)); m != n || err != nil {
					errs <- "pread: " + errString(err)
					return
				}
				if !bytes.Equal(buf[:n], data[off:off+n]) {
					errs <- "read back differs from the model"
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for e := range errs {
		t.Error(e)
	}
	// Buffered, unaligned I/O takes other requests (the kernel's
	// page-cache path, FLUSH at close).
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	odd := pattern(12345, 99)
	if _, err := f.WriteAt(odd, 777); err != nil {
		t.Fatal(err)
	}
	copy(data[777:], odd)
	if err := f.Sync(); err != nil {
		t.Errorf("fsync: %v", err)
	}
	f.Close()
	got, err := os.ReadFile(path)
	if err != nil || !bytes.Equal(got, data) {
		t.Errorf("read back through the page cache: %d bytes, %v", len(got), err)
	}
	if !bytes.Equal(d.snapshot(), data) {
		t.Error("driver contents differ from the model")
	}
}

func errString(err error) string {
	if err == nil {
		return "short"
	}
	return err.Error()
}

// TestURingUnmountReleases mounts and unmounts repeatedly, with requests in
// flight at the unmount: every ring, its buffers and its clones are
// released (the descriptor count returns to where it was) and Wait
// returns.
func TestURingUnmountReleases(t *testing.T) {
	enableURing(t)
	before := -1
	for i := range 5 {
		mp := t.TempDir()
		s, err := Mount(mp, newMemDriver(make([]byte, 4<<20)), Options{IOURing: true})
		if err != nil {
			t.Fatal(err)
		}
		if !strings.Contains(s.Mode, "io_uring") {
			t.Fatalf("serving mode %q", s.Mode)
		}
		if i == 0 {
			// The first mount starts the process's loops, which
			// keep their descriptors.
			if err := s.Unmount(); err != nil {
				t.Fatal(err)
			}
			waitT(t, s)
			before = openFDs(t)
			continue
		}
		stop := make(chan struct{})
		var wg sync.WaitGroup
		for range 4 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				f, err := os.Open(filepath.Join(mp, "disk"))
				if err != nil {
					return
				}
				defer f.Close()
				buf := make([]byte, 65536)
				for {
					select {
					case <-stop:
						return
					default:
					}
					if _, err := f.ReadAt(buf, 0); err != nil {
						return
					}
				}
			}()
		}
		if err := unix.Unmount(mp, unix.MNT_DETACH); err != nil {
			t.Fatal(err)
		}
		close(stop)
		wg.Wait()
		waitT(t, s)
	}
	if after := openFDs(t); after != before {
		t.Errorf("open descriptors %d after the mounts, %d before", after, before)
	}
}

// resident counts the resident bytes of every ring entry's payload.
func resident(t *testing.T, s *Server) (total, used, fat int) {
	t.Helper()
	vec := make([]byte, (writePayloadOff+(1<<20))/4096+2)
	for _, c := range s.serving.conns {
		done := make(chan struct{})
		c.loop.Post(func() {
			defer close(done)
			if c.u == nil {
				return
			}
			for _, e := range c.u.ents {
				if _, _, errno := unix.Syscall(unix.SYS_MINCORE, uintptr(unsafe.Pointer(&e.payload[0])), uintptr(len(e.payload)), uintptr(unsafe.Pointer(&vec[0]))); errno != 0 {
					t.Error(errno)
					return
				}
				n := 0
				for _, v := range vec[:(len(e.payload)+4095)/4096] {
					n += int(v & 1)
				}
				total += n * 4096
				if n > 0 {
					used++
				}
				if n*4096 > uringThinPayload {
					fat++
				}
			}
		})
		<-done
	}
	return total, used, fat
}

// TestURingPayloadMemory: a burst of 1 MiB writes from 64 threads uses
// more ring entries than uringMaxFat per loop, and no more than that many
// keep more than uringThinPayload resident; in a burst of writes and
// reads, every byte read back is what was written while entries were
// being trimmed.
func TestURingPayloadMemory(t *testing.T) {
	enableURing(t)
	const size = 256 << 20 // 64 writers x 4 disjoint 1 MiB slots
	mp := t.TempDir()
	s := mountT(t, mp, newMemDriver(make([]byte, size)), Options{IOURing: true})
	path := filepath.Join(mp, "disk")
	burst := func(n int, readBack bool) {
		var wg sync.WaitGroup
		for w := range 64 {
			wg.Add(1)
			go func() {
				defer wg.Done()
				fd, err := unix.Open(path, unix.O_RDWR|unix.O_DIRECT, 0)
				if err != nil {
					t.Error(err)
					return
				}
				defer unix.Close(fd)
				buf := alignedBuf(n)
				got := alignedBuf(n)
				for i := range 4 {
					off := int64((w*4 + i) * n % size)
					copy(buf, pattern(n, uint64(w*4+i+1)))
					if _, err := unix.Pwrite(fd, buf, off); err != nil {
						t.Error(err)
						return
					}
					// Read it back while the other threads write:
					// replies come out of entries being trimmed.
					if !readBack {
						continue
					}
					if _, err := unix.Pread(fd, got, off); err != nil || !bytes.Equal(got, buf) {
						t.Errorf("1 MiB read back at %d differs (%v)", off, err)
						return
					}
				}
			}()
		}
		wg.Wait()
	}
	burst(1<<20, false)
	total, used, fat := resident(t, s)
	t.Logf("resident payload after 1 MiB writes: %d MiB; %d entries used, %d of them over %d KiB",
		total>>20, used, fat, uringThinPayload>>10)
	limit := len(s.serving.conns) * uringMaxFat
	if used <= limit {
		t.Fatalf("the 1 MiB burst used only %d entries: the test did not fill the ring", used)
	}
	if fat > limit {
		t.Errorf("%d entries keep more than %d KiB, want at most %d", fat, uringThinPayload>>10, limit)
	}
	if bound := limit<<20 + used*uringThinPayload + used*4096; total > bound {
		t.Errorf("%d bytes of payload resident, want at most %d", total, bound)
	}
	// Then writes and reads: an entry whose last reply was 1 MiB keeps it
	// until its next request (the bound above is for requests), but no
	// reply is ever trimmed under the kernel.
	burst(1<<20, true)
}
