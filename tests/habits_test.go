package tests

import (
	"bytes"
	"crypto/sha256"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"strings"
	"testing"
	"time"

	"imgfuse/drivers/driverstest"
)

// Tests of the command line's habits (issue 14): version, the man pages
// and the README line that installs them, URLs given as images.

// TestRemoteImagesRefused: an image given as a URL of a kind imgfuse does
// not read (ftp://, nbd://) is refused by mount, info, check, map and
// create with "remote images of this kind are not supported" and exit 5,
// never "no such file"; create refuses the kinds it reads too (remote
// images are read-only); nothing is created.
func TestRemoteImagesRefused(t *testing.T) {
	requireE2E(t)
	t.Parallel()
	mp := newMountpoint(t, false)
	dir := t.TempDir()
	for _, url := range []string{
		"ftp://example.com/disk.raw", "nbd://localhost:10809/export", "nbd+unix:///export?socket=/tmp/s",
	} {
		for _, args := range [][]string{
			{"mount", url, mp}, {"mount", "--read-only", "-f", "qcow2", url, mp}, {"info", url},
			{"info", "--output=json", "--backing-chain", url}, {"check", url}, {"check", "-r", "all", url},
			{"map", "--output=json", url}, {"create", url, "1M"},
		} {
			cmd := exec.Command(imgfuseBin, args...)
			cmd.Dir = dir
			r := runResult(t, cmd)
			if r.code != 5 || !strings.Contains(r.stderr, url+": remote images of this kind are not supported") ||
				strings.Contains(r.stderr, "no such file") || strings.Count(r.stderr, "\n") != 1 || r.stdout != "" {
				t.Errorf("imgfuse %s: %v\nwant exit 5 and one line: remote images of this kind are not supported", strings.Join(args, " "), r)
			}
		}
	}
	for _, url := range []string{"https://example.com/disk.qcow2", "s3://bucket/disk.qcow2"} {
		cmd := exec.Command(imgfuseBin, "create", url, "1M")
		cmd.Dir = dir
		if r := runResult(t, cmd); r.code != 5 || !strings.Contains(r.stderr, "remote images are read-only") || strings.Count(r.stderr, "\n") != 1 {
			t.Errorf("imgfuse create %s: %v\nwant exit 5 and one line: remote images are read-only", url, r)
		}
	}
	if mounted(t, mp) {
		t.Error("a URL got mounted")
	}
	if ents, _ := os.ReadDir(dir); len(ents) != 0 {
		t.Errorf("create of a URL made %v", ents)
	}
}

// runResult runs cmd and returns its outcome.
func runResult(t *testing.T, cmd *exec.Cmd) result {
	t.Helper()
	var stdout, stderr strings.Builder
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	r := result{stdout: stdout.String(), stderr: stderr.String()}
	if ee, ok := err.(*exec.ExitError); ok {
		r.code = ee.ExitCode()
	} else if err != nil {
		t.Fatalf("%s: %v", cmd, err)
	}
	checkNoPanic(t, r.stderr)
	return r
}

