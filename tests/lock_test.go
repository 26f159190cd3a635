package tests

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"imgfuse/drivers/driverstest"
)

var lockMsg = regexp.MustCompile(`(?i)lock`)

// qemuWriteFails asserts that qemu-io cannot open img for writing.
func qemuWriteFails(t *testing.T, format, img string) {
	t.Helper()
	out, err := exec.Command("qemu-io", "-f", format, "-c", "write -P 0x11 0 512", img).CombinedOutput()
	if err == nil && !lockMsg.Match(out) {
		t.Errorf("qemu-io wrote to %s while it is mounted:\n%s", img, out)
	} else if !lockMsg.Match(out) {
		t.Errorf("qemu-io failed, but not for a lock: %s", out)
	}
}

// TestLocking: imgfuse takes QEMU's OFD image locks, so QEMU cannot write
// an image while it is mounted, and reads it only as QEMU's own rules allow.
func TestLocking(t *testing.T) {
	requireE2E(t, "qemu-io")
	t.Parallel()

	t.Run("raw-writable", func(t *testing.T) {
		img, _ := randomRawImage(t, 11)
		mp, _ := mount(t, img, false)
		qemuWriteFails(t, "raw", img)
		// A second writable mount of the same image is refused.
		r := imgfuse(t, nil, "mount", img, newMountpoint(t, false))
		if r.code == 0 || !lockMsg.MatchString(r.stderr) {
			t.Errorf("second writable mount: %v", r)
		}
		unmount(t, mp)
		// Unmounted: the locks are gone.
		driverstest.Cmd(t, "qemu-io", "-f", "raw", "-c", "write -P 0x11 0 512", img)
	})

	t.Run("qcow2-read-only", func(t *testing.T) {
		img, _ := smallQcow2(t)
		mp, _ := mount(t, img, false, "--read-only")
		qemuWriteFails(t, "qcow2", img)
		// Readers that share read access are fine, as with QEMU.
		driverstest.Cmd(t, "qemu-img", "info", img)
		unmount(t, mp)
		driverstest.Cmd(t, "qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 512", img)
	})

	t.Run("qcow2-writable", func(t *testing.T) {
		img, _ := smallQcow2(t)
		mp, _ := mount(t, img, false)
		qemuWriteFails(t, "qcow2", img)
		// qemu-img refuses to read an image being written without -U.
		out, err := exec.Command("qemu-img", "info", img).CombinedOutput()
		if err == nil || !lockMsg.Match(out) {
			t.Errorf("qemu-img info on a writable mount: %v\n%s", err, out)
		}
		driverstest.Cmd(t, "qemu-img", "info", "-U", img)
		unmount(t, mp)
		driverstest.Cmd(t, "qemu-io", "-f", "qcow2", "-c", "write -P 0x11 0 512", img)
	})

	t.Run("refused-while-qemu-writes", func(t *testing.T) {
		img, _ := smallQcow2(t)
		defer startQemuWriter(t, img)()
		r := imgfuse(t, nil, "mount", img, newMountpoint(t, false))
		if r.code == 0 {
			t.Fatalf("mount succeeded while qemu-io writes the image")
		}
		if !lockMsg.MatchString(r.stderr) {
			t.Errorf("mount failed, but not for a lock: %v", r)
		}
		// --force-share (qemu-img -U) takes no locks and is read-only.
		mp, disk := mount(t, img, false, "--force-share")
		if _, err := os.OpenFile(disk, os.O_RDWR, 0); !errors.Is(err, syscall.EROFS) {
			t.Errorf("open O_RDWR on a --force-share mount: %v, want EROFS", err)
		}
		unmount(t, mp)
	})
}

// qsdExport starts qemu-storage-daemon exporting the qcow2 image img
// through FUSE on a fresh file, writable or read-only (then the blockdevs
// are read-only too), and returns the exported file, or "" and the
// daemon's output if it refused to start. With --daemonize the daemon
// returns once the export serves, or fails with its error. Cleanup stops
// it (by its pid) and unmounts the export, which QEMU 7.2 leaves mounted
// when it exits.
func qsdExport(t *testing.T, img string, writable bool) (file, out string) {
	t.Helper()
	mp := newMountpoint(t, true)
	pidFile := filepath.Join(t.TempDir(), "qsd.pid")
	ro, w := ",read-only=on", "off"
	if writable {
		ro, w = "", "on"
	}
	cmd := exec.Command("qemu-storage-daemon", "--daemonize", "--pidfile", pidFile,
		"--blockdev", "driver=file,filename="+img+",node-name=f"+ro,
		"--blockdev", "driver=qcow2,file=f,node-name=q"+ro,
		"--export", "type=fuse,id=e,node-name=q,mountpoint="+mp+",writable="+w)
	b, err := cmd.CombinedOutput()
	if err != nil {
		return "", fmt.Sprintf("%v: %s", err, b)
	}
	t.Cleanup(func() {
		pb, err := os.ReadFile(pidFile)
		pid, perr := strconv.Atoi(strings.TrimSpace(string(pb)))
		if err != nil || perr != nil || pid <= 0 {
			t.Errorf("qemu-storage-daemon's pid file %s: %q, %v", pidFile, pb, err)
			return
		}
		syscall.Kill(pid, syscall.SIGTERM)
		if !waitFor(10*time.Second, func() bool { return !alive(pid) }) {
			syscall.Kill(pid, syscall.SIGKILL)
		}
		forceUnmount(t, mp)
	})
	if !mounted(t, mp) {
		t.Fatalf("qemu-storage-daemon started, but %s is not mounted", mp)
	}
	return mp, ""
}

