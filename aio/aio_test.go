package aio

import (
	"bytes"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"

	"imgfuse/coroutine"
	"imgfuse/internal/testenv"
)

// directDir returns a directory on a filesystem where O_DIRECT works with
// real direct I/O (statx reports a DIO alignment), for the tests of the
// direct engine: the io_submit/io_getevents path, its leader and reaper,
// and the regression tests of completions lost between them. Without such
// a directory those tests skip, or fail where coverage is required
// (testenv.Skip): CI must run them.
func directDir(t testing.TB) string {
	t.Helper()
	d, why := findDirectDir(t)
	if d == "" {
		testenv.Skip(t, "no O_DIRECT-capable directory: %s", why)
	}
	return d
}

// findDirectDir looks for a direct-I/O directory: the test's temporary
// directory, /var/tmp (disk-backed on every distribution, unlike a /tmp
// that may be tmpfs, which reports no direct-I/O alignment), and, as root
// with mkfs.ext4 (CI has both), a small ext4 loop-mounted for the test,
// which does direct I/O whatever filesystem holds its image. It returns "" and why each candidate failed when none
// works.
func findDirectDir(t testing.TB) (string, string) {
	t.Helper()
	cands := []string{t.TempDir()}
	for _, base := range []string{"/var/tmp"} {
		if d, err := os.MkdirTemp(base, "aiotest"); err == nil {
			t.Cleanup(func() { os.RemoveAll(d) })
			cands = append(cands, d)
		}
	}
	var why []string
	for _, d := range cands {
		if err := probeDirect(d); err != nil {
			why = append(why, err.Error())
			continue
		}
		return d, ""
	}
	d, err := loopExt4(t)
	if err == nil {
		err = probeDirect(d)
	}
	if err == nil {
		return d, ""
	}
	why = append(why, "loop-mounted ext4: "+err.Error())
	return "", strings.Join(why, "; ")
}

// probeDirect reports whether files in d do real direct I/O.
func probeDirect(d string) error {
	p := filepath.Join(d, "probe")
	fd, err := unix.Open(p, unix.O_RDWR|unix.O_CREAT|unix.O_DIRECT, 0o644)
	if err != nil {
		return fmt.Errorf("%s: O_DIRECT open: %v", d, err)
	}
	var stx unix.Statx_t
	err = unix.Statx(fd, "", unix.AT_EMPTY_PATH, unix.STATX_DIOALIGN, &stx)
	unix.Close(fd)
	os.Remove(p)
	if err != nil || stx.Mask&unix.STATX_DIOALIGN == 0 || stx.Dio_offset_align == 0 {
		return fmt.Errorf("%s: no statx DIO alignment", d)
	}
	return nil
}

// loopExt4 makes a 64 MiB ext4 in a file, mounts it on a loop device and
// returns the mountpoint, unmounted when t ends. It needs root and
// mkfs.ext4.
func loopExt4(t testing.TB) (string, error) {
	t.Helper()
	if os.Geteuid() != 0 {
		return "", errors.New("not root")
	}
	img := filepath.Join(t.TempDir(), "ext4.img")
	if err := os.WriteFile(img, nil, 0o644); err != nil {
		return "", err
	}
	if err := os.Truncate(img, 64<<20); err != nil {
		return "", err
	}
	if out, err := exec.Command("mkfs.ext4", "-q", "-F", img).CombinedOutput(); err != nil {
		return "", fmt.Errorf("mkfs.ext4: %v: %s", err, out)
	}
	mp := t.TempDir()
	if out, err := exec.Command("mount", "-o", "loop", img, mp).CombinedOutput(); err != nil {
		return "", fmt.Errorf("mount -o loop: %v: %s", err, out)
	}
	// Registered after TempDir's own clean-up, so it runs before it.
	t.Cleanup(func() {
		if out, err := exec.Command("umount", mp).CombinedOutput(); err != nil {
			t.Errorf("umount %s: %v: %s", mp, err, out)
		}
	})
	return mp, nil
}