// TestVersionBuildInfo: `imgfuse version` says the version, the commit the
// binary was built from and whether the tree had changes, and the Go
// version; --output=json the same as an object. The binary is built in a
// clone of this checkout (Go stamps no VCS information in a git worktree,
// nor with the machine's GOFLAGS=-buildvcs=false), as committed and then
// with a change.
func TestVersionBuildInfo(t *testing.T) {
	requireE2E(t, "git")
	t.Parallel()
	top, err := exec.Command("git", "rev-parse", "--show-toplevel").Output()
	driverstest.SkipUnless(t, err == nil, "not in a git checkout: %v", err)
	clone := filepath.Join(t.TempDir(), "src")
	driverstest.Cmd(t, "git", "clone", "-q", strings.TrimSpace(string(top)), clone)
	head := strings.TrimSpace(string(driverstest.Cmd(t, "git", "-C", clone, "rev-parse", "HEAD")))
	bin := filepath.Join(t.TempDir(), "imgfuse")
	for _, modified := range []bool{false, true} {
		if modified {
			if err := os.WriteFile(filepath.Join(clone, "README.md"), []byte("changed\n"), 0o644); err != nil {
				t.Fatal(err)
			}
		}
		build := exec.Command("go", "build", "-buildvcs=true", "-ldflags", "-X main.version=9.8.7-test", "-o", bin, "./cmd/imgfuse")
		build.Dir = clone
		if out, err := build.CombinedOutput(); err != nil {
			t.Fatalf("go build -buildvcs=true: %v\n%s", err, out)
		}
		r := runResult(t, exec.Command(bin, "version", "--output=json"))
		var v map[string]any
		if err := json.Unmarshal([]byte(r.stdout), &v); r.code != 0 || err != nil {
			t.Fatalf("version --output=json: %v (%v)", r, err)
		}
		if v["version"] != "9.8.7-test" || v["commit"] != head || v["modified"] != modified || v["go"] != runtime.Version() || len(v) != 4 {
			t.Errorf("version --output=json: %v; want version 9.8.7-test, commit %s, modified %v, go %s", v, head, modified, runtime.Version())
		}
		r = runResult(t, exec.Command(bin, "version"))
		want := "imgfuse 9.8.7-test\ncommit: " + head
		if modified {
			want += " (with uncommitted changes)"
		}
		if want += "\ngo: " + runtime.Version() + "\n"; r.code != 0 || r.stdout != want {
			t.Errorf("version: %v\nwant:\n%s", r, want)
		}
	}
}

// TestManPages: the README's install line, run with /usr/local moved to
// a temporary directory, installs the binary and a man page for imgfuse
// and each of its commands, which man(1) renders with the command's
// flags; `imgfuse man` alone prints imgfuse.1.
func TestManPages(t *testing.T) {
	requireE2E(t, "man")
	t.Parallel()
	readme, err := os.ReadFile("../README.md")
	if err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile("Install the binary and its manual pages with `([^`]+)`").FindSubmatch(readme)
	if m == nil {
		t.Fatal("README.md has no install line (\"Install the binary and its manual pages with `...`\")")
	}
	prefix := t.TempDir()
	line := strings.ReplaceAll(string(m[1]), "/usr/local", prefix)
	if !strings.Contains(line, prefix+"/share/man/man1") {
		t.Fatalf("the install line does not install man pages under /usr/local/share/man/man1: %s", m[1])
	}
	sh := exec.Command("sh", "-ec", line)
	sh.Dir = ".."
	if out, err := sh.CombinedOutput(); err != nil {
		t.Fatalf("%s: %v\n%s", line, err, out)
	}
	man1 := filepath.Join(prefix, "share/man/man1")
	for cmd, flag := range map[string]string{
		"": "Exit codes", "mount": "--overlay-keep", "unmount": "--timeout", "status": "--output", "info": "--backing-chain",
		"check": "--repair", "map": "--start-offset", "create": "--backing-format", "demo": "--dir", "version": "--output", "man": "",
	} {
		page := "imgfuse.1"
		if cmd != "" {
			page = "imgfuse-" + cmd + ".1"
		}
		out, err := exec.Command("man", "-l", filepath.Join(man1, page)).CombinedOutput()
		if err != nil {
			t.Errorf("man -l %s: %v\n%s", page, err, out)
			continue
		}
		if !strings.Contains(string(out), strings.TrimSpace("imgfuse "+cmd)) || !strings.Contains(string(out), flag) {
			t.Errorf("man -l %s does not show %q and %s:\n%s", page, "imgfuse "+cmd, flag, out)
		}
	}
	r := imgfuse(t, nil, "man")
	if r.code != 0 || !strings.HasPrefix(r.stdout, ".nh\n.TH \"IMGFUSE\" \"1\"") || !strings.Contains(r.stdout, "imgfuse-mount(1)") {
		t.Errorf("imgfuse man: %v", r)
	}
}

