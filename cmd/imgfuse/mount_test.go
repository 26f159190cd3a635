package main

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"imgfuse/drivers/driverstest"
	"imgfuse/imgtool"
	"imgfuse/internal/testenv"
	"imgfuse/mounts"
)

// assertNotMounted fails if anything is mounted at path.
func assertNotMounted(t *testing.T, path string) {
	t.Helper()
	mp, err := mounts.CanonicalPath(path)
	if err != nil {
		return // gone: certainly not mounted
	}
	if e, ok, err := mounts.Find(mp); err != nil || ok {
		t.Errorf("%s is mounted (%+v, %v)", path, e, err)
		if ok {
			_ = unix.Unmount(mp, unix.MNT_DETACH)
		}
	}
}

func TestMountValidationErrors(t *testing.T) {
	dir := t.TempDir()
	raw := filepath.Join(dir, "disk.raw")
	writeFile(t, raw, 1<<20)
	mnt := filepath.Join(dir, "mnt")
	if err := os.Mkdir(mnt, 0o755); err != nil {
		t.Fatal(err)
	}
	fifo := filepath.Join(dir, "fifo")
	if err := unix.Mkfifo(fifo, 0o644); err != nil {
		t.Fatal(err)
	}
	full := filepath.Join(dir, "full")
	if err := os.MkdirAll(filepath.Join(full, "etc"), 0o755); err != nil {
		t.Fatal(err)
	}
	bad := filepath.Join(dir, "bad.qcow2")
	// qcow2 magic, version 3, nonsense cluster bits.
	if err := os.WriteFile(bad, append([]byte("QFI\xfb\x00\x00\x00\x03"), bytes.Repeat([]byte{0xee}, 4088)...), 0o644); err != nil {
		t.Fatal(err)
	}

	tests := []struct {
		name       string
		args       []string
		mountpoint string
		want       string
		code       int
	}{
		{"missing image", []string{"mount", raw + ".nope", mnt}, mnt, "imgfuse: open " + raw + ".nope: no such file or directory", imgtool.ExitOpen},
		{"image is a directory", []string{"mount", dir, mnt}, mnt, "is a directory", imgtool.ExitOpen},
		{"missing mountpoint", []string{"mount", raw, mnt + "2"}, mnt + "2", "mountpoint " + mnt + "2 does not exist", imgtool.ExitMount},
		{"fifo mountpoint", []string{"mount", raw, fifo}, fifo, "neither a directory nor a regular file", imgtool.ExitMount},
		{"non-empty mountpoint", []string{"mount", raw, full}, full, "mountpoint " + full + " is not empty (it holds etc); the mount would hide its files: choose an empty directory, or give --nonempty", imgtool.ExitMount},
		{"snapshot on raw", []string{"mount", "--snapshot", "s1", raw, mnt}, mnt, "is a raw image, which has no snapshots", imgtool.ExitFailure},
		{"snapshot on forced raw", []string{"mount", "--format", "raw", "--snapshot", "1", bad, mnt}, mnt, "raw image", imgtool.ExitFailure},
		{"qcow2 format on a raw file", []string{"mount", "-f", "qcow2", raw, mnt}, mnt, "imgfuse: open " + raw + ": not a qcow2 image", imgtool.ExitOpen},
		// Passes validation: the daemon reports the open error.
		{"corrupt image (daemon)", []string{"mount", "--format", "qcow2", bad, mnt}, mnt, "imgfuse: qcow2: " + bad + ": ", imgtool.ExitCorrupt},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			code, _, stderr := runCLI(t, tt.args...)
			if code != tt.code {
				t.Errorf("exit %d, want %d", code, tt.code)
			}
			if !strings.Contains(stderr, tt.want) {
				t.Errorf("stderr %q does not contain %q", stderr, tt.want)
			}
			assertNotMounted(t, tt.mountpoint)
		})
	}
}

