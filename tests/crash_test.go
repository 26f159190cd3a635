package tests

import (
	"fmt"
	"math/rand"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"imgfuse/drivers/driverstest"
)

// durable is a region written and fsynced before a crash: it must read back
// identically after any later crash.
type durable struct {
	off  int64
	data []byte
}

// crashRounds is the number of kills TestCrash makes in all, spread over
// its cases in proportion to their default shares: IMGFUSE_CRASH_ROUNDS,
// or the CI slice (about a minute with -race on two cores). `make crash`
// runs hundreds.
func crashRounds(t *testing.T, base []int) []int {
	total := 0
	for _, b := range base {
		total += b
	}
	v := os.Getenv("IMGFUSE_CRASH_ROUNDS")
	if v == "" {
		return base
	}
	want, err := strconv.Atoi(v)
	if err != nil || want < 1 {
		t.Fatalf("IMGFUSE_CRASH_ROUNDS=%q: want a positive number", v)
	}
	out := make([]int, len(base))
	for i, b := range base {
		out[i] = max(1, (want*b+total/2)/total)
	}
	return out
}

// TestCrash kills the daemon with SIGKILL at random moments of a write
// workload, again and again on the same image. Without lazy refcounts
// qemu-img check may find leaked clusters (exit 3) but never corruption
// (exit 2); with lazy refcounts the image may be left dirty, and the next
// read-write mount must repair it so that check is clean after it. Data
// acknowledged by fsync before a kill reads back after every remount.
//
// A failed round fails the test and the case goes on with a fresh image,
// so that a long run (IMGFUSE_CRASH_ROUNDS) counts every failure; the test
// prints "crash rounds: N passed, N failed" at the end.
func TestCrash(t *testing.T) {
	t.Parallel()
	requireE2E(t)
	cases := []struct {
		name, opts string
		flags      []string
		rounds     int
	}{
		// Rounds are few where each costs a mount or two; together
		// they stay around a minute with -race on two cores.
		{"raw", "raw", nil, 2},
		{"plain", "", nil, 8},
		{"lazy-refcounts", "lazy_refcounts=on", nil, 6},
		{"lazy-refcounts-flag", "", []string{"--lazy-refcounts"}, 3},
		{"cluster4k-refcount1", "cluster_size=4096,refcount_bits=1", nil, 3},
		{"extended-l2", "extended_l2=on,cluster_size=65536", nil, 2},
		{"overlay-on-raw", "backing", nil, 3},
		{"vdi", "vdi", nil, 3},
		{"vpc", "vpc", nil, 3},
		{"vmdk", "vmdk", nil, 3},
		// A VMDK delta link: partial-grain writes copy the rest of the
		// grain from the parent while the daemon dies.
		{"vmdk-child", "vmdk-child", nil, 2},
		{"vhdx", "vhdx", nil, 3},
	}
	base := make([]int, len(cases))
	for i, c := range cases {
		base[i] = c.rounds
	}
	rounds := crashRounds(t, base)
	var passed, failed atomic.Int64
	t.Cleanup(func() {
		fmt.Printf("crash rounds: %d passed, %d failed\n", passed.Load(), failed.Load())
	})
	for ci, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			seed := writeSeed(t)
			rng := rand.New(rand.NewSource(seed))
			lazy := c.opts == "lazy_refcounts=on" || len(c.flags) > 0
			raw := c.opts == "raw"
			var img string
			var keep frozen
			// acked holds, per 1 MiB slot of the first 8 MiB (which the
			// background writers never touch), the last region written
			// and fsynced there.
			var acked map[int64]durable
			fresh := func() {
				acked = map[int64]durable{}
				switch {
				case raw:
					img = zeroRaw(t, writeSize)
				case c.opts == "vmdk-child":
					dir := t.TempDir()
					b, r := filepath.Join(dir, "base.vmdk"), filepath.Join(dir, "base.raw")
					randomFull(t, r, writeSize, 23)
					driverstest.Cmd(t, "qemu-img", "convert", "-f", "raw", "-O", "vmdk", r, b)
					img = filepath.Join(dir, "img.vmdk")
					driverstest.Cmd(t, "qemu-img", "create", "-q", "-f", "vmdk", "-b", "base.vmdk", "-F", "vmdk", img)
					keep = freeze(t, b)
				case foreignFormat(c.opts) != "":
					img = filepath.Join(t.TempDir(), "img."+c.opts)
					driverstest.Cmd(t, "qemu-img", "create", "-q", "-f", c.opts, img, fmtSize(writeSize))
				case c.opts == "backing":
					// Partial-cluster writes copy the rest of the
					// cluster from the backing file while the daemon
					// dies.
					dir := t.TempDir()
					b := filepath.Join(dir, "base.raw")
					randomFull(t, b, writeSize, 21)
					img = filepath.Join(dir, "img.qcow2")
					driverstest.Cmd(t, "qemu-img", "create", "-q", "-f", "qcow2", "-b", b, "-F", "raw", "-o", "cluster_size=65536", img, fmtSize(writeSize))
					keep = freeze(t, b)
				default:
					img = createQcow2(t, t.TempDir(), c.opts)
				}
			}
			fresh()
			round := func(it int) bool {
				mp, disk := mount(t, img, false, c.flags...)
				// Everything acknowledged before earlier kills is there.
				for _, d := range acked {
					errno, got := readErrno(t, disk, d.off, int64(len(d.data)))
					if errno != 0 {
						t.Errorf("round %d: read of fsynced region [%d, +%d): %v", it, d.off, len(d.data), errno)
						return false
					}
					if i := firstDiff(got, d.data); i >= 0 {
						t.Errorf("round %d: fsynced region [%d, +%d) differs at %d after a crash", it, d.off, len(d.data), d.off+int64(i))
						return false
					}
				}
				slot := int64(it % 8)
				d := durable{off: slot<<20 + rng.Int63n(4096)*17, data: patternAt(0, 100000+rng.Int63n(300000), byte(it+1))}
				if err := writeSync(disk, d); err != nil {
					t.Errorf("round %d: durable region: %v", it, err)
					return false
				}
				acked[slot] = d

				pid := daemonPID(t, mp)
				stop := make(chan struct{})
				var killed atomic.Bool
				var ops atomic.Int64
				var wg sync.WaitGroup
				errs := make(chan error, 3)
				for w := 0; w < 3; w++ {
					wg.Add(1)
					go func(wseed int64) {
						defer wg.Done()
						errs <- crashWriter(disk, wseed, stop, &killed, &ops)
					}(rng.Int63())
				}
				// If the test stops early, the writers must close the
				// disk before the cleanup unmounts it.
				stopOnce := sync.OnceFunc(func() { close(stop) })
				t.Cleanup(func() { stopOnce(); wg.Wait() })
				delay := time.Duration(20+rng.Intn(281)) * time.Millisecond
				// Count the delay from the first completed request, so
				// the kill hits a busy daemon even on a loaded machine.
				if !waitFor(10*time.Second, func() bool { return ops.Load() > 0 }) {
					t.Errorf("round %d: no write completed in 10s", it)
				}
				time.Sleep(delay)
				done := ops.Load()
				killed.Store(true)
				if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
					t.Fatal(err)
				}
				stopOnce()
				if !waitFor(10*time.Second, func() bool { return !alive(pid) && filesClosed(pid) }) {
					t.Fatalf("daemon %d still alive (or holding files) 10s after SIGKILL", pid)
				}

				exited := make(chan struct{})
				go func() { wg.Wait(); close(exited) }()
				select {
				case <-exited:
				case <-time.After(10 * time.Second):
					t.Fatalf("writers still blocked 10s after the daemon died")
				}
				close(errs)
				ok := true
				for err := range errs {
					if err != nil {
						t.Errorf("round %d: a writer failed before the kill: %v", it, err)
						ok = false
					}
				}
				unmountBusyRetry(t, mp)
				// With FUSE passthrough the kernel holds the image file
				// (and its locks) until the dead mount is gone.
				if !waitFor(10*time.Second, func() bool { return !imageLocked(t, img) }) {
					t.Fatalf("round %d: %s still locked 10s after its daemon died and the mount went", it, img)
				}
				if raw {
					return ok
				}
				if f := foreignFormat(c.opts); f != "" {
					return ok && foreignCrashCheck(t, it, img, f)
				}

				code, out := qemuCheck(t, img)
				t.Logf("round %d: killed after %v and %d completed requests; qemu-img check exit %d", it, delay, done, code)
				switch {
				case code == 0 || code == 3:
				case code == 2 && lazy && dirtyBit(t, img):
				default:
					t.Errorf("round %d: qemu-img check after kill -9: exit %d\n%s", it, code, out)
					return false
				}
				if lazy && code != 0 {
					// The next read-write mount repairs, its clean
					// unmount leaves the image clean.
					mp, _ := mount(t, img, false, c.flags...)
					unmountBusyRetry(t, mp)
					if code, out := qemuCheck(t, img); code != 0 {
						t.Errorf("round %d: after a repairing RW mount, qemu-img check exit %d\n%s", it, code, out)
						return false
					}
				}
				return ok
			}
			for it := range rounds[ci] {
				if round(it) {
					passed.Add(1)
					continue
				}
				failed.Add(1)
				t.Logf("round %d failed (IMGFUSE_SEED=%d); going on with a fresh image", it, seed)
				fresh()
			}
			// Last: a clean mount and unmount reads everything once more
			// and must not make anything worse.
			mp, disk := mount(t, img, false, c.flags...)
			for _, d := range acked {
				errno, got := readErrno(t, disk, d.off, int64(len(d.data)))
				if errno != 0 || firstDiff(got, d.data) >= 0 {
					t.Fatalf("final: fsynced region [%d, +%d) lost (errno %v)", d.off, len(d.data), errno)
				}
			}
			unmountBusyRetry(t, mp)
			keep.check(t)
			if raw {
				return
			}
			if f := foreignFormat(c.opts); f != "" {
				// After a clean unmount: VDI, VMDK and VHDX check clean, VHD opens.
				if !foreignCrashCheck(t, -1, img, f) {
					t.Fatal("final check failed")
				}
				return
			}
			code, out := qemuCheck(t, img)
			if code != 0 && (lazy || code != 3) {
				t.Fatalf("final qemu-img check exit %d\n%s", code, out)
			}
		})
	}
}