// TestStatusOne: `status MOUNTPOINT` describes that mount alone (JSON:
// one object); a path that is not an imgfuse mount exits 1 saying what is
// there instead.
func TestStatusOne(t *testing.T) {
	requireE2E(t)
	t.Parallel()
	dir := t.TempDir()
	img := filepath.Join(dir, "img.qcow2")
	driverstest.Cmd(t, "qemu-img", "create", "-q", "-f", "qcow2", img, "8M")
	mp, disk := mount(t, img, false, "--read-only")
	other, _ := mount(t, img, false, "--read-only")

	r := imgfuse(t, nil, "status", "--output=json", mp)
	var e map[string]any
	if err := json.Unmarshal([]byte(r.stdout), &e); r.code != 0 || err != nil {
		t.Fatalf("status --output=json %s: %v (%v)", mp, r, err)
	}
	if e["mountpoint"] != mp || e["state"] != "mounted" || e["read-only"] != true {
		t.Errorf("status --output=json %s: %v", mp, e)
	}
	r = imgfuse(t, nil, "status", mp)
	if r.code != 0 || !strings.Contains(r.stdout, mp) || strings.Contains(r.stdout, other) || strings.Count(r.stdout, "\n") != 2 {
		t.Errorf("status %s: want the header and %s alone: %v", mp, mp, r)
	}
	for path, want := range map[string]string{
		dir:                        dir + " is not an imgfuse mount: nothing is mounted there",
		disk:                       disk + " is not an imgfuse mount: it is a file of the one at " + mp,
		filepath.Join(dir, "nope"): "nope is not an imgfuse mount: nothing is mounted there",
	} {
		r := imgfuse(t, nil, "status", path)
		if r.code != 1 || !strings.Contains(r.stderr, want) || r.stdout != "" {
			t.Errorf("status %s: %v, want exit 1 and %q", path, r, want)
		}
	}
	if r := imgfuse(t, nil, "status", mp, other); r.code != 2 {
		t.Errorf("status with two mountpoints: %v, want exit 2", r)
	}
}

// TestUnmountTimeoutBoundsBusy: --timeout bounds the whole wait of
// unmount, the retries of a busy mount (5 s otherwise) included.
func TestUnmountTimeoutBoundsBusy(t *testing.T) {
	requireE2E(t)
	t.Parallel()
	img := filepath.Join(t.TempDir(), "img.raw")
	driverstest.Cmd(t, "qemu-img", "create", "-q", "-f", "raw", img, "8M")
	mp, disk := mount(t, img, false, "--read-only")
	f, err := os.Open(disk)
	if err != nil {
		t.Fatal(err)
	}
	start := time.Now()
	r := imgfuse(t, nil, "unmount", "--timeout", "1s", mp)
	took := time.Since(start)
	f.Close()
	if r.code != 1 || !strings.Contains(r.stderr, "target is busy") {
		t.Errorf("unmount --timeout 1s of a busy mount: %v, want exit 1, busy", r)
	}
	if took > 3*time.Second {
		t.Errorf("unmount --timeout 1s of a busy mount took %v", took)
	}
}