func TestMountpointAlreadyMounted(t *testing.T) {
	if os.Geteuid() != 0 {
		skipE2E(t, "needs root to mount a tmpfs")
	}
	dir := t.TempDir()
	raw := filepath.Join(dir, "disk.raw")
	writeFile(t, raw, 1<<20)
	mnt := filepath.Join(dir, "busy mnt") // a space: mountinfo escapes it
	if err := os.Mkdir(mnt, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := unix.Mount("tmpfs", mnt, "tmpfs", 0, "size=1m"); err != nil {
		skipE2E(t, fmt.Sprintf("mount tmpfs: %v", err))
	}
	t.Cleanup(func() { _ = unix.Unmount(mnt, 0) })
	code, _, stderr := runCLI(t, "mount", raw, mnt)
	if code != imgtool.ExitMount || !strings.Contains(stderr, "is already a mount (tmpfs, type tmpfs)") {
		t.Errorf("exit %d, stderr %q", code, stderr)
	}
	// unmount refuses a mount that is not ours.
	code, _, stderr = runCLI(t, "unmount", mnt)
	if code != imgtool.ExitFailure || !strings.Contains(stderr, "busy mnt is a tmpfs mount (tmpfs), not imgfuse's; use umount(8)") {
		t.Errorf("unmount tmpfs: exit %d, stderr %q", code, stderr)
	}
	if _, ok, _ := mounts.Find(mnt); !ok {
		t.Error("tmpfs was unmounted")
	}
}

func TestUnmountNotMounted(t *testing.T) {
	dir := t.TempDir()
	code, _, stderr := runCLI(t, "unmount", dir)
	if code != imgtool.ExitFailure || !strings.Contains(stderr, "imgfuse: "+dir+" is not mounted") {
		t.Errorf("exit %d, stderr %q", code, stderr)
	}
	code, _, stderr = runCLI(t, "unmount", filepath.Join(dir, "a", "b"))
	if code != imgtool.ExitFailure || !strings.Contains(stderr, "imgfuse: unmount ") {
		t.Errorf("missing parent: exit %d, stderr %q", code, stderr)
	}
}

// requireFUSE skips unless this process can mount FUSE filesystems.
func requireFUSE(t *testing.T) {
	t.Helper()
	if _, err := os.Stat("/dev/fuse"); err != nil {
		skipE2E(t, "no /dev/fuse")
	}
	if os.Geteuid() != 0 {
		if _, err := exec.LookPath("fusermount3"); err != nil {
			skipE2E(t, "not root and no fusermount3")
		}
	}
}

// skipE2E skips a test that needs what this machine lacks, or fails it
// where coverage is required (testenv.Skip).
func skipE2E(t *testing.T, why string) {
	t.Helper()
	testenv.Skip(t, "%s", why)
}

// mountRaw makes a raw image with a pattern and a mountpoint directory.
func mountRaw(t *testing.T) (img, mnt string, pattern []byte) {
	dir := t.TempDir()
	img = filepath.Join(dir, "disk.raw")
	pattern = bytes.Repeat([]byte("imgfuse!"), 512) // 4 KiB
	data := make([]byte, 1<<20)
	copy(data[64<<10:], pattern)
	if err := os.WriteFile(img, data, 0o644); err != nil {
		t.Fatal(err)
	}
	mnt = filepath.Join(dir, "mnt")
	if err := os.Mkdir(mnt, 0o755); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if mp, err := mounts.CanonicalPath(mnt); err == nil {
			if _, ok, _ := mounts.Find(mp); ok {
				_ = unix.Unmount(mp, unix.MNT_DETACH)
			}
		}
	})
	return img, mnt, pattern
}

func serverPID(t *testing.T, mnt string) int {
	t.Helper()
	mp, err := mounts.CanonicalPath(mnt)
	if err != nil {
		t.Fatal(err)
	}
	st, err := mounts.ReadState(mounts.StateDir(), mp)
	if err != nil {
		t.Fatalf("state file: %v", err)
	}
	return st.PID
}

