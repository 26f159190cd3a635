package tests

import (
	"bytes"
	"fmt"
	"io"
	"math/rand"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"imgfuse/drivers/driverstest"
)

// soakDuration is how long TestSoak loads the daemons: IMGFUSE_SOAK_SECONDS
// (make soak: 300), or 30 s.
func soakDuration(t *testing.T) time.Duration {
	v := os.Getenv("IMGFUSE_SOAK_SECONDS")
	if v == "" {
		return 30 * time.Second
	}
	n, err := strconv.Atoi(v)
	if err != nil || n < 5 {
		t.Fatalf("IMGFUSE_SOAK_SECONDS=%q: want a number of seconds >= 5", v)
	}
	return time.Duration(n) * time.Second
}

// procSample is one look at a daemon: resident memory and threads.
type procSample struct{ rssKiB, threads int64 }

func sampleProc(pid int) (procSample, bool) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return procSample{}, false
	}
	var s procSample
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) < 2 {
			continue
		}
		switch f[0] {
		case "VmRSS:":
			s.rssKiB, _ = strconv.ParseInt(f[1], 10, 64)
		case "Threads:":
			s.threads, _ = strconv.ParseInt(f[1], 10, 64)
		}
	}
	return s, true
}

// checkNoGrowth fails t if the daemon's memory or thread count kept
// growing: the peak of the last third of the samples may exceed the peak
// of the first third by at most half plus 16 MiB (RSS) and 8 threads. A
// leak per request grows without bound over a soak; a warm-up does not.
func checkNoGrowth(t *testing.T, name string, samples []procSample) {
	t.Helper()
	if len(samples) < 6 {
		t.Errorf("%s: only %d samples", name, len(samples))
		return
	}
	peak := func(s []procSample) procSample {
		var p procSample
		for _, x := range s {
			p.rssKiB = max(p.rssKiB, x.rssKiB)
			p.threads = max(p.threads, x.threads)
		}
		return p
	}
	third := len(samples) / 3
	first, last := peak(samples[:third]), peak(samples[len(samples)-third:])
	t.Logf("%s: first third peak %d MiB, %d threads; last third peak %d MiB, %d threads",
		name, first.rssKiB>>10, first.threads, last.rssKiB>>10, last.threads)
	if last.rssKiB > first.rssKiB*3/2+16<<10 {
		t.Errorf("%s: RSS grew from %d MiB to %d MiB", name, first.rssKiB>>10, last.rssKiB>>10)
	}
	if last.threads > first.threads+8 {
		t.Errorf("%s: threads grew from %d to %d", name, first.threads, last.threads)
	}
}

