package main

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// TestBusyHolders builds a fake /proc and /sys around a mount at /m and
// checks that every kind of holder is named once, with its fix, and that
// look-alikes (/m2, other devices, our own pid) are not.
func TestBusyHolders(t *testing.T) {
	root := t.TempDir()
	proc, sys := filepath.Join(root, "proc"), filepath.Join(root, "sys")
	file := func(path, content string) {
		t.Helper()
		if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(path, []byte(content), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	link := func(path, target string) {
		t.Helper()
		if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.Symlink(target, path); err != nil {
			t.Fatal(err)
		}
	}
	loop := func(n, backing, autoclear string) {
		file(filepath.Join(sys, "block", n, "loop", "backing_file"), backing+"\n")
		file(filepath.Join(sys, "block", n, "loop", "autoclear"), autoclear+"\n")
	}
	loop("loop3", "/m/disk", "1")           // mount -o loop: umount detaches it
	loop("loop4", "/m/disk (deleted)", "0") // under device-mapper
	file(filepath.Join(sys, "block", "loop4", "holders", "dm-0"), "")
	loop("loop5", "/m2/disk", "0")                           // another mount
	loop("loop6", "/m/part1", "0")                           // a partition of it mounted, no autoclear
	loop("loop7", "/m/disk", "0")                            // attached, unused
	file(filepath.Join(sys, "block", "loop8", "uevent"), "") // detached: no loop/backing_file

	link(filepath.Join(proc, "100", "fd", "3"), "/m/disk")
	link(filepath.Join(proc, "100", "fd", "4"), "/m/disk") // a dup: named once
	link(filepath.Join(proc, "100", "fd", "5"), "/m2/x")
	link(filepath.Join(proc, "100", "cwd"), "/")
	link(filepath.Join(proc, "100", "root"), "/")
	file(filepath.Join(proc, "100", "comm"), "fio\n")
	link(filepath.Join(proc, "101", "cwd"), "/m")
	file(filepath.Join(proc, "101", "comm"), "bash\n")
	file(filepath.Join(proc, "102", "maps"),
		"55d0-55d1 r-xp 00000000 08:01 42   /usr/bin/cat\n"+
			"7f00-7f01 r--s 00000000 00:2d 1    /m/disk (deleted)\n"+
			"7f02-7f03 r--s 00001000 00:2d 1    /m/disk\n"+
			"7f04-7f05 rw-p 00000000 00:00 0 \n")
	link(filepath.Join(proc, "103", "fd", "0"), "/m/disk") // ourselves
	link(filepath.Join(proc, "104", "root"), "/m")
	link(filepath.Join(proc, "105", "fd", "1"), "pipe:[1234]")
	file(filepath.Join(proc, "self", "comm"), "x\n")

	mounts := []*mountEntry{
		{Mountpoint: "/", FSType: "ext4", Source: "/dev/sda1"},
		{Mountpoint: "/m", FSType: "fuse.imgfuse", Source: "imgfuse:/i.qcow2", Major: 0, Minor: 45},
		{Mountpoint: "/m2", FSType: "fuse.imgfuse", Source: "imgfuse:/j.qcow2"},
		{Mountpoint: "/mnt/root", FSType: "ext4", Source: "/dev/loop3"},
		{Mountpoint: "/mnt/p 1", FSType: "ext4", Source: "/dev/loop6p1"},
		{Mountpoint: "/mnt/loop5", FSType: "ext4", Source: "/dev/loop5"},
		{Mountpoint: "/m/disk", FSType: "none", Source: "/srv/other"},
	}
	s := holderScan{proc: proc, sys: sys, self: 103, mounts: mounts}
	show := func(p string) string { return "M" + strings.TrimPrefix(p, "/m") }
	got := s.busyHolders(mounts[1], show)
	want := []holder{
		{"/dev/loop3 is attached to M/disk (mounted on /mnt/root)", "umount /mnt/root"},
		{"/dev/loop4 is attached to M/disk (used by dm-0)", "stop using dm-0 && losetup -d /dev/loop4"},
		{"/dev/loop6 is attached to M/part1 (mounted on /mnt/p 1)", "umount '/mnt/p 1' && losetup -d /dev/loop6"},
		{"/dev/loop7 is attached to M/disk", "losetup -d /dev/loop7"},
		{"a none filesystem (/srv/other) is mounted on M/disk", "umount /m/disk"},
		{"pid 100 (fio) has M/disk open", "stop it, or let it close the file"},
		{"pid 101 (bash) has its working directory in M", "stop it, or let it change directory"},
		{"pid 102 has M/disk mapped in memory", "stop it, or let it close the file"},
		{"pid 104 has its root directory in M", "stop it, or let it change directory"},
	}
	if !reflect.DeepEqual(got, want) {
		t.Errorf("holders:\n%s\nwant:\n%s", describeHolders(got), describeHolders(want))
	}
	line := describeHolders(got)
	if strings.Contains(line, "\n") || !strings.HasPrefix(line, "/dev/loop3 is attached to M/disk (mounted on /mnt/root): umount /mnt/root; ") ||
		!strings.HasSuffix(line, "; and 3 more") {
		t.Errorf("one line, at most %d holders: %q", maxHolders, line)
	}
	// No holder anywhere: nothing to name.
	if hs := (holderScan{proc: proc, sys: sys, mounts: mounts}).busyHolders(&mountEntry{Mountpoint: "/nowhere", Major: 9}, show); len(hs) != 0 {
		t.Errorf("holders of an unused mount: %+v", hs)
	}
}

func FuzzParseMaps(f *testing.F) {
	f.Add("7f00-7f01 r--s 00000000 00:2d 1    /m/disk (deleted)\n7f04-7f05 rw-p 00000000 00:00 0 \n")
	f.Add("00:2d 00:2d 00:2d 00:2d 00:2d /")
	f.Fuzz(func(t *testing.T, text string) {
		for _, p := range parseMaps(text, "00:2d") {
			if !strings.HasPrefix(p, "/") || strings.Contains(p, "\n") {
				t.Fatalf("path %q", p)
			}
		}
	})
}

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
	if code, _, stderr := runCLI(t, "mount", img, mnt); code != exitMount || !strings.Contains(stderr, "is not empty (it holds hidden)") {
		t.Fatalf("mount on a non-empty directory: exit %d: %s", code, stderr)
	}
	logFile := filepath.Join(t.TempDir(), "log")
	if code, _, stderr := runCLI(t, "mount", "--nonempty", "--log", logFile, img, mnt); code != exitOK {
		t.Fatalf("mount --nonempty: exit %d: %s", code, stderr)
	}
	pid := serverPID(t, mnt)
	disk := filepath.Join(mnt, "disk")

	code, _, stderr := runCLI(t, "unmount", disk)
	if want := "imgfuse: " + disk + " is the disk of the imgfuse mount at " + mnt + "; run: imgfuse unmount " + mnt + "\n"; code != exitFailure || stderr != want {
		t.Errorf("unmount of the disk: exit %d, %q; want %q", code, stderr, want)
	}
	code, _, stderr = runCLI(t, "unmount", filepath.Join(mnt, "part2"))
	if !strings.Contains(stderr, "part2 is a partition of the disk of the imgfuse mount at "+mnt+"; run: imgfuse unmount "+mnt) {
		t.Errorf("unmount of a partition: exit %d, %q", code, stderr)
	}
	elsewhere := t.TempDir()
	code, _, stderr = runCLI(t, "unmount", elsewhere)
	if mp, _ := canonicalPath(mnt); code != exitFailure || !strings.Contains(stderr, elsewhere+" is not mounted; the imgfuse mounts are: ") || !strings.Contains(stderr, mp) {
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
		if code != exitFailure || !strings.Contains(stderr, want) {
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
		if code == exitOK || time.Now().After(deadline) {
			break
		}
		time.Sleep(100 * time.Millisecond)
	}
	if code != exitOK {
		t.Fatalf("unmount once free: exit %d: %s", code, stderr)
	}
	_, _ = unix.Wait4(pid, nil, unix.WNOHANG, nil)
	assertNotMounted(t, mnt)
	if _, err := os.Stat(file); err != nil {
		t.Errorf("the file under the mount: %v", err)
	}
}