func TestMountReadWriteUnmountRaw(t *testing.T) {
	requireFUSE(t)
	img, mnt, pattern := mountRaw(t)
	if code, _, stderr := runCLI(t, "mount", img, mnt); code != imgtool.ExitOK {
		t.Fatalf("mount: exit %d: %s", code, stderr)
	}
	pid := serverPID(t, mnt)
	if !mounts.ServerRunning(pid) {
		t.Fatalf("server %d not running", pid)
	}
	// Mount again on the same place: refused.
	if code, _, stderr := runCLI(t, "mount", img, mnt); code != imgtool.ExitMount || !strings.Contains(stderr, "already a mount") {
		t.Errorf("second mount: exit %d, %q", code, stderr)
	}

	disk := filepath.Join(mnt, "disk")
	f, err := os.OpenFile(disk, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	got := make([]byte, len(pattern))
	if _, err := f.ReadAt(got, 64<<10); err != nil || !bytes.Equal(got, pattern) {
		t.Errorf("read through the mount: %v, %q...", err, got[:16])
	}
	written := []byte("written through imgfuse")
	if _, err := f.WriteAt(written, 512<<10); err != nil {
		t.Errorf("write: %v", err)
	}
	f.Close()

	code, _, stderr := runCLI(t, "unmount", mnt)
	if code != imgtool.ExitOK {
		t.Fatalf("unmount: exit %d: %s", code, stderr)
	}
	// unmount returns only after the server exited (it may linger as our
	// zombie: we started it).
	if mounts.ServerRunning(pid) {
		t.Error("server still running after unmount returned")
	}
	_, _ = unix.Wait4(pid, nil, unix.WNOHANG, nil)
	assertNotMounted(t, mnt)
	mp, _ := mounts.CanonicalPath(mnt)
	if _, err := os.Stat(mounts.StatePath(mounts.StateDir(), mp)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("state file left behind: %v", err)
	}
	data, err := os.ReadFile(img)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(data[512<<10:512<<10+len(written)], written) {
		t.Error("write did not reach the image")
	}
}

func TestMountReadOnlyRefusesWrite(t *testing.T) {
	requireFUSE(t)
	img, mnt, _ := mountRaw(t)
	if code, _, stderr := runCLI(t, "mount", "--read-only", "--name", "img", img, mnt); code != imgtool.ExitOK {
		t.Fatalf("mount: exit %d: %s", code, stderr)
	}
	pid := serverPID(t, mnt)
	_, err := os.OpenFile(filepath.Join(mnt, "img"), os.O_RDWR, 0)
	if !errors.Is(err, syscall.EROFS) {
		t.Errorf("open O_RDWR on a read-only mount: %v, want EROFS", err)
	}
	if code, _, stderr := runCLI(t, "unmount", mnt); code != imgtool.ExitOK {
		t.Errorf("unmount: exit %d: %s", code, stderr)
	}
	_, _ = unix.Wait4(pid, nil, unix.WNOHANG, nil)
	assertNotMounted(t, mnt)
}

func TestUnmountDeadMount(t *testing.T) {
	requireFUSE(t)
	img, mnt, _ := mountRaw(t)
	pidFile := filepath.Join(t.TempDir(), "pid")
	if code, _, stderr := runCLI(t, "mount", "--pidfile", pidFile, img, mnt); code != imgtool.ExitOK {
		t.Fatalf("mount: exit %d: %s", code, stderr)
	}
	pid := serverPID(t, mnt)
	if err := unix.Kill(pid, unix.SIGKILL); err != nil {
		t.Fatal(err)
	}
	if _, err := unix.Wait4(pid, nil, 0, nil); err != nil {
		t.Fatal(err)
	}
	if !mounts.IsDead(mnt) {
		t.Fatal("mount is not dead after kill -9 of its server")
	}
	// mount refuses a dead mountpoint with a pointer to unmount.
	if code, _, stderr := runCLI(t, "mount", img, mnt); code != imgtool.ExitMount || !strings.Contains(stderr, "dead mount") {
		t.Errorf("mount on a dead mount: exit %d, %q", code, stderr)
	}
	code, _, stderr := runCLI(t, "unmount", mnt)
	if code != imgtool.ExitOK || !strings.Contains(stderr, "was a dead mount") {
		t.Errorf("unmount dead mount: exit %d, %q", code, stderr)
	}
	assertNotMounted(t, mnt)
	mp, _ := mounts.CanonicalPath(mnt)
	if _, err := os.Stat(mounts.StatePath(mounts.StateDir(), mp)); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("stale state file left behind: %v", err)
	}
	// Its default log stays, and unmount points at it.
	if logPath := mounts.DefaultLogPath(mounts.StateDir(), mp); !strings.Contains(stderr, "the dead server's log, which may say why it died: "+logPath) {
		t.Errorf("unmount of the dead mount does not name the log %s: %q", logPath, stderr)
	} else if b, err := os.ReadFile(logPath); err != nil || !strings.Contains(string(b), "serving ") {
		t.Errorf("the dead server's default log: %v\n%s", err, b)
	}
	if _, err := os.Stat(pidFile); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("the killed server's --pidfile is left behind: %v", err)
	}
}