// shmDir returns a directory on tmpfs, or "" if /dev/shm is not one.
func shmDir(t testing.TB) string {
	t.Helper()
	var sfs unix.Statfs_t
	if err := unix.Statfs("/dev/shm", &sfs); err != nil || sfs.Type != unix.TMPFS_MAGIC {
		return ""
	}
	d, err := os.MkdirTemp("/dev/shm", "aiotest")
	if err != nil {
		return ""
	}
	t.Cleanup(func() { os.RemoveAll(d) })
	return d
}

// engineCase is one way of opening a file, used by the table-driven tests.
type engineCase struct {
	name       string
	dir        string
	opts       Options
	wantDirect bool
}

// engineCases lists the direct engine (if the machine has a direct-I/O
// filesystem), the fallback forced by Options, and the fallback chosen
// automatically on tmpfs.
func engineCases(t *testing.T) []engineCase {
	t.Helper()
	var cs []engineCase
	if d, why := findDirectDir(t); d != "" {
		cs = append(cs, engineCase{"direct", d, Options{}, true})
	} else if testenv.Required() {
		// The fallback cases below still run on a developer's
		// machine without direct I/O; CI must test the direct engine.
		t.Fatalf("no O_DIRECT-capable directory, direct engine not tested: %s", why)
	} else {
		t.Logf("no O_DIRECT-capable directory, direct engine not tested: %s", why)
	}
	cs = append(cs, engineCase{"forced-fallback", t.TempDir(), Options{NoDirectIO: true}, false})
	if d := shmDir(t); d != "" {
		cs = append(cs, engineCase{"tmpfs-fallback", d, Options{}, false})
	} else {
		t.Log("/dev/shm is not tmpfs: automatic fallback not tested")
	}
	return cs
}

func createFile(t testing.TB, dir string, data []byte) string {
	t.Helper()
	p := filepath.Join(dir, fmt.Sprintf("img-%d", rand.Int64()))
	if err := os.WriteFile(p, data, 0o644); err != nil {
		t.Fatal(err)
	}
	return p
}

func openCase(t testing.TB, c engineCase, path string) *File {
	t.Helper()
	// Tests open one file through several Files (writable or not): the
	// image locks are TestImageLocks' business.
	o := c.opts
	o.NoLock = true
	f, err := Open(path, o)
	if err != nil {
		t.Fatal(err)
	}
	if f.Direct() != c.wantDirect {
		t.Fatalf("Direct() = %v, want %v (engine: %s)", f.Direct(), c.wantDirect, f.Engine())
	}
	t.Cleanup(func() { f.Close() })
	return f
}

func randBytes(r *rand.Rand, n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(r.Uint32())
	}
	return b
}

// misaligned returns a slice of n bytes whose address is off bytes past a
// 4096 boundary.
func misaligned(n, off int) []byte {
	return AlignedBuffer(n + off)[off : off+n]
}

func TestOpenEngines(t *testing.T) {
	for _, c := range engineCases(t) {
		t.Run(c.name, func(t *testing.T) {
			p := createFile(t, c.dir, make([]byte, 1000))
			f := openCase(t, c, p)
			t.Logf("engine: %s", f.Engine())
			if c.wantDirect {
				if f.Align() < 512 || !isPow2(f.Align()) || !isPow2(f.MemAlign()) {
					t.Errorf("Align %d MemAlign %d", f.Align(), f.MemAlign())
				}
			} else if f.Align() != 1 || f.MemAlign() != 1 {
				t.Errorf("fallback Align %d MemAlign %d, want 1, 1", f.Align(), f.MemAlign())
			}
			if sz, err := f.Size(); err != nil || sz != 1000 {
				t.Errorf("Size = %d, %v; want 1000", sz, err)
			}
			st, _ := os.Stat(p)
			if mt, err := f.ModTime(); err != nil || !mt.Equal(st.ModTime()) {
				t.Errorf("ModTime = %v, %v; want %v", mt, err, st.ModTime())
			}
			if want := st.Sys().(*syscall.Stat_t).Blocks * 512; want == 0 {
				t.Errorf("a file of 1000 written bytes occupies no block")
			} else if a, err := f.Allocated(); err != nil || a != want {
				t.Errorf("Allocated = %d, %v; want %d (st_blocks × 512)", a, err, want)
			}
			if f.Name() != p {
				t.Errorf("Name = %q", f.Name())
			}
		})
	}
	if _, err := Open(filepath.Join(t.TempDir(), "missing"), Options{}); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("Open(missing) = %v, want ErrNotExist", err)
	}
}

