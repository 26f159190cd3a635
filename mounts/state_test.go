package mounts

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/moby/sys/mountinfo"

	"imgfuse/imgtool"
)

// TestServerCloseError: a close error recorded in the state file is
// reported by unmount once, and only for the server that recorded it.
func TestServerCloseError(t *testing.T) {
	dir := t.TempDir()
	st := State{PID: 4242, Image: "/i.qcow2", Mountpoint: "/mnt/x", Started: time.Now()}
	if _, err := WriteState(dir, st); err != nil {
		t.Fatal(err)
	}
	if err := serverCloseError(dir, "/mnt/x", 4242, "mnt/x"); err != nil {
		t.Errorf("no close error recorded, got %v", err)
	}
	st.CloseError = "flush /i.qcow2: input/output error"
	if _, err := WriteState(dir, st); err != nil {
		t.Fatal(err)
	}
	if err := serverCloseError(dir, "/mnt/x", 99, "mnt/x"); err != nil {
		t.Errorf("another server's error reported: %v", err)
	}
	err := serverCloseError(dir, "/mnt/x", 4242, "mnt/x")
	if err == nil || imgtool.Code(err) != imgtool.ExitFlush || !strings.Contains(err.Error(), "unmounted mnt/x, but its server failed to write the image back: flush /i.qcow2: input/output error") {
		t.Errorf("serverCloseError = %v", err)
	}
	if _, err := os.Stat(StatePath(dir, "/mnt/x")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("state file left after reporting: %v", err)
	}
}