// TestForegroundSignal runs `mount --foreground` as a separate process (the
// test binary acting as imgfuse) and stops it with SIGTERM.
func TestForegroundSignal(t *testing.T) {
	requireFUSE(t)
	img, mnt, _ := mountRaw(t)
	var stderr bytes.Buffer
	c := exec.Command(os.Args[0], "mount", "--foreground", img, mnt)
	c.Env = append(os.Environ(), asCLIEnv+"=1") // act as imgfuse, not a daemon child
	c.Stderr = &stderr
	if err := c.Start(); err != nil {
		t.Fatal(err)
	}
	mp, _ := mounts.CanonicalPath(mnt)
	deadline := time.Now().Add(15 * time.Second)
	for {
		if _, ok, _ := mounts.Find(mp); ok {
			break
		}
		if time.Now().After(deadline) {
			_ = c.Process.Kill()
			_ = c.Wait()
			t.Fatalf("foreground mount did not appear; stderr:\n%s", stderr.String())
		}
		time.Sleep(20 * time.Millisecond)
	}
	if _, err := os.Stat(filepath.Join(mnt, "disk")); err != nil {
		t.Error(err)
	}
	if err := c.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- c.Wait() }()
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("foreground server: %v; stderr:\n%s", err, stderr.String())
		}
	case <-time.After(15 * time.Second):
		_ = c.Process.Kill()
		t.Fatal("foreground server did not exit on SIGTERM")
	}
	assertNotMounted(t, mnt)
	if !strings.Contains(stderr.String(), "unmounting") {
		t.Errorf("stderr: %s", stderr.String())
	}
}

func TestDaemonDiesBeforeReporting(t *testing.T) {
	img, mnt, _ := mountRaw(t)
	t.Setenv("IMGFUSE_TEST_DAEMON_CRASH", "1")
	code, _, stderr := runCLI(t, "mount", img, mnt)
	if code != imgtool.ExitFailure || !strings.Contains(stderr, "imgfuse: mount daemon exited before reporting (exit status 3)") {
		t.Errorf("exit %d, stderr %q", code, stderr)
	}
	assertNotMounted(t, mnt)
}

func TestDemoMountsSample(t *testing.T) {
	requireFUSE(t)
	dir := t.TempDir()
	mnt := filepath.Join(dir, "mnt")
	t.Cleanup(func() {
		if _, ok, _ := mounts.Find(mnt); ok {
			_ = unix.Unmount(mnt, unix.MNT_DETACH)
		}
	})
	code, out, stderr := runCLI(t, "demo", "--dir", dir)
	if code != imgtool.ExitOK {
		t.Fatalf("demo: exit %d: %s", code, stderr)
	}
	self := demoCommand()
	for _, want := range []string{"mount -o loop,ro " + filepath.Join(mnt, "disk"),
		self + " info " + filepath.Join(dir, "overlay.qcow2"), self + " unmount " + mnt} {
		if !strings.Contains(out, want) {
			t.Errorf("demo output lacks %q:\n%s", want, out)
		}
	}
	disk := filepath.Join(mnt, "disk")
	f, err := os.Open(disk)
	if err != nil {
		t.Fatal(err)
	}
	magic := make([]byte, 2)
	if _, err := f.ReadAt(magic, 1024+56); err != nil || magic[0] != 0x53 || magic[1] != 0xef {
		t.Errorf("ext4 magic through the mount: % x, %v", magic, err)
	}
	if fi, err := f.Stat(); err != nil || fi.Size() != 8<<20 {
		t.Errorf("disk size: %v, %v", fi, err)
	}
	f.Close()
	if _, err := os.OpenFile(disk, os.O_RDWR, 0); !errors.Is(err, syscall.EROFS) {
		t.Errorf("open O_RDWR on the demo disk: %v, want EROFS", err)
	}
	// A second demo in the same directory must not touch the live images.
	if code, _, stderr := runCLI(t, "demo", "--dir", dir); code != imgtool.ExitFailure || !strings.Contains(stderr, "already mounted") {
		t.Errorf("second demo: exit %d, %q", code, stderr)
	}
	pid := serverPID(t, mnt)
	if code, _, stderr := runCLI(t, "unmount", mnt); code != imgtool.ExitOK {
		t.Errorf("unmount: exit %d: %s", code, stderr)
	}
	_, _ = unix.Wait4(pid, nil, unix.WNOHANG, nil)
	assertNotMounted(t, mnt)
	// The daemon removed what the demo wrote; dir, which existed, stays.
	if ents, err := os.ReadDir(dir); err != nil || len(ents) != 0 {
		t.Errorf("demo dir after unmount: %v, %v; want it empty", ents, err)
	}
}