func TestReadOnly(t *testing.T) {
	for _, c := range engineCases(t) {
		t.Run(c.name, func(t *testing.T) {
			p := createFile(t, c.dir, bytes.Repeat([]byte{7}, 4096))
			c.opts.ReadOnly = true
			f := openCase(t, c, p)
			buf := make([]byte, 10)
			if err := f.Pread(buf, 5); err != nil || !bytes.Equal(buf, bytes.Repeat([]byte{7}, 10)) {
				t.Fatalf("Pread = %v %v", buf, err)
			}
			if err := f.Pwrite(buf, 0); !errors.Is(err, ErrReadOnly) {
				t.Errorf("Pwrite on read-only = %v, want ErrReadOnly", err)
			}
			if err := f.Truncate(0); !errors.Is(err, ErrReadOnly) {
				t.Errorf("Truncate on read-only = %v, want ErrReadOnly", err)
			}
		})
	}
}

// TestModel applies a seeded random sequence of reads and writes (aligned
// and not, in offset, length and memory address; some past the end) to the
// file and to a byte slice, comparing every read and the final contents.
func TestModel(t *testing.T) {
	for _, c := range engineCases(t) {
		t.Run(c.name, func(t *testing.T) {
			seed := uint64(time.Now().UnixNano())
			t.Logf("seed %d", seed)
			r := rand.New(rand.NewPCG(seed, 1))
			model := randBytes(r, 100_000+37) // not a multiple of 512
			f := openCase(t, c, createFile(t, c.dir, model))
			for step := 0; step < 400; step++ {
				var off, n int
				switch r.IntN(3) {
				case 0: // block aligned
					off = r.IntN(60) * 4096
					n = (1 + r.IntN(8)) * 4096
				case 1: // sector aligned
					off = r.IntN(250) * 512
					n = (1 + r.IntN(16)) * 512
				default:
					off = r.IntN(len(model) + 3000)
					n = 1 + r.IntN(20000)
				}
				memOff := 0
				if r.IntN(3) == 0 {
					memOff = 1 + r.IntN(600)
				}
				useCo := r.IntN(2) == 0
				if r.IntN(2) == 0 {
					data := randBytes(r, n)
					buf := misaligned(n, memOff)
					copy(buf, data)
					var err error
					if useCo {
						coroutine.Run(func(co *coroutine.Co) { err = f.PwriteCo(co, buf, int64(off)) })
					} else {
						err = f.Pwrite(buf, int64(off))
					}
					if err != nil {
						t.Fatalf("step %d: write [%d,+%d): %v", step, off, n, err)
					}
					if off+n > len(model) {
						model = append(model, make([]byte, off+n-len(model))...)
					}
					copy(model[off:], data)
				} else {
					buf := misaligned(n, memOff)
					for i := range buf {
						buf[i] = 0xee // must be overwritten, zeros past EOF included
					}
					var err error
					if useCo {
						coroutine.Run(func(co *coroutine.Co) { err = f.PreadCo(co, buf, int64(off)) })
					} else {
						err = f.Pread(buf, int64(off))
					}
					if err != nil {
						t.Fatalf("step %d: read [%d,+%d): %v", step, off, n, err)
					}
					want := make([]byte, n)
					if off < len(model) {
						copy(want, model[off:])
					}
					if i := firstDiff(buf, want); i >= 0 {
						t.Fatalf("step %d: read [%d,+%d) mem+%d: byte %d = %#x, want %#x",
							step, off, n, memOff, i, buf[i], want[i])
					}
				}
				if sz, err := f.Size(); err != nil || sz != int64(len(model)) {
					t.Fatalf("step %d: Size = %d, %v; want %d", step, sz, err, len(model))
				}
			}
			if err := f.Fdatasync(); err != nil {
				t.Fatal(err)
			}
			got, err := os.ReadFile(f.Name())
			if err != nil {
				t.Fatal(err)
			}
			if len(got) != len(model) {
				t.Fatalf("final size %d, want %d", len(got), len(model))
			}
			if i := firstDiff(got, model); i >= 0 {
				t.Fatalf("final contents differ at %d", i)
			}
		})
	}
}