// TestLockQSD: imgfuse and a running qemu-storage-daemon exclude each
// other through QEMU's image locks, in both directions, and share what
// QEMU's rules let them share.
func TestLockQSD(t *testing.T) {
	requireE2E(t, "qemu-storage-daemon", "fusermount3")
	t.Parallel()

	// QSD writes the image: imgfuse may neither write it nor read it
	// with locks (exit 4, a lock message); -U reads what QSD shows.
	t.Run("qsd-writes", func(t *testing.T) {
		t.Parallel()
		img, ref := smallQcow2(t)
		exported, out := qsdExport(t, img, true)
		if exported == "" {
			t.Fatalf("qemu-storage-daemon did not start: %s", out)
		}
		for _, flags := range [][]string{nil, {"--read-only"}} {
			args := append(append([]string{"mount"}, flags...), img, newMountpoint(t, false))
			r := imgfuse(t, nil, args...)
			if r.code != 4 || !lockMsg.MatchString(r.stderr) {
				t.Errorf("imgfuse %s while QSD writes the image: %v, want exit 4 and a lock message", strings.Join(args, " "), r)
			}
		}
		mp, disk := mount(t, img, false, "-U")
		compareFiles(t, disk, exported)
		compareFiles(t, disk, ref)
		unmount(t, mp)
	})

	// imgfuse writes the image: QSD may not open it, writable or not.
	t.Run("imgfuse-writes", func(t *testing.T) {
		t.Parallel()
		img, _ := smallQcow2(t)
		mp, _ := mount(t, img, false)
		for _, writable := range []bool{true, false} {
			if exported, out := qsdExport(t, img, writable); exported != "" {
				t.Errorf("qemu-storage-daemon (writable=%v) started on an image imgfuse writes", writable)
			} else if !lockMsg.MatchString(out) {
				t.Errorf("qemu-storage-daemon (writable=%v) failed, but not for a lock: %s", writable, out)
			}
		}
		unmount(t, mp)
	})

	// imgfuse reads the image: a read-only QSD may read it too (the same
	// bytes), a writable one may not.
	t.Run("imgfuse-reads", func(t *testing.T) {
		t.Parallel()
		img, _ := smallQcow2(t)
		mp, disk := mount(t, img, false, "--read-only")
		if exported, out := qsdExport(t, img, true); exported != "" {
			t.Errorf("a writable qemu-storage-daemon started on an image imgfuse reads")
		} else if !lockMsg.MatchString(out) {
			t.Errorf("a writable qemu-storage-daemon failed, but not for a lock: %s", out)
		}
		exported, out := qsdExport(t, img, false)
		if exported == "" {
			t.Fatalf("a read-only qemu-storage-daemon did not start beside a read-only mount: %s", out)
		}
		compareFiles(t, exported, disk)
		unmount(t, mp)
	})
}

// startQemuWriter starts qemu-io holding img open for writing and returns
// once it holds QEMU's write-permission lock (byte 101: 100 plus the bit
// of BLK_PERM_WRITE), and a function that stops it. It watches
// /proc/locks rather than probing with qemu-img info: a probe opens the
// image and takes locks of its own that refuse a writer, and one that
// races qemu-io's start makes qemu-io fail with "Failed to get write lock".
func startQemuWriter(t *testing.T, img string) (stop func()) {
	t.Helper()
	fi, err := os.Stat(img)
	if err != nil {
		t.Fatal(err)
	}
	ino := fmt.Sprintf(":%d", fi.Sys().(*syscall.Stat_t).Ino)
	var out bytes.Buffer
	cmd := exec.Command("qemu-io", "-f", "qcow2", "-c", "sleep 20000", img)
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	go func() { exited <- cmd.Wait() }()
	stop = func() { cmd.Process.Kill(); <-exited }
	writeLocked := func() bool {
		locks, err := os.ReadFile("/proc/locks")
		if err != nil {
			return false
		}
		for _, l := range strings.Split(string(locks), "\n") {
			// "4: OFDLCK ADVISORY READ -1 fe:00:1234 100 101": the
			// kernel merges adjacent ranges of one descriptor.
			f := strings.Fields(l)
			if len(f) < 8 || f[1] != "OFDLCK" || !strings.HasSuffix(f[5], ino) {
				continue
			}
			start, err1 := strconv.ParseInt(f[6], 10, 64)
			end, err2 := strconv.ParseInt(f[7], 10, 64)
			if err1 == nil && err2 == nil && start <= 101 && 101 <= end {
				return true
			}
		}
		return false
	}
	// Generous: on a loaded machine qemu-io takes a while to start.
	for deadline := time.Now().Add(30 * time.Second); !writeLocked(); {
		select {
		case err := <-exited:
			exited <- err
			t.Fatalf("qemu-io exited before taking its locks: %v\n%s", err, out.String())
		default:
		}
		if time.Now().After(deadline) {
			stop()
			t.Fatalf("qemu-io never took its write lock on %s\n%s", img, out.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
	return stop
}
