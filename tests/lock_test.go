package tests

import (
	"errors"
	"os"
	"os/exec"
	"regexp"
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
		cmd := exec.Command("qemu-io", "-f", "qcow2", "-c", "sleep 20000", img)
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		defer func() { cmd.Process.Kill(); cmd.Wait() }()
		if !waitFor(5*time.Second, func() bool {
			out, err := exec.Command("qemu-img", "info", img).CombinedOutput()
			return err != nil && lockMsg.Match(out)
		}) {
			t.Fatal("qemu-io never took its locks")
		}
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