func firstDiff(a, b []byte) int {
	for i := range min(len(a), len(b)) {
		if a[i] != b[i] {
			return i
		}
	}
	if len(a) != len(b) {
		return min(len(a), len(b))
	}
	return -1
}

func TestReadPastEOF(t *testing.T) {
	const size = 1000 // not a multiple of 512
	tests := []struct {
		name   string
		off, n int
	}{
		{"straddle-aligned", 512, 1024},
		{"straddle-unaligned", 900, 300},
		{"exactly-at-eof", size, 512},
		{"past-eof-aligned", 4096, 4096},
		{"past-eof-unaligned", 5000, 10},
		{"whole-and-more", 0, 8192},
	}
	for _, c := range engineCases(t) {
		t.Run(c.name, func(t *testing.T) {
			data := bytes.Repeat([]byte{0xab}, size)
			f := openCase(t, c, createFile(t, c.dir, data))
			for _, tt := range tests {
				for _, plain := range []bool{false, true} {
					buf := AlignedBuffer(tt.n)
					for i := range buf {
						buf[i] = 0x55
					}
					var err error
					if plain {
						err = f.Pread(buf, int64(tt.off))
					} else {
						coroutine.Run(func(co *coroutine.Co) { err = f.PreadCo(co, buf, int64(tt.off)) })
					}
					if err != nil {
						t.Fatalf("%s: %v", tt.name, err)
					}
					for i, b := range buf {
						want := byte(0)
						if tt.off+i < size {
							want = 0xab
						}
						if b != want {
							t.Fatalf("%s plain=%v: byte %d = %#x, want %#x", tt.name, plain, i, b, want)
						}
					}
				}
			}
			if sz, _ := f.Size(); sz != size {
				t.Errorf("a read changed the size to %d", sz)
			}
		})
	}
}

func TestPreadAlignedCo(t *testing.T) {
	for _, c := range engineCases(t) {
		t.Run(c.name, func(t *testing.T) {
			r := rand.New(rand.NewPCG(1, 2))
			data := randBytes(r, 64<<10)
			f := openCase(t, c, createFile(t, c.dir, data))
			tests := []struct {
				name          string
				off, n, mem   int
				wantOKAligned bool // for the direct engine
			}{
				{"aligned", 4096, 8192, 0, true},
				{"sector", 512, 512, 0, f.Align() <= 512 && f.MemAlign() <= 512},
				{"odd-offset", 100, 4096, 0, false},
				{"odd-length", 4096, 100, 0, false},
				{"odd-memory", 4096, 4096, 3, false},
				{"past-eof", 60 << 10, 8192, 0, true},
			}
			for _, tt := range tests {
				buf := misaligned(tt.n, tt.mem)
				for i := range buf {
					buf[i] = 0x11
				}
				var ok bool
				var err error
				coroutine.Run(func(co *coroutine.Co) { ok, err = f.PreadAlignedCo(co, buf, int64(tt.off)) })
				if err != nil {
					t.Fatalf("%s: %v", tt.name, err)
				}
				wantOK := tt.wantOKAligned || !f.Direct()
				if ok != wantOK {
					t.Fatalf("%s: ok = %v, want %v", tt.name, ok, wantOK)
				}
				want := bytes.Repeat([]byte{0x11}, tt.n)
				if ok {
					want = make([]byte, tt.n)
					if tt.off < len(data) {
						copy(want, data[tt.off:])
					}
				}
				if !bytes.Equal(buf, want) {
					t.Fatalf("%s: ok=%v but buffer content wrong", tt.name, ok)
				}
			}
		})
	}
}