// foreignFormat is the format of a TestCrash case's image if it is a VDI,
// VHD or VMDK one, else "".
func foreignFormat(opts string) string {
	switch opts {
	case "vdi", "vpc", "vmdk", "vhdx":
		return opts
	case "vmdk-child":
		return "vmdk"
	}
	return ""
}

// filesClosed reports whether process pid holds no open files any more. A
// dying process gives up its memory (alive turns false) before its files,
// and with them its OFD locks on the image; and its files stay open until
// its last thread has exited, which a thread blocked in I/O delays while
// the leader's own /proc/PID/fd is already empty. qemu-img check in that
// window fails with "Failed to get shared write lock" (1 to 5 rounds in
// 300 did).
func filesClosed(pid int) bool {
	tasks, err := os.ReadDir(fmt.Sprintf("/proc/%d/task", pid))
	if err != nil {
		return true
	}
	for _, task := range tasks {
		fds, err := os.ReadDir(fmt.Sprintf("/proc/%d/task/%s/fd", pid, task.Name()))
		if err == nil && len(fds) > 0 {
			return false
		}
	}
	return true
}

// imageLocked reports whether anyone holds one of QEMU's lock bytes
// (100-299, see aio/lock.go) on the image.
func imageLocked(t *testing.T, img string) bool {
	f, err := os.Open(img)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	lk := unix.Flock_t{Type: unix.F_WRLCK, Whence: 0, Start: 100, Len: 200}
	if err := unix.FcntlFlock(f.Fd(), unix.F_OFD_GETLK, &lk); err != nil {
		t.Fatal(err)
	}
	return lk.Type != unix.F_UNLCK
}

