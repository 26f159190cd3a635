package mounts

import (
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
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

	mounts := []*Entry{
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
	if hs := (holderScan{proc: proc, sys: sys, mounts: mounts}).busyHolders(&Entry{Mountpoint: "/nowhere", Major: 9}, show); len(hs) != 0 {
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