// TestConcurrentCoroutines has many coroutines, each on its own goroutine,
// write then read back their own regions, half of them unaligned.
func TestConcurrentCoroutines(t *testing.T) {
	for _, c := range engineCases(t) {
		t.Run(c.name, func(t *testing.T) {
			const workers, region = 48, 12288
			f := openCase(t, c, createFile(t, c.dir, make([]byte, workers*region)))
			var wg sync.WaitGroup
			errs := make(chan error, workers)
			for w := 0; w < workers; w++ {
				wg.Add(1)
				go func() {
					defer wg.Done()
					r := rand.New(rand.NewPCG(uint64(w), 3))
					for i := 0; i < 20; i++ {
						off := w*region + r.IntN(region/2)
						n := 1 + r.IntN(region/2)
						if w%2 == 0 {
							off, n = w*region+r.IntN(region/4096)*4096, 4096
						}
						data := randBytes(r, n)
						got := make([]byte, n)
						var err error
						coroutine.Run(func(co *coroutine.Co) {
							if err = f.PwriteCo(co, data, int64(off)); err == nil {
								err = f.PreadCo(co, got, int64(off))
							}
						})
						if err == nil && !bytes.Equal(got, data) {
							err = fmt.Errorf("worker %d: [%d,+%d) read back differs", w, off, n)
						}
						if err != nil {
							errs <- err
							return
						}
					}
				}()
			}
			wg.Wait()
			close(errs)
			for err := range errs {
				t.Error(err)
			}
		})
	}
}

// TestUnalignedSameBlock has many writers each write their own few bytes
// of the same 512-byte block at once: read-modify-write must lose none.
func TestUnalignedSameBlock(t *testing.T) {
	for _, c := range engineCases(t) {
		t.Run(c.name, func(t *testing.T) {
			const writers, each = 64, 8 // 64×8 = 512 bytes
			for round := 0; round < 5; round++ {
				f := openCase(t, c, createFile(t, c.dir, make([]byte, 4096+100)))
				var wg sync.WaitGroup
				start := make(chan struct{})
				errs := make(chan error, writers)
				for w := 0; w < writers; w++ {
					wg.Add(1)
					go func() {
						defer wg.Done()
						data := bytes.Repeat([]byte{byte(w + 1)}, each)
						<-start
						var err error
						if w%2 == 0 {
							coroutine.Run(func(co *coroutine.Co) { err = f.PwriteCo(co, data, int64(1024+w*each)) })
						} else {
							err = f.Pwrite(data, int64(1024+w*each))
						}
						if err != nil {
							errs <- err
						}
					}()
				}
				close(start)
				wg.Wait()
				close(errs)
				for err := range errs {
					t.Fatal(err)
				}
				got := make([]byte, writers*each)
				if err := f.Pread(got, 1024); err != nil {
					t.Fatal(err)
				}
				for w := 0; w < writers; w++ {
					for i := 0; i < each; i++ {
						if b := got[w*each+i]; b != byte(w+1) {
							t.Fatalf("round %d: writer %d's byte %d = %d: lost update", round, w, i, b)
						}
					}
				}
			}
		})
	}
}

// TestExtendingUnalignedWrites grows the file with concurrent unaligned
// writes past the end: the size must end exactly at the furthest byte.
func TestExtendingUnalignedWrites(t *testing.T) {
	for _, c := range engineCases(t) {
		t.Run(c.name, func(t *testing.T) {
			f := openCase(t, c, createFile(t, c.dir, make([]byte, 777)))
			const writers = 16
			var wg sync.WaitGroup
			for w := 0; w < writers; w++ {
				wg.Add(1)
				go func() {
					defer wg.Done()
					data := bytes.Repeat([]byte{byte(w + 1)}, 300)
					coroutine.Run(func(co *coroutine.Co) {
						if err := f.PwriteCo(co, data, int64(1000+w*1000)); err != nil {
							t.Error(err)
						}
					})
				}()
			}
			wg.Wait()
			want := int64(1000 + (writers-1)*1000 + 300)
			if sz, err := f.Size(); err != nil || sz != want {
				t.Fatalf("Size = %d, %v; want %d", sz, err, want)
			}
			got, _ := os.ReadFile(f.Name())
			for w := 0; w < writers; w++ {
				for i := 0; i < 300; i++ {
					if got[1000+w*1000+i] != byte(w+1) {
						t.Fatalf("writer %d byte %d lost", w, i)
					}
				}
				for i := 1000 + w*1000 - 700; i < 1000+w*1000; i++ {
					if i >= 777 && got[i] != 0 {
						t.Fatalf("gap byte %d = %d, want 0", i, got[i])
					}
				}
			}
		})
	}
}