// TestMountGrowable: --growable reaches the daemon (through its re-exec)
// and the driver: a write past the end grows the disk, and after unmount
// the image file has the new size. Without it the same write fails with
// ENOSPC, while truncate grows the disk either way.
func TestMountGrowable(t *testing.T) {
	requireFUSE(t)
	for _, growable := range []bool{true, false} {
		t.Run(fmt.Sprintf("growable=%v", growable), func(t *testing.T) {
			img, mnt, _ := mountRaw(t)
			args := []string{"mount", img, mnt}
			if growable {
				args = []string{"mount", "--growable", img, mnt}
			}
			if code, _, stderr := runCLI(t, args...); code != imgtool.ExitOK {
				t.Fatalf("mount: exit %d: %s", code, stderr)
			}
			pid := serverPID(t, mnt)
			disk := filepath.Join(mnt, "disk")
			f, err := os.OpenFile(disk, os.O_RDWR, 0)
			if err != nil {
				t.Fatal(err)
			}
			const size = 1 << 20
			_, werr := f.WriteAt([]byte("tail"), size+4096)
			if err := f.Truncate(2 * size); err != nil {
				t.Errorf("truncate to 2 MiB: %v", err)
			}
			f.Close()
			want := int64(2 * size)
			if growable {
				if werr != nil {
					t.Errorf("write past the end: %v", werr)
				}
			} else if !errors.Is(werr, syscall.ENOSPC) {
				t.Errorf("write past the end without --growable: %v, want ENOSPC", werr)
			}
			if code, _, stderr := runCLI(t, "unmount", mnt); code != imgtool.ExitOK {
				t.Fatalf("unmount: exit %d: %s", code, stderr)
			}
			_, _ = unix.Wait4(pid, nil, unix.WNOHANG, nil)
			data, err := os.ReadFile(img)
			if err != nil {
				t.Fatal(err)
			}
			if int64(len(data)) != want {
				t.Errorf("image size %d after unmount, want %d", len(data), want)
			}
			if got := string(data[size+4096 : size+4100]); growable && got != "tail" {
				t.Errorf("grown data %q", got)
			}
		})
	}
}

// TestMountUnwritableImage: an image that opens read-only but not for
// writing (here an immutable file, which even root cannot open O_RDWR) is
// not mounted writable: mount fails, says why and how to read it, and
// leaves no mount; --read-only then mounts it.
func TestMountUnwritableImage(t *testing.T) {
	requireFUSE(t)
	driverstest.RequireTools(t, "chattr")
	img, mnt, _ := mountRaw(t)
	out, err := exec.Command("chattr", "+i", img).CombinedOutput()
	driverstest.SkipUnless(t, err == nil, "chattr +i on %s: %v %s", img, err, out)
	t.Cleanup(func() { exec.Command("chattr", "-i", img).Run() })

	code, _, stderr := runCLI(t, "mount", img, mnt)
	if code != imgtool.ExitOpen || !strings.Contains(stderr, "open "+img+": ") ||
		!strings.Contains(stderr, "--read-only mounts it read-only") {
		t.Errorf("writable mount of an immutable image: exit %d, %q", code, stderr)
	}
	assertNotMounted(t, mnt)

	if code, _, stderr := runCLI(t, "mount", "--read-only", img, mnt); code != imgtool.ExitOK {
		t.Fatalf("--read-only mount: exit %d: %s", code, stderr)
	}
	pid := serverPID(t, mnt)
	if code, _, stderr := runCLI(t, "unmount", mnt); code != imgtool.ExitOK {
		t.Errorf("unmount: exit %d: %s", code, stderr)
	}
	_, _ = unix.Wait4(pid, nil, unix.WNOHANG, nil)
	assertNotMounted(t, mnt)
}