// TestUnmountLazy: `unmount --lazy` detaches at once, as umount -l, while
// a process still has the disk open: the mountpoint is free, the open
// file keeps working, the image stays locked; when the file is closed the
// server flushes, closes the image and releases its lock, and the image
// is clean and holds the write.
func TestUnmountLazy(t *testing.T) {
	requireE2E(t)
	t.Parallel()
	img := filepath.Join(t.TempDir(), "img.qcow2")
	driverstest.Cmd(t, "qemu-img", "create", "-q", "-f", "qcow2", img, "8M")
	mp, disk := mount(t, img, false)
	pid := daemonPID(t, mp)
	f, err := os.OpenFile(disk, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	start := time.Now()
	r := imgfuse(t, nil, "unmount", "--lazy", mp)
	if r.code != 0 || !strings.Contains(r.stderr, "still in use") || time.Since(start) > 10*time.Second {
		t.Fatalf("unmount --lazy with the disk open: %v (after %v)", r, time.Since(start))
	}
	if mounted(t, mp) {
		t.Fatal("unmount --lazy returned, but the mount is still in the mount table")
	}
	if !alive(pid) || !imageLocked(t, img) {
		t.Fatalf("after unmount --lazy with the disk open: server alive %v, image locked %v; want both", alive(pid), imageLocked(t, img))
	}
	p := bytes.Repeat([]byte("lazy"), 1024)
	if _, err := f.WriteAt(p, 1<<20); err != nil {
		t.Fatalf("write through the disk opened before unmount --lazy: %v", err)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	if !waitFor(20*time.Second, func() bool { return !alive(pid) }) {
		t.Fatalf("the server (pid %d) still runs 20 s after the last user closed the disk", pid)
	}
	if imageLocked(t, img) {
		t.Error("the image is still locked after the server exited")
	}
	requireClean(t, img)
	got := driverstest.Cmd(t, "qemu-io", "-c", "read -P 0x6c 1048576 1", "-c", "read -P 0x61 1048577 1", img)
	if !bytes.Contains(got, []byte("read 1/1 bytes")) || bytes.Contains(got, []byte("Pattern verification failed")) {
		t.Errorf("the write through the lazily unmounted disk is not in the image:\n%s", got)
	}

	// Nothing holding it: --lazy waits for the server and returns once
	// the image is closed, as a plain unmount does.
	mp, _ = mount(t, img, false)
	pid = daemonPID(t, mp)
	if r := imgfuse(t, nil, "unmount", "-l", mp); r.code != 0 || r.stderr != "" || mounted(t, mp) {
		t.Errorf("unmount -l of an idle mount: %v", r)
	}
	if alive(pid) || imageLocked(t, img) {
		t.Errorf("unmount -l of an idle mount returned before its server closed the image (alive %v)", alive(pid))
	}
}

// TestRootlessOwnMountsOnly: a user's status and unmount speak of that
// user's mounts only. Root's mount is not listed by the user's status,
// not named by their unmount of an unmounted path, and status of it says
// whose it is (exit 1); a state file in the user's directory that records
// another owner is not listed; the user's own mount is.
func TestRootlessOwnMountsOnly(t *testing.T) {
	t.Parallel()
	e := requireRootless(t)
	// Root's mount, in a directory the user can traverse.
	rootImg := filepath.Join(e.dir, "root.qcow2")
	driverstest.Cmd(t, "qemu-img", "create", "-q", "-f", "qcow2", rootImg, "8M")
	rootMP := e.path("rootmnt")
	if err := os.Mkdir(rootMP, 0o755); err != nil {
		t.Fatal(err)
	}
	registerMountpoint(t, rootMP)
	if r := imgfuse(t, nil, "mount", "--read-only", rootImg, rootMP); r.code != 0 {
		t.Fatalf("imgfuse mount as root: %v", r)
	}
	t.Cleanup(func() { imgfuse(t, nil, "unmount", rootMP) })

	e.must(t, nil, "truncate", "-s", "8M", "disk.raw")
	e.mkdir(t, "mnt")
	e.mount(t, "disk.raw", "mnt")
	// A state file of someone else's mount in the user's directory.
	stateDir := e.path("run/imgfuse")
	foreign := `{"pid": 1, "uid": 0, "image": "/srv/other.qcow2", "mountpoint": "/srv/othermnt", "format": "qcow2", "started": "2026-01-01T00:00:00Z"}`
	foreignPath := filepath.Join(stateDir, fmt.Sprintf("%x.json", sha256.Sum256([]byte("/srv/othermnt"))))
	if err := os.WriteFile(foreignPath, []byte(foreign), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.Chown(foreignPath, int(e.uid), int(e.gid)); err != nil {
		t.Fatal(err)
	}

	r := e.must(t, nil, "imgfuse", "status")
	if !strings.Contains(r.stdout, e.path("mnt")) || strings.Contains(r.stdout, rootMP) || strings.Contains(r.stdout, "/srv/othermnt") {
		t.Errorf("status as %s: want %s alone:\n%s", e.name, e.path("mnt"), r.stdout)
	}
	r = e.run(t, nil, "imgfuse", "unmount", "nothing-here")
	if r.code != 1 || strings.Contains(r.stderr, rootMP) || !strings.Contains(r.stderr, e.path("mnt")) {
		t.Errorf("unmount of an unmounted path as %s: %v; want exit 1 naming the user's mount, not root's", e.name, r)
	}
	r = e.run(t, nil, "imgfuse", "status", rootMP)
	if r.code != 1 || !strings.Contains(r.stderr, "is not one of your imgfuse mounts: uid 0 mounted it") {
		t.Errorf("status of root's mount as %s: %v", e.name, r)
	}
	r = e.run(t, nil, "imgfuse", "unmount", rootMP)
	if r.code != 1 || !strings.Contains(r.stderr, "another user (uid 0)") || !mounted(t, rootMP) {
		t.Errorf("unmount of root's mount as %s: %v", e.name, r)
	}
	if st := e.status(t, "mnt"); st.State != "mounted" {
		t.Errorf("status of the user's own mount: %+v", st)
	}
}

// TestLockHeldByClosingServer: an image whose mount was unmounted with a
// plain umount (here lazily, while a process still has the disk open, so
// that the server is still closing for as long as the test needs) is
// still locked; imgfuse's own commands then name the server, say it is
// still closing the image, and point at 'imgfuse unmount', which waits
// (exit 4; check exits 1, as qemu-img check does). A mounted image's lock
// names its mount.
func TestLockHeldByClosingServer(t *testing.T) {
	requireE2E(t, "umount")
	t.Parallel()
	img := filepath.Join(t.TempDir(), "img.qcow2")
	driverstest.Cmd(t, "qemu-img", "create", "-q", "-f", "qcow2", img, "8M")
	mp, disk := mount(t, img, false)
	pid := daemonPID(t, mp)
	mp2 := newMountpoint(t, false)
	r := imgfuse(t, nil, "mount", img, mp2)
	if r.code != 4 || !strings.Contains(r.stderr, fmt.Sprintf("held by the imgfuse mount at %s (pid %d)", mp, pid)) {
		t.Errorf("mount of a mounted image: %v, want exit 4 naming the mount", r)
	}

	f, err := os.Open(disk)
	if err != nil {
		t.Fatal(err)
	}
	driverstest.Cmd(t, "umount", "-l", mp)
	want := fmt.Sprintf("held by imgfuse (pid %d), which is still closing the image after %s was unmounted", pid, mp)
	for _, args := range [][]string{{"mount", img, mp2}, {"check", "-r", "all", img}, {"create", "-f", "qcow2", img, "1M"}} {
		r := imgfuse(t, nil, args...)
		code := 4
		if args[0] == "check" {
			code = 1
		}
		if r.code != code || !strings.Contains(r.stderr, want) || !strings.Contains(r.stderr, "'imgfuse unmount'") ||
			strings.Count(r.stderr, "\n") != 1 {
			t.Errorf("imgfuse %s while the server closes: %v\nwant exit %d and one line: %s", strings.Join(args, " "), r, code, want)
		}
	}
	f.Close()
	if !waitFor(20*time.Second, func() bool { return !alive(pid) }) {
		t.Fatalf("the server (pid %d) still runs after the last user closed the disk", pid)
	}
	requireClean(t, img)
}

// TestRootlessVfatMtools: the README's way to a vfat partition without
// root: mtools on MNT/partN. As a user, a DOS-partitioned image gets a FAT
// filesystem (mformat) and a file (mcopy) through imgfuse, which reads
// back equal; after imgfuse unmount the image holds them (mdir and mcopy
// on the partition cut out of it as root).
func TestRootlessVfatMtools(t *testing.T) {
	t.Parallel()
	e := requireRootless(t, "mformat", "mcopy", "mdir", "sfdisk")
	e.must(t, nil, "truncate", "-s", "32M", "disk.raw")
	e.must(t, []byte("label: dos\n,,c\n"), "sfdisk", "-q", "disk.raw")
	part := sfdiskList(t, e.path("disk.raw"))["part1"]
	e.must(t, nil, "qemu-img", "convert", "-f", "raw", "-O", "qcow2", "disk.raw", "disk.qcow2")
	e.mkdir(t, "mnt")
	e.mount(t, "disk.qcow2", "mnt")
	data := e.writeRandom(t, "data.bin", 7, 200<<10+13)
	e.must(t, nil, "mformat", "-i", "mnt/part1", "::")
	e.must(t, nil, "mcopy", "-i", "mnt/part1", "data.bin", "::/data.bin")
	e.must(t, nil, "mcopy", "-i", "mnt/part1", "::/data.bin", "back.bin")
	e.must(t, nil, "cmp", "data.bin", "back.bin")
	e.must(t, nil, "imgfuse", "unmount", "mnt")

	driverstest.Cmd(t, "qemu-img", "check", "-q", e.path("disk.qcow2"))
	raw := filepath.Join(t.TempDir(), "out.raw")
	driverstest.Cmd(t, "qemu-img", "convert", "-f", "qcow2", "-O", "raw", e.path("disk.qcow2"), raw)
	p1 := filepath.Join(t.TempDir(), "part1.raw")
	extract(t, raw, p1, part.Start*512, part.Size*512)
	if out := driverstest.Cmd(t, "mdir", "-i", p1, "::"); !bytes.Contains(bytes.ToLower(out), []byte("data     bin")) {
		t.Errorf("mdir of partition 1 from the image does not list data.bin:\n%s", out)
	}
	got := filepath.Join(t.TempDir(), "got.bin")
	driverstest.Cmd(t, "mcopy", "-i", p1, "::/data.bin", got)
	if b, err := os.ReadFile(got); err != nil || !bytes.Equal(b, data) {
		t.Errorf("data.bin in the image: %d bytes (%v), want the %d written", len(b), err, len(data))
	}
}

// TestRootlessFuse2fsCpA: what the README says of `cp -a` into fuse2fs -o
// fakeroot as a user: a root-owned file's ownership is recorded (the
// chown succeeds), then cp's chmod of the file the user no longer owns is
// refused and cp exits 1; `cp -r --preserve=timestamps` copies it as the
// user's, cleanly.
func TestRootlessFuse2fsCpA(t *testing.T) {
	t.Parallel()
	e := requireRootless(t, "fuse2fs", "mkfs.ext4", "debugfs")
	e.must(t, nil, "truncate", "-s", "32M", "disk.raw")
	e.mkdir(t, "mnt")
	e.mkdir(t, "fs")
	src := e.path("rootfile") // root's, readable by all
	if err := os.WriteFile(src, []byte("root's\n"), 0o640|0o004); err != nil {
		t.Fatal(err)
	}
	e.mount(t, "disk.raw", "mnt")
	e.must(t, nil, "mkfs.ext4", "-q", "mnt/disk")
	e.must(t, nil, "fuse2fs", "-o", "fakeroot", "mnt/disk", "fs")
	fsmnt := e.path("fs")
	registerMountpoint(t, fsmnt)
	t.Cleanup(func() {
		if mounted(t, fsmnt) {
			e.run(t, nil, "fusermount3", "-u", "fs")
		}
	})
	if r := e.run(t, nil, "cp", "-a", "rootfile", "fs/a"); r.code != 1 || !strings.Contains(r.stderr, "Operation not permitted") {
		t.Errorf("cp -a of a root-owned file into fuse2fs -o fakeroot: %v, want exit 1, Operation not permitted", r)
	}
	e.must(t, nil, "cp", "-r", "--preserve=timestamps", "rootfile", "fs/t")
	e.must(t, nil, "fusermount3", "-u", "fs")
	waitFor(10*time.Second, func() bool { return e.run(t, nil, "imgfuse", "unmount", "mnt").code == 0 })
	for name, uid := range map[string]string{"/a": "0", "/t": fmt.Sprint(e.uid)} {
		out := string(driverstest.Cmd(t, "debugfs", "-R", "stat "+name, e.path("disk.raw")))
		if !regexp.MustCompile(`User:\s+` + uid + `\s`).MatchString(out) {
			t.Errorf("%s in the filesystem: want owner %s:\n%s", name, uid, out)
		}
	}
}