// TestCloseWithInflight closes the file while reads and writes are in
// flight: Close must wait for them, and no operation may fail with
// anything but ErrClosed.
func TestCloseWithInflight(t *testing.T) {
	for _, c := range engineCases(t) {
		t.Run(c.name, func(t *testing.T) {
			f, err := Open(createFile(t, c.dir, make([]byte, 1<<20)), c.opts)
			if err != nil {
				t.Fatal(err)
			}
			var wg sync.WaitGroup
			var mu sync.Mutex
			var okOps, closedOps int
			for w := 0; w < 32; w++ {
				wg.Add(1)
				go func() {
					defer wg.Done()
					for i := 0; ; i++ {
						buf := AlignedBuffer(4096)
						var err error
						coroutine.Run(func(co *coroutine.Co) {
							off := int64((w*37+i)%256) * 4096
							if i%2 == 0 {
								err = f.PwriteCo(co, buf[:1000], off+3)
							} else {
								err = f.PreadCo(co, buf, off)
							}
						})
						mu.Lock()
						switch {
						case err == nil:
							okOps++
						case errors.Is(err, ErrClosed):
							closedOps++
						default:
							t.Errorf("op failed with %v, want nil or ErrClosed", err)
						}
						mu.Unlock()
						if err != nil {
							return
						}
					}
				}()
			}
			time.Sleep(20 * time.Millisecond)
			if err := f.Close(); err != nil {
				t.Fatal(err)
			}
			if err := f.Pread(make([]byte, 1), 0); !errors.Is(err, ErrClosed) {
				t.Errorf("Pread after Close = %v, want ErrClosed", err)
			}
			if _, err := f.Allocated(); !errors.Is(err, ErrClosed) {
				t.Errorf("Allocated after Close = %v, want ErrClosed", err)
			}
			if err := f.Close(); !errors.Is(err, ErrClosed) {
				t.Errorf("second Close = %v, want ErrClosed", err)
			}
			wg.Wait()
			t.Logf("%d operations completed, %d refused after Close", okOps, closedOps)
			if closedOps != 32 {
				t.Errorf("%d workers saw ErrClosed, want 32", closedOps)
			}
		})
	}
}

func TestFdatasyncTruncateFallocate(t *testing.T) {
	for _, c := range engineCases(t) {
		t.Run(c.name, func(t *testing.T) {
			f := openCase(t, c, createFile(t, c.dir, bytes.Repeat([]byte{9}, 10000)))
			coroutine.Run(func(co *coroutine.Co) {
				if err := f.FdatasyncCo(co); err != nil {
					t.Errorf("FdatasyncCo: %v", err)
				}
				if err := f.TruncateCo(co, 5000); err != nil {
					t.Errorf("TruncateCo: %v", err)
				}
			})
			if err := f.Fdatasync(); err != nil {
				t.Errorf("Fdatasync: %v", err)
			}
			if sz, _ := f.Size(); sz != 5000 {
				t.Fatalf("Size after truncate = %d", sz)
			}
			// A write after shrinking must see the new size (cached in
			// the range lock for the direct engine).
			if err := f.Pwrite([]byte{1, 2, 3}, 6000); err != nil {
				t.Fatal(err)
			}
			if sz, _ := f.Size(); sz != 6003 {
				t.Fatalf("Size after extending write = %d, want 6003", sz)
			}
			err := f.Fallocate(unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, 0, 4096)
			if errors.Is(err, unix.EOPNOTSUPP) {
				testenv.Skip(t, "punch hole not supported here: %v", err)
			}
			if err != nil {
				t.Fatal(err)
			}
			buf := make([]byte, 5000)
			if err := f.Pread(buf, 0); err != nil {
				t.Fatal(err)
			}
			for i, b := range buf {
				want := byte(0)
				if i >= 4096 {
					want = 9
				}
				if b != want {
					t.Fatalf("after punch, byte %d = %d, want %d", i, b, want)
				}
			}
			if off, err := f.Seek(0, unix.SEEK_DATA); err != nil || off != 4096 {
				t.Logf("SEEK_DATA = %d, %v (filesystem-dependent)", off, err)
			}
		})
	}
}

