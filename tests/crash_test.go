package tests

import (
	"fmt"
	"math/rand"
	"os"
	"path/filepath"
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

// TestCrash kills the daemon with SIGKILL at random moments of a write
// workload, again and again on the same image. Without lazy refcounts
// qemu-img check may find leaked clusters (exit 3) but never corruption
// (exit 2); with lazy refcounts the image may be left dirty, and the next
// read-write mount must repair it so that check is clean after it. Data
// acknowledged by fsync before a kill reads back after every remount.
func TestCrash(t *testing.T) {
	requireE2E(t)
	for _, c := range []struct {
		name, opts string
		flags      []string
		iterations int
	}{
		// Iterations are few where each costs a mount or two; together
		// they stay around a minute with -race on two cores.
		{"raw", "raw", nil, 2},
		{"plain", "", nil, 8},
		{"lazy-refcounts", "lazy_refcounts=on", nil, 6},
		{"lazy-refcounts-flag", "", []string{"--lazy-refcounts"}, 3},
		{"cluster4k-refcount1", "cluster_size=4096,refcount_bits=1", nil, 3},
		{"overlay-on-raw", "backing", nil, 3},
	} {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			seed := writeSeed(t)
			rng := rand.New(rand.NewSource(seed))
			lazy := c.opts == "lazy_refcounts=on" || len(c.flags) > 0
			raw := c.opts == "raw"
			var img string
			var keep frozen
			switch {
			case raw:
				img = zeroRaw(t, writeSize)
			case c.opts == "backing":
				// Partial-cluster writes copy the rest of the cluster
				// from the backing file while the daemon dies.
				dir := t.TempDir()
				b := filepath.Join(dir, "base.raw")
				randomFull(t, b, writeSize, 21)
				img = filepath.Join(dir, "img.qcow2")
				driverstest.Cmd(t, "qemu-img", "create", "-q", "-f", "qcow2", "-b", b, "-F", "raw", "-o", "cluster_size=65536", img, fmtSize(writeSize))
				keep = freeze(t, b)
			default:
				img = createQcow2(t, t.TempDir(), c.opts)
			}
			var acked []durable
			for it := 0; it < c.iterations && !t.Failed(); it++ {
				mp, disk := mount(t, img, false, c.flags...)
				// Everything acknowledged before earlier kills is there.
				for _, d := range acked {
					errno, got := readErrno(t, disk, d.off, int64(len(d.data)))
					if errno != 0 {
						t.Fatalf("iteration %d: read of fsynced region [%d, +%d): %v", it, d.off, len(d.data), errno)
					}
					if i := firstDiff(got, d.data); i >= 0 {
						t.Fatalf("iteration %d: fsynced region [%d, +%d) differs at %d after a crash", it, d.off, len(d.data), d.off+int64(i))
					}
				}
				// A new durable region in the first 8 MiB, which the
				// background writers never touch.
				d := durable{off: int64(it)<<20 + rng.Int63n(4096)*17, data: patternAt(0, 100000+rng.Int63n(300000), byte(it+1))}
				if err := writeSync(disk, d); err != nil {
					t.Fatalf("iteration %d: durable region: %v", it, err)
				}
				acked = append(acked, d)

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
					t.Errorf("iteration %d: no write completed in 10s", it)
				}
				time.Sleep(delay)
				done := ops.Load()
				killed.Store(true)
				if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
					t.Fatal(err)
				}
				stopOnce()
				if !waitFor(10*time.Second, func() bool { return !alive(pid) }) {
					t.Fatalf("daemon %d still alive 10s after SIGKILL", pid)
				}
				exited := make(chan struct{})
				go func() { wg.Wait(); close(exited) }()
				select {
				case <-exited:
				case <-time.After(10 * time.Second):
					t.Fatalf("writers still blocked 10s after the daemon died")
				}
				close(errs)
				for err := range errs {
					if err != nil {
						t.Errorf("iteration %d: a writer failed before the kill: %v", it, err)
					}
				}
				unmountBusyRetry(t, mp)
				if raw {
					continue
				}

				code, out := qemuCheck(t, img)
				t.Logf("iteration %d: killed after %v and %d completed requests; qemu-img check exit %d", it, delay, done, code)
				switch {
				case code == 0 || code == 3:
				case code == 2 && lazy && dirtyBit(t, img):
				default:
					t.Fatalf("iteration %d: qemu-img check after kill -9: exit %d\n%s", it, code, out)
				}
				if lazy && code != 0 {
					// The next read-write mount repairs, its clean
					// unmount leaves the image clean.
					mp, _ := mount(t, img, false, c.flags...)
					unmountBusyRetry(t, mp)
					if code, out := qemuCheck(t, img); code != 0 {
						t.Fatalf("iteration %d: after a repairing RW mount, qemu-img check exit %d\n%s", it, code, out)
					}
				}
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
			code, out := qemuCheck(t, img)
			if code != 0 && (lazy || code != 3) {
				t.Fatalf("final qemu-img check exit %d\n%s", code, out)
			}
		})
	}
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