// TestSoak loads two daemons at once for soakDuration: fio with four jobs
// of mixed random reads and writes (libaio, O_DIRECT) on one qcow2 image,
// and a file workload (write, fsync, read back, delete, fstrim) on ext4
// loop-mounted from another. The test binary's -race build of imgfuse
// reports any data race (the mount helper fails the test on a report); a
// deadlock shows as a workload that does not finish; the daemons' RSS and
// thread counts, sampled every second, must not keep growing. Afterwards
// qemu-img check and e2fsck find both images clean.
func TestSoak(t *testing.T) {
	requireE2E(t, "fio", "mkfs.ext4", "e2fsck", "fstrim", "losetup")
	_, err := os.Stat("/dev/loop-control")
	driverstest.SkipUnless(t, err == nil, "/dev/loop-control: %v", err)
	t.Parallel()
	dur := soakDuration(t)
	dir := t.TempDir()

	fioImg := createQcow2(t, dir, "")
	fsImg := filepath.Join(dir, "fs.qcow2")
	driverstest.Cmd(t, "qemu-img", "create", "-q", "-f", "qcow2", fsImg, "64M")
	fioMP, fioDisk := mount(t, fioImg, false)
	fsMP, fsDisk := mount(t, fsImg, false)
	pids := map[string]int{"fio daemon": daemonPID(t, fioMP), "ext4 daemon": daemonPID(t, fsMP)}

	driverstest.Cmd(t, "mkfs.ext4", "-q", "-F", fsDisk)
	loopDev := strings.TrimSpace(string(driverstest.Cmd(t, "losetup", "--direct-io=on", "-f", "--show", fsDisk)))
	loopMP := filepath.Join(dir, "ext4")
	if err := os.Mkdir(loopMP, 0o755); err != nil {
		t.Fatal(err)
	}
	detached := false
	t.Cleanup(func() {
		if !detached {
			exec.Command("umount", "-l", loopMP).Run()
			exec.Command("losetup", "-d", loopDev).Run()
		}
	})
	driverstest.Cmd(t, "mount", "-t", "ext4", loopDev, loopMP)

	stop := make(chan struct{})
	var wg sync.WaitGroup
	var fioOut []byte
	var fioErr error
	wg.Add(1)
	go func() {
		defer wg.Done()
		// Each job writes its own 6 MiB of the disk at random and
		// reads back and checks (crc32c) every 128 blocks it wrote, all
		// through the mount (O_DIRECT: no page cache on the way), so a
		// wrong byte served under load fails the soak, not only an
		// I/O error.
		c := exec.Command("fio", "--name=soak", "--filename="+fioDisk, "--rw=randwrite",
			"--bsrange=4k-64k", "--size=6M", "--offset_increment=6M", "--numjobs=4", "--iodepth=8",
			"--ioengine=libaio", "--direct=1", "--time_based", fmt.Sprintf("--runtime=%d", int(dur.Seconds())),
			"--verify=crc32c", "--verify_backlog=128", "--do_verify=1", "--verify_fatal=1",
			"--verify_state_save=0", "--group_reporting", "--output-format=normal")
		c.Dir = dir // fio may leave state files in its working directory
		fioOut, fioErr = c.CombinedOutput()
	}()
	var files atomic.Int64
	fsErrs := make(chan error, 3)
	for w := range 3 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			fsErrs <- fileWorkload(filepath.Join(loopMP, fmt.Sprint("w", w)), int64(w), stop, &files)
		}()
	}
	var wgTrim sync.WaitGroup
	wgTrim.Add(1)
	go func() {
		defer wgTrim.Done()
		for {
			select {
			case <-stop:
				return
			case <-time.After(3 * time.Second):
				exec.Command("fstrim", loopMP).Run()
			}
		}
	}()

	samples := map[string][]procSample{}
	deadline := time.Now().Add(dur)
	for time.Now().Before(deadline) {
		time.Sleep(time.Second)
		for name, pid := range pids {
			s, ok := sampleProc(pid)
			if !ok {
				t.Fatalf("%s (pid %d) is gone", name, pid)
			}
			samples[name] = append(samples[name], s)
		}
	}
	close(stop)
	finished := make(chan struct{})
	go func() { wg.Wait(); wgTrim.Wait(); close(finished) }()
	select {
	case <-finished:
	case <-time.After(60 * time.Second):
		t.Fatal("the workloads did not finish 60 s after the soak ended: deadlock?")
	}
	// fio exits non-zero on an I/O error or a failed verification; a run
	// that read nothing back verified nothing.
	if fioErr != nil || !bytes.Contains(fioOut, []byte("err= 0")) || bytes.Contains(fioOut, []byte("verify:")) {
		t.Errorf("fio: %v\n%s", fioErr, fioOut)
	} else if !bytes.Contains(fioOut, []byte("read: IOPS=")) {
		t.Errorf("fio verified nothing (no reads):\n%s", fioOut)
	}
	close(fsErrs)
	for err := range fsErrs {
		if err != nil {
			t.Error(err)
		}
	}
	t.Logf("soak %v: %d files written and verified on ext4", dur, files.Load())
	for name, s := range samples {
		checkNoGrowth(t, name, s)
	}

	driverstest.Cmd(t, "umount", loopMP)
	driverstest.Cmd(t, "losetup", "-d", loopDev)
	detached = true
	waitLoopDetached(t, fsDisk)
	driverstest.Cmd(t, "e2fsck", "-fn", fsDisk)
	unmount(t, fsMP)
	unmount(t, fioMP)
	requireClean(t, fsImg)
	requireClean(t, fioImg)
}

// fileWorkload writes files of random sizes into dir, fsyncs them, reads
// each back and compares, and deletes old ones, until stop is closed.
//
// The read-back uses O_DIRECT, so that it reads through imgfuse and not
// ext4's page cache, which still holds the pages just written: ext4 writes
// back any dirty cached pages of the range, then reads the blocks from
// the loop device with a bio; the loop device (--direct-io=on) reads the
// mount's disk with O_DIRECT; and the mount's disk has no page cache of
// its own (FUSE direct_io). Dropping caches would instead affect the whole
// machine, and a remount would check only once at the end.
func fileWorkload(dir string, seed int64, stop <-chan struct{}, files *atomic.Int64) error {
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	rng := rand.New(rand.NewSource(seed))
	for i := 0; ; i++ {
		select {
		case <-stop:
			return nil
		default:
		}
		p := filepath.Join(dir, fmt.Sprint("f", i%16))
		b := make([]byte, 1+rng.Intn(1<<20))
		rng.Read(b)
		f, err := os.Create(p)
		if err != nil {
			return err
		}
		if _, err := f.Write(b); err != nil {
			f.Close()
			return fmt.Errorf("write %s: %w", p, err)
		}
		if err := f.Sync(); err != nil {
			f.Close()
			return fmt.Errorf("fsync %s: %w", p, err)
		}
		f.Close()
		got, err := readDirect(p, len(b))
		if err != nil {
			return fmt.Errorf("O_DIRECT read-back of %s: %w", p, err)
		}
		if !bytes.Equal(got, b) {
			return fmt.Errorf("%s reads back different bytes through the mount (%d bytes, want %d; first difference at %d)",
				p, len(got), len(b), firstDiff(got, b))
		}
		if rng.Intn(3) == 0 {
			os.Remove(filepath.Join(dir, fmt.Sprint("f", rng.Intn(16))))
		}
		files.Add(1)
	}
}

// readDirect reads the file at p, of n bytes, with O_DIRECT: aligned
// buffer and length, the size rounded up to the block (the read stops at
// the end of the file).
func readDirect(p string, n int) ([]byte, error) {
	f, err := os.OpenFile(p, os.O_RDONLY|syscall.O_DIRECT, 0)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	buf := driverstest.AlignedBuffer((n+4095)&^4095, 4096)
	// A short read ends it: the next offset would not be aligned, and
	// only the end of the file makes a direct read short.
	k, err := f.ReadAt(buf, 0)
	if err != nil && err != io.EOF {
		return nil, err
	}
	return buf[:k], nil
}