func TestAlignedBuffer(t *testing.T) {
	for _, n := range []int{0, 1, 512, 4096, 100000} {
		b := AlignedBuffer(n)
		if len(b) != n {
			t.Errorf("len = %d, want %d", len(b), n)
		}
		if n > 0 && uintptrOf(b)%4096 != 0 {
			t.Errorf("AlignedBuffer(%d) at %#x", n, uintptrOf(b))
		}
	}
}

func uintptrOf(b []byte) uintptr { return uintptr(unsafe.Pointer(unsafe.SliceData(b))) }

// TestOFDLock checks that FcntlFlock reaches the descriptor with OFD
// semantics: a lock taken through one File is seen by another File.
func TestOFDLock(t *testing.T) {
	for _, c := range engineCases(t) {
		t.Run(c.name, func(t *testing.T) {
			p := createFile(t, c.dir, make([]byte, 4096))
			a := openCase(t, c, p)
			b := openCase(t, c, p)
			lk := unix.Flock_t{Type: unix.F_RDLCK, Whence: 0, Start: 100, Len: 1}
			if err := a.FcntlFlock(unix.F_OFD_SETLK, &lk); err != nil {
				t.Fatal(err)
			}
			probe := unix.Flock_t{Type: unix.F_WRLCK, Whence: 0, Start: 100, Len: 1}
			if err := b.FcntlFlock(unix.F_OFD_GETLK, &probe); err != nil {
				t.Fatal(err)
			}
			if probe.Type != unix.F_RDLCK {
				t.Errorf("GETLK from another File: type %d, want F_RDLCK held", probe.Type)
			}
			wr := unix.Flock_t{Type: unix.F_WRLCK, Whence: 0, Start: 100, Len: 1}
			if err := b.FcntlFlock(unix.F_OFD_SETLK, &wr); !errors.Is(err, unix.EAGAIN) {
				t.Errorf("conflicting SETLK = %v, want EAGAIN", err)
			}
		})
	}
}

// TestImageLocks checks QEMU's locking protocol between two Files: two
// readers share, a writer excludes a second writer and a reader (readers
// refuse to share write), and NoLock opens regardless.
func TestImageLocks(t *testing.T) {
	p := createFile(t, t.TempDir(), make([]byte, 4096))
	open := func(o Options) (*File, error) {
		o.NoDirectIO = true
		return Open(p, o)
	}
	r1, err := open(Options{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	r2, err := open(Options{ReadOnly: true})
	if err != nil {
		t.Fatalf("second reader: %v", err)
	}
	var le *LockError
	if _, err := open(Options{}); !errors.As(err, &le) || le.Perm != "write" {
		t.Fatalf("writer beside readers: %v, want a write LockError", err)
	}
	r1.Close()
	r2.Close()
	w, err := open(Options{})
	if err != nil {
		t.Fatalf("writer alone: %v", err)
	}
	if _, err := open(Options{}); !errors.As(err, &le) {
		t.Fatalf("second writer: %v, want a LockError", err)
	}
	if _, err := open(Options{ReadOnly: true}); !errors.As(err, &le) || !le.Shared {
		t.Fatalf("reader beside a writer: %v, want a shared LockError", err)
	}
	f, err := open(Options{ReadOnly: true, NoLock: true})
	if err != nil {
		t.Fatalf("NoLock beside a writer: %v", err)
	}
	f.Close()
	w.Close()
	if f, err = open(Options{}); err != nil {
		t.Fatalf("writer after close: %v", err)
	}
	f.Close()
}
