package main

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"imgfuse/imgtool"
	"imgfuse/mounts"
)

// TestUnmountNamesHolders: a real mount kept busy by a process and a loop
// device; unmount names both, and points a user who named the disk, or a
// wrong path, at the mountpoint. The mountpoint holds a file: mounting
// there needs --nonempty.
func TestUnmountNamesHolders(t *testing.T) {
	requireFUSE(t)
	if os.Geteuid() != 0 {
		skipE2E(t, "needs root for a loop device")
	}
	img, mnt, _ := mountRaw(t)
	file := filepath.Join(mnt, "hidden")
	writeFile(t, file, 1)
	if code, _, stderr := runCLI(t, "mount", img, mnt); code != imgtool.ExitMount || !strings.Contains(stderr, "is not empty (it holds hidden)") {
		t.Fatalf("mount on a non-empty directory: exit %d: %s", code, stderr)
	}
	logFile := filepath.Join(t.TempDir(), "log")
	if code, _, stderr := runCLI(t, "mount", "--nonempty", "--log", logFile, img, mnt); code != imgtool.ExitOK {
		t.Fatalf("mount --nonempty: exit %d: %s", code, stderr)
	}
	pid := serverPID(t, mnt)
	disk := filepath.Join(mnt, "disk")

	code, _, stderr := runCLI(t, "unmount", disk)
	if want := "imgfuse: " + disk + " is the disk of the imgfuse mount at " + mnt + "; run: imgfuse unmount " + mnt + "\n"; code != imgtool.ExitFailure || stderr != want {
		t.Errorf("unmount of the disk: exit %d, %q; want %q", code, stderr, want)
	}
	code, _, stderr = runCLI(t, "unmount", filepath.Join(mnt, "part2"))
	if !strings.Contains(stderr, "part2 is a partition of the disk of the imgfuse mount at "+mnt+"; run: imgfuse unmount "+mnt) {
		t.Errorf("unmount of a partition: exit %d, %q", code, stderr)
	}
	elsewhere := t.TempDir()
	code, _, stderr = runCLI(t, "unmount", elsewhere)
	if mp, _ := mounts.CanonicalPath(mnt); code != imgtool.ExitFailure || !strings.Contains(stderr, elsewhere+" is not mounted; the imgfuse mounts are: ") || !strings.Contains(stderr, mp) {
		t.Errorf("unmount of a plain directory: exit %d, %q", code, stderr)
	}

	f, err := os.Open(disk)
	if err != nil {
		t.Fatal(err)
	}
	sleep := exec.Command("sleep", "60")
	sleep.Stdin = f
	if err := sleep.Start(); err != nil {
		t.Fatal(err)
	}
	f.Close()
	t.Cleanup(func() { _ = sleep.Process.Kill(); _ = sleep.Wait() })
	out, err := exec.Command("losetup", "-f", "--show", "-r", disk).Output()
	if err != nil {
		skipE2E(t, fmt.Sprintf("losetup: %v", err))
	}
	loop := strings.TrimSpace(string(out))
	// Detached once only: after the test's own losetup -d the name may
	// already belong to another test's loop device.
	detached := false
	t.Cleanup(func() {
		if !detached {
			_ = exec.Command("losetup", "-d", loop).Run()
		}
	})

	code, _, stderr = runCLI(t, "unmount", mnt)
	for _, want := range []string{
		"imgfuse: unmount " + mnt + ": target is busy: ",
		loop + " is attached to " + disk + ": losetup -d " + loop,
		fmt.Sprintf("pid %d (sleep) has %s open: stop it", sleep.Process.Pid, disk),
	} {
		if code != imgtool.ExitFailure || !strings.Contains(stderr, want) {
			t.Errorf("busy unmount: exit %d, %q; want %q", code, stderr, want)
		}
	}
	if strings.Count(stderr, "\n") != 1 {
		t.Errorf("busy unmount: %d lines", strings.Count(stderr, "\n"))
	}
	// A server asked to stop while busy keeps serving and logs why, on
	// one line.
	if err := unix.Kill(pid, unix.SIGTERM); err != nil {
		t.Fatal(err)
	}
	var logged string
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(50 * time.Millisecond) {
		b, _ := os.ReadFile(logFile)
		if i := strings.Index(string(b), "still serving"); i >= 0 {
			logged = string(b[strings.LastIndexByte(string(b[:i]), '\n')+1:])
			logged = logged[:strings.IndexByte(logged, '\n')+1]
			break
		}
	}
	if !strings.Contains(logged, "busy") || !strings.Contains(logged, "still serving: "+loop+" is attached to ") ||
		!strings.Contains(logged, fmt.Sprintf("pid %d (sleep) has", sleep.Process.Pid)) {
		t.Errorf("server log on a busy SIGTERM: %q", logged)
	}
	if out, err := exec.Command("losetup", "-d", loop).CombinedOutput(); err != nil {
		t.Fatalf("losetup -d: %v %s", err, out)
	}
	detached = true
	_ = sleep.Process.Kill()
	_ = sleep.Wait()
	// The loop device may take a moment to let go.
	deadline := time.Now().Add(10 * time.Second)
	for {
		code, _, stderr = runCLI(t, "unmount", mnt)
		if code == imgtool.ExitOK || time.Now().After(deadline) {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	if code != imgtool.ExitOK {
		t.Fatalf("unmount once free: exit %d: %s", code, stderr)
	}
	_, _ = unix.Wait4(pid, nil, unix.WNOHANG, nil)
	assertNotMounted(t, mnt)
	if _, err := os.Stat(file); err != nil {
		t.Errorf("the file under the mount: %v", err)
	}
}