func TestStateRoundTrip(t *testing.T) {
	dir := filepath.Join(t.TempDir(), "state")
	st := State{PID: 4242, Image: "/img/a b.qcow2", Mountpoint: "/mnt/with space",
		Format: "qcow2", ReadOnly: true, Started: time.Unix(1700000000, 0).UTC()}
	path, err := WriteState(dir, st)
	if err != nil {
		t.Fatal(err)
	}
	if path != StatePath(dir, st.Mountpoint) || !strings.HasSuffix(path, ".json") {
		t.Errorf("state path %s", path)
	}
	if fi, err := os.Stat(dir); err != nil || fi.Mode().Perm() != 0o700 {
		t.Errorf("state dir mode: %v %v", fi.Mode(), err)
	}
	got, err := ReadState(dir, st.Mountpoint)
	if err != nil {
		t.Fatal(err)
	}
	if !reflect.DeepEqual(got, st) {
		t.Errorf("read %+v, want %+v", got, st)
	}
	// Overwrite (a new server on the same mountpoint) leaves one file.
	st.PID = 4343
	if _, err := WriteState(dir, st); err != nil {
		t.Fatal(err)
	}
	if ents, _ := os.ReadDir(dir); len(ents) != 1 {
		t.Errorf("%d files in state dir, want 1", len(ents))
	}
	if got, _ := ReadState(dir, st.Mountpoint); got.PID != 4343 {
		t.Errorf("pid %d after overwrite", got.PID)
	}
	if _, err := ReadState(dir, "/other"); !os.IsNotExist(err) {
		t.Errorf("state of another mountpoint: %v", err)
	}
	// A file whose content names another mountpoint is rejected.
	if err := os.Rename(path, StatePath(dir, "/elsewhere")); err != nil {
		t.Fatal(err)
	}
	if _, err := ReadState(dir, "/elsewhere"); err == nil {
		t.Error("mismatched state file accepted")
	}
	if StatePath(dir, "/a") == StatePath(dir, "/b") {
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
		if ServerRunning(pid) {
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
	if !IsImgfuse(got[1]) || IsImgfuse(got[2]) || IsImgfuse(got[0]) {
		t.Error("isImgfuseMount misclassifies")
	}
	// The live table has at least the root mount, found by findMount.
	if e, ok, err := Find("/"); err != nil || !ok || e.Mountpoint != "/" {
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
		if got, err := CanonicalPath(tt.in); err != nil || got != tt.want {
			t.Errorf("canonicalPath(%s) = %s, %v; want %s", tt.in, got, err, tt.want)
		}
	}
}

// TestStateDirNotOurs: a state directory another user made or may write
// (the per-user one under /tmp can be made by anyone) is refused for
// writing, reading and listing; a missing one lists no mounts.
func TestStateDirNotOurs(t *testing.T) {
	st := State{PID: 4242, Image: "/img.qcow2", Mountpoint: "/mnt/x", Format: "qcow2"}
	base := t.TempDir()

	open := filepath.Join(base, "open")
	if err := os.Mkdir(open, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(open, 0o777); err != nil {
		t.Fatal(err)
	}
	link := filepath.Join(base, "link")
	own := filepath.Join(base, "own")
	if err := os.Mkdir(own, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(own, link); err != nil {
		t.Fatal(err)
	}
	bad := map[string]string{open: "writable by other users", link: "not a directory"}
	if os.Geteuid() == 0 {
		foreign := filepath.Join(base, "foreign")
		if err := os.Mkdir(foreign, 0o700); err != nil {
			t.Fatal(err)
		}
		if err := os.Chown(foreign, 65534, 65534); err != nil {
			t.Fatal(err)
		}
		bad[foreign] = "belongs to uid 65534"
	}
	for dir, want := range bad {
		if _, err := WriteState(dir, st); err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("writeState(%s): %v, want %q", dir, err, want)
		}
		if _, err := ReadState(dir, st.Mountpoint); err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("readState(%s): %v, want %q", dir, err, want)
		}
		if _, err := List(dir); err == nil || !strings.Contains(err.Error(), want) {
			t.Errorf("listStatus(%s): %v, want %q", dir, err, want)
		}
	}
	if _, err := WriteState(own, st); err != nil {
		t.Errorf("writeState in our own directory: %v", err)
	}
	if e, err := List(filepath.Join(base, "missing")); err != nil || len(e) != 0 {
		t.Errorf("listStatus of a missing directory: %v, %v", e, err)
	}
}

// TestStateDirFor: root's state is in /run/imgfuse; a user's in
// $XDG_RUNTIME_DIR, else in their own /run/user/UID, else in
// /tmp/imgfuse-UID whatever $TMPDIR says.
func TestStateDirFor(t *testing.T) {
	runUser := t.TempDir()
	uid := os.Geteuid()
	if uid == 0 {
		uid = 65534
	}
	mine := filepath.Join(runUser, strconv.Itoa(uid))
	if err := os.Mkdir(mine, 0o700); err != nil {
		t.Fatal(err)
	}
	if os.Geteuid() == 0 {
		if err := os.Chown(mine, uid, uid); err != nil {
			t.Fatal(err)
		}
	}
	t.Setenv("TMPDIR", t.TempDir())
	for _, tc := range []struct {
		uid       int
		xdg, want string
	}{
		{0, "/run/user/0", "/run/imgfuse"},
		{uid, "/xdg", "/xdg/imgfuse"},
		{uid, "", filepath.Join(mine, "imgfuse")},
		{uid + 1, "", fmt.Sprintf("/tmp/imgfuse-%d", uid+1)}, // no /run/user/UID
	} {
		if got := StateDirFor(tc.uid, tc.xdg, runUser); got != tc.want {
			t.Errorf("stateDirFor(%d, %q) = %s, want %s", tc.uid, tc.xdg, got, tc.want)
		}
	}
	// Someone else's directory under /run/user is not used.
	other := filepath.Join(runUser, strconv.Itoa(uid+2))
	if err := os.Mkdir(other, 0o777); err != nil {
		t.Fatal(err)
	}
	if got, want := StateDirFor(uid+2, "", runUser), fmt.Sprintf("/tmp/imgfuse-%d", uid+2); got != want {
		t.Errorf("stateDirFor with a foreign /run/user dir = %s, want %s", got, want)
	}
}

// TestPruneDefaultLogs: old logs of mountpoints without a server go; a
// recent one, one whose server has a state file, and files that are not
// logs stay.
func TestPruneDefaultLogs(t *testing.T) {
	dir := t.TempDir()
	old := time.Now().Add(-8 * 24 * time.Hour)
	files := map[string]bool{ // name: kept
		"aaaa.log": false, "aaaa.log.1": false, // old, no server
		"bbbb.log": true, "bbbb.json": true, // old, but its server's state is there
		"cccc.log": true,                     // recent
		"dddd.txt": true, "eeee.log.2": true, // not ours
	}
	for name := range files {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte("x"), 0o600); err != nil {
			t.Fatal(err)
		}
		if name != "cccc.log" {
			if err := os.Chtimes(p, old, old); err != nil {
				t.Fatal(err)
			}
		}
	}
	pruneDefaultLogs(dir, time.Now().Add(-defaultLogKeep))
	for name, kept := range files {
		_, err := os.Stat(filepath.Join(dir, name))
		if (err == nil) != kept {
			t.Errorf("%s: kept %v, want %v", name, err == nil, kept)
		}
	}
}

func TestIsTempOverlay(t *testing.T) {
	for path, want := range map[string]bool{
		"/var/tmp/imgfuse-overlay-123.qcow2": true,
		"imgfuse-overlay-123.qcow2":          false,
		"/home/me/disk.qcow2":                false,
		"/var/tmp/imgfuse-overlay-123.raw":   false,
	} {
		if got := IsTempOverlay(path); got != want {
			t.Errorf("isTempOverlay(%q) = %v", path, got)
		}
	}
}

func TestArticle(t *testing.T) {
	for fstype, want := range map[string]string{"ext4": "an", "xfs": "an", "overlay": "an", "tmpfs": "a", "btrfs": "a", "": "a"} {
		if got := article(fstype); got != want {
			t.Errorf("article(%q) = %q, want %q", fstype, got, want)
		}
	}
}

func TestStateMine(t *testing.T) {
	for _, c := range []struct {
		uid  *int
		who  int
		want bool
	}{
		{UIDOf(1000), 1000, true}, {UIDOf(1000), 1001, false}, {UIDOf(0), 1000, false},
		{UIDOf(1000), 0, true}, {nil, 1000, true}, // a file from before the owner was recorded
	} {
		if got := (State{UID: c.uid}).Mine(c.who); got != c.want {
			t.Errorf("State{UID: %v}.Mine(%d) = %v, want %v", c.uid, c.who, got, c.want)
		}
	}
	// The owner is recorded, and read back.
	dir := t.TempDir()
	if _, err := WriteState(dir, State{PID: 1, UID: UIDOf(1234), Mountpoint: "/m"}); err != nil {
		t.Fatal(err)
	}
	st, err := ReadState(dir, "/m")
	if err != nil || st.UID == nil || *st.UID != 1234 {
		t.Errorf("ReadState: %+v, %v; want uid 1234", st, err)
	}
}