// writeSync writes d to disk and fsyncs it.
func writeSync(disk string, d durable) error {
	f, err := os.OpenFile(disk, os.O_RDWR, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	if _, err := f.WriteAt(d.data, d.off); err != nil {
		return err
	}
	return f.Sync()
}

// crashWriter writes, punches and fsyncs random ranges in the upper 3/4 of
// the 32 MiB disk until stop is closed or a request fails. After the daemon
// is killed every request fails, which is expected; a failure before that
// (killed still false) is returned.
func crashWriter(disk string, seed int64, stop <-chan struct{}, killed *atomic.Bool, ops *atomic.Int64) error {
	rng := rand.New(rand.NewSource(seed))
	f, err := os.OpenFile(disk, os.O_RDWR, 0)
	if err != nil {
		return unlessKilled(killed, err)
	}
	defer f.Close()
	d, err := os.OpenFile(disk, os.O_RDWR|syscall.O_DIRECT, 0)
	if err != nil {
		return unlessKilled(killed, err)
	}
	defer d.Close()
	const lo, hi = 8 << 20, writeSize
	for {
		select {
		case <-stop:
			return nil
		default:
		}
		n := 1 + rng.Int63n(256<<10)
		off := lo + rng.Int63n(hi-lo-n)
		switch r := rng.Intn(10); {
		case r < 5:
			p := make([]byte, n)
			rng.Read(p)
			_, err = f.WriteAt(p, off)
		case r < 7:
			n = (n + 4095) &^ 4095
			off &^= 4095
			p := driverstest.AlignedBuffer(int(n), 4096)
			rng.Read(p)
			_, err = d.WriteAt(p, off)
		case r < 8:
			err = unix.Fallocate(int(f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, n)
		default:
			err = f.Sync()
		}
		if err != nil {
			return unlessKilled(killed, fmt.Errorf("op at %d (+%d): %w", off, n, err))
		}
		ops.Add(1)
	}
}

func unlessKilled(killed *atomic.Bool, err error) error {
	if killed.Load() {
		return nil
	}
	return err
}

// foreignCrashCheck judges a VDI, VHD, VHDX or VMDK image after a kill -9.
// VHDX: the log may hold the last BAT update (written and synced, the kill
// before the headers dropped its GUID): qemu-img check -r all replays it
// as the next open would, and must then find no error.
// VMDK: qemu-img check is clean (a grain written and synced but not yet
// named by its grain table entry is leaked space, which it does not
// count). VDI: qemu-img check is clean, or finds only the allocated count one behind a block
// whose map entry was written (the kill fell between the two writes,
// drivers/vdi), which the next read-write mount repairs. VHD has no
// qemu-img check: QEMU must open it (no BAT entry past the end) and read
// it whole.
func foreignCrashCheck(t *testing.T, it int, img, format string) bool {
	t.Helper()
	if format == "vpc" {
		if code, out := exitCode(t, "qemu-img", "convert", "-f", "vpc", "-O", "raw", img, filepath.Join(t.TempDir(), "out.raw")); code != 0 {
			t.Errorf("round %d: qemu-img convert after kill -9: exit %d\n%s", it, code, out)
			return false
		}
		return true
	}
	if format == "vhdx" {
		if code, out := exitCode(t, "qemu-img", "check", "-r", "all", "-f", "vhdx", img); code != 0 || strings.Contains(out, "ERROR") {
			t.Errorf("round %d: qemu-img check -r all after kill -9: exit %d\n%s", it, code, out)
			return false
		}
		return true
	}
	if format == "vmdk" {
		if code, out := exitCode(t, "qemu-img", "check", "-f", "vmdk", img); code != 0 || !strings.Contains(out, "No errors") {
			t.Errorf("round %d: qemu-img check after kill -9: exit %d\n%s", it, code, out)
			return false
		}
		return true
	}
	code, out := exitCode(t, "qemu-img", "check", "-f", "vdi", img)
	t.Logf("round %d: qemu-img check exit %d", it, code)
	switch {
	case code == 0:
		return true
	case code == 2 && strings.Count(out, "ERROR") == 1 && strings.Contains(out, "allocated blocks mismatch"):
		mp, _ := mount(t, img, false)
		unmountBusyRetry(t, mp)
		if code, out := exitCode(t, "qemu-img", "check", "-f", "vdi", img); code != 0 {
			t.Errorf("round %d: after a read-write mount, qemu-img check exit %d\n%s", it, code, out)
			return false
		}
		return true
	}
	t.Errorf("round %d: qemu-img check after kill -9: exit %d\n%s", it, code, out)
	return false
}
