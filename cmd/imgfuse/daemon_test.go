package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/moby/sys/mountinfo"
)

func TestStateRoundTrip(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "state")
	st := daemonState{PID: 4242, Image: "/img/a b.qcow2", Mountpoint: "/mnt/with space",
		Format: "qcow2", ReadOnly: true, Started: time.Unix(1700000000, 0).UTC()}
	path, err := writeState(dir, st)
	if err != nil {
		t.Fatal(err)
	}
	if path != statePath(dir, st.Mountpoint) || !strings.HasSuffix(path, ".json") {
		t.Errorf("state path %s", path)
	}
	if fi, err := os.Stat(dir); err != nil || fi.Mode().Perm() != 0o700 {
		t.Errorf("state dir mode: %v %v", fi.Mode(), err)
	}
	got, err := readState(dir, st.Mountpoint)
	if err != nil {
		t.Fatal(err)
	}
	if got != st {
		t.Errorf("read %+v, want %+v", got, st)
	}
	// Overwrite (a new server on the same mountpoint) leaves one file.
	st.PID = 4343
	if _, err := writeState(dir, st); err != nil {
		t.Fatal(err)
	}
	if ents, _ := os.ReadDir(dir); len(ents) != 1 {
		t.Errorf("%d files in state dir, want 1", len(ents))
	}
	if got, _ := readState(dir, st.Mountpoint); got.PID != 4343 {
		t.Errorf("pid %d after overwrite", got.PID)
	}
	if _, err := readState(dir, "/other"); !os.IsNotExist(err) {
		t.Errorf("state of another mountpoint: %v", err)
	}
	// A file whose content names another mountpoint is rejected.
	if err := os.Rename(path, statePath(dir, "/elsewhere")); err != nil {
		t.Fatal(err)
	}
	if _, err := readState(dir, "/elsewhere"); err == nil {
		t.Error("mismatched state file accepted")
	}
	if statePath(dir, "/a") == statePath(dir, "/b") {
		t.Error("state paths collide")
	}
}

func TestImgfuseMountCmdline(t *testing.T) {
	tests := []struct {
		cmdline string
		want    bool
	}{
		{"/usr/bin/imgfuse\x00mount\x00--foreground\x00--\x00/i\x00/m\x00", true},
		{"./imgfuse\x00demo\x00", true},
		{"/tmp/go-build/imgfuse.test\x00mount\x00a\x00b\x00", true},
		{"/usr/bin/imgfuse\x00info\x00x\x00", false},
		{"/bin/sleep\x00mount\x00", false},
		{"", false},
	}
	for _, tt := range tests {
		if got := isImgfuseMountCmdline([]byte(tt.cmdline)); got != tt.want {
			t.Errorf("isImgfuseMountCmdline(%q) = %v", tt.cmdline, got)
		}
	}
	// This test process is no mount server; pid 0 and a dead pid neither.
	for _, pid := range []int{os.Getpid(), 0, -1, 1 << 30} {
		if daemonRunning(pid) {
			t.Errorf("daemonRunning(%d) = true", pid)
		}
	}
}

// TestMountTableEscapes: the mount table as findMount and status read it
// (moby/sys/mountinfo): paths unescaped, our mounts told from others.
func TestMountTableEscapes(t *testing.T) {
	content := "22 1 8:1 / / rw,relatime shared:1 - ext4 /dev/sda1 rw\n" +
		"43 27 0:40 / /tmp/d\\040x/mnt rw,nosuid shared:7 master:2 - fuse.imgfuse imgfuse:/tmp/a\\040b.qcow2 rw,user_id=0\n" +
		"44 27 0:41 / /back\\134slash rw - tmpfs tmpfs rw\n"
	got, err := mountinfo.GetMountsFromReader(strings.NewReader(content), nil)
	if err != nil {
		t.Fatal(err)
	}
	type entry struct {
		major, minor       int
		mp, fstype, source string
	}
	want := []entry{
		{8, 1, "/", "ext4", "/dev/sda1"},
		{0, 40, "/tmp/d x/mnt", "fuse.imgfuse", "imgfuse:/tmp/a b.qcow2"},
		{0, 41, `/back\slash`, "tmpfs", "tmpfs"},
	}
	if len(got) != len(want) {
		t.Fatalf("got %+v", got)
	}
	for i, w := range want {
		g := entry{got[i].Major, got[i].Minor, got[i].Mountpoint, got[i].FSType, got[i].Source}
		if g != w {
			t.Errorf("entry %d: %+v, want %+v", i, g, w)
		}
	}
	if !isImgfuseMount(got[1]) || isImgfuseMount(got[2]) || isImgfuseMount(got[0]) {
		t.Error("isImgfuseMount misclassifies")
	}
	// The live table has at least the root mount, found by findMount.
	if e, ok, err := findMount("/"); err != nil || !ok || e.Mountpoint != "/" {
		t.Errorf("findMount(/) = %+v, %v, %v", e, ok, err)
	}
}

func TestCanonicalPath(t *testing.T) {
	dir := t.TempDir()
	real := filepath.Join(dir, "real")
	if err := os.Mkdir(real, 0o755); err != nil {
		t.Fatal(err)
	}
	link := filepath.Join(dir, "link")
	if err := os.Symlink(real, link); err != nil {
		t.Fatal(err)
	}
	rdir, _ := filepath.EvalSymlinks(dir)
	for _, tt := range []struct{ in, want string }{
		{link, filepath.Join(rdir, "real")},
		{filepath.Join(link, "gone"), filepath.Join(rdir, "real", "gone")}, // unresolvable leaf
	} {
		if got, err := canonicalPath(tt.in); err != nil || got != tt.want {
			t.Errorf("canonicalPath(%s) = %s, %v; want %s", tt.in, got, err, tt.want)
		}
	}
}
