package tests

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"math/rand"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"imgfuse/drivers/driverstest"
)

// The rootless tests run imgfuse, fuse2fs and the tools around them as a
// user other than root, as a normal distribution allows it: /dev/fuse is
// 0666 and fusermount3 is set-uid root. The test process stays root only
// to switch users, to build images and to check the results.

// testUserEnv names the unprivileged user; default nobody.
const testUserEnv = "IMGFUSE_TEST_USER"

// userEnv is a workspace owned by the unprivileged user: a directory only
// they (and root) can reach, with a copy of the imgfuse binary they can
// run, their XDG_RUNTIME_DIR (imgfuse's state files) and TMPDIR.
type userEnv struct {
	name     string
	uid, gid uint32
	dir      string
	bin      string
	env      []string
}

// requireRootless skips t (fails it with IMGFUSE_REQUIRE_E2E=1) unless
// the unprivileged user exists and can open /dev/fuse, and fusermount3
// and tools are installed. It returns the user's workspace.
func requireRootless(t *testing.T, tools ...string) *userEnv {
	t.Helper()
	requireE2E(t, append([]string{"fusermount3"}, tools...)...)
	name := os.Getenv(testUserEnv)
	if name == "" {
		name = "nobody"
	}
	u, err := user.Lookup(name)
	driverstest.SkipUnless(t, err == nil, "user %s (set %s to another unprivileged user): %v", name, testUserEnv, err)
	uid, err1 := strconv.ParseUint(u.Uid, 10, 32)
	gid, err2 := strconv.ParseUint(u.Gid, 10, 32)
	if err1 != nil || err2 != nil || uid == 0 {
		t.Fatalf("%s=%s: uid %s gid %s is not an unprivileged user", testUserEnv, name, u.Uid, u.Gid)
	}
	e := &userEnv{name: name, uid: uint32(uid), gid: uint32(gid)}

	// Removed last, after every mount in it is gone.
	dir, err := os.MkdirTemp("", "imgfuse-rootless-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	e.dir = dir
	for _, d := range []string{dir, filepath.Join(dir, "run"), filepath.Join(dir, "tmp")} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			t.Fatal(err)
		}
		if err := os.Chown(d, int(e.uid), int(e.gid)); err != nil {
			t.Fatal(err)
		}
	}
	e.env = []string{
		"PATH=" + os.Getenv("PATH"), "HOME=" + dir, "LC_ALL=C",
		"XDG_RUNTIME_DIR=" + filepath.Join(dir, "run"), "TMPDIR=" + filepath.Join(dir, "tmp"),
		"GORACE=log_path=" + filepath.Join(dir, "race") + " halt_on_error=0",
	}
	t.Cleanup(func() { checkRaceLogs(t, dir) })

	reach := exec.Command("test", "-w", dir)
	reach.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: e.uid, Gid: e.gid, Groups: []uint32{}}}
	if err := reach.Run(); err != nil {
		t.Fatalf("%s cannot reach %s (%v): the temporary directory ($TMPDIR) must be one every user can traverse", name, dir, err)
	}
	r := e.run(t, nil, "sh", "-c", "exec 3<>/dev/fuse")
	driverstest.SkipUnless(t, r.code == 0, "/dev/fuse cannot be opened by %s (distributions make it 0666; so does .ci/run): %s",
		name, strings.TrimSpace(r.stderr))

	// The binary TestMain built lives in a directory only root can
	// reach: the user runs a copy.
	e.bin = filepath.Join(dir, "imgfuse")
	copyFile(t, imgfuseBin, e.bin, 0o755)
	return e
}

// copyFile copies src to a new file dst with mode perm.
func copyFile(t *testing.T, src, dst string, perm os.FileMode) {
	t.Helper()
	in, err := os.Open(src)
	if err != nil {
		t.Fatal(err)
	}
	defer in.Close()
	out, err := os.OpenFile(dst, os.O_WRONLY|os.O_CREATE|os.O_EXCL, perm)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		t.Fatal(err)
	}
	if err := out.Close(); err != nil {
		t.Fatal(err)
	}
}

// path names a file of the workspace.
func (e *userEnv) path(name string) string { return filepath.Join(e.dir, name) }

// mkdir makes a directory of the workspace that the user owns.
func (e *userEnv) mkdir(t *testing.T, name string) string {
	t.Helper()
	p := e.path(name)
	if err := os.Mkdir(p, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Chown(p, int(e.uid), int(e.gid)); err != nil {
		t.Fatal(err)
	}
	return p
}

// run runs name as the user, in the workspace, with stdin (if not nil).
// "imgfuse" is the user's copy of the binary. A command that outlives
// 60 s is killed and fails t.
func (e *userEnv) run(t *testing.T, stdin []byte, name string, args ...string) result {
	t.Helper()
	if name == "imgfuse" {
		name = e.bin
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	var stdout, stderr bytes.Buffer
	var err error
	// ETXTBSY: the copy of the binary was just written, and a process
	// another test forked meanwhile may still hold the writing
	// descriptor until it execs (golang/go#22315); it passes at once.
	for try := 0; ; try++ {
		stdout.Reset()
		stderr.Reset()
		cmd := exec.CommandContext(ctx, name, args...)
		cmd.Dir, cmd.Env = e.dir, e.env
		cmd.Stdout, cmd.Stderr = &stdout, &stderr
		if stdin != nil {
			cmd.Stdin = bytes.NewReader(stdin)
		}
		cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: e.uid, Gid: e.gid, Groups: []uint32{}}}
		cmd.WaitDelay = 3 * time.Second
		err = cmd.Run()
		if !errors.Is(err, syscall.ETXTBSY) || try == 50 {
			break
		}
		time.Sleep(20 * time.Millisecond)
	}
	r := result{stdout: stdout.String(), stderr: stderr.String()}
	var ee *exec.ExitError
	line := filepath.Base(name) + " " + strings.Join(args, " ")
	switch {
	case err == nil:
	case errors.Is(err, exec.ErrWaitDelay):
		t.Errorf("%s: a process it started kept its stdout/stderr open", line)
	case errors.As(err, &ee):
		r.code = ee.ExitCode()
	default:
		t.Fatalf("%s as %s: %v", line, e.name, err)
	}
	if ctx.Err() != nil {
		t.Fatalf("%s as %s: timed out after 60s\n%v", line, e.name, r)
	}
	if name == e.bin {
		checkNoPanic(t, r.stderr)
	}
	return r
}

// must runs name as the user and fails t unless it exits 0.
func (e *userEnv) must(t *testing.T, stdin []byte, name string, args ...string) result {
	t.Helper()
	r := e.run(t, stdin, name, args...)
	if r.code != 0 {
		t.Fatalf("%s %s as %s: %v", name, strings.Join(args, " "), e.name, r)
	}
	return r
}

// registerMountpoint adds mp to the mountpoints TestMain checks, and
// unmounts whatever is left there at the end of t.
func registerMountpoint(t *testing.T, mp string) {
	mountpoints.Lock()
	mountpoints.list = append(mountpoints.list, mp)
	mountpoints.Unlock()
	t.Cleanup(func() { forceUnmount(t, mp) })
}

// mount mounts img on mp (relative to the workspace) as the user, with a
// log and a pid file, and returns the server's pid. The cleanup unmounts
// it as the user; a watchdog kills a server that hangs.
func (e *userEnv) mount(t *testing.T, img, mp string, flags ...string) int {
	t.Helper()
	abs := e.path(mp)
	registerMountpoint(t, abs)
	logFile := e.path(mp + ".log")
	pidFile := e.path(mp + ".pid")
	args := append([]string{"mount", "--log", logFile, "--pidfile", pidFile}, flags...)
	e.must(t, nil, "imgfuse", append(args, img, mp)...)
	if !mounted(t, abs) {
		t.Fatalf("imgfuse mount exited 0 but %s is not in /proc/self/mountinfo", abs)
	}
	b, err := os.ReadFile(pidFile)
	if err != nil {
		t.Fatal(err)
	}
	pid, err := strconv.Atoi(strings.TrimSpace(string(b)))
	if err != nil {
		t.Fatalf("pid file %s: %q", pidFile, b)
	}
	timer := time.AfterFunc(watchdog, func() {
		t.Errorf("%s still mounted after %v: killing its server (pid %d)", abs, watchdog, pid)
		syscall.Kill(pid, syscall.SIGQUIT)
		time.Sleep(2 * time.Second)
		syscall.Kill(pid, syscall.SIGKILL)
	})
	t.Cleanup(func() {
		timer.Stop()
		if mounted(t, abs) {
			if r := e.run(t, nil, "imgfuse", "unmount", mp); r.code != 0 {
				t.Errorf("cleanup: imgfuse unmount %s as %s: %v", mp, e.name, r)
			}
		}
		if b, err := os.ReadFile(logFile); err == nil {
			checkNoPanic(t, string(b))
			if t.Failed() && len(b) > 0 {
				t.Logf("daemon log %s:\n%s", logFile, b)
			}
		}
	})
	return pid
}

// userStatus is what the tests read of `imgfuse status --output=json`.
type userStatus struct {
	Mountpoint        string `json:"mountpoint"`
	PID               int    `json:"pid"`
	State             string `json:"state"`
	Passthrough       bool   `json:"passthrough"`
	PassthroughDetail string `json:"passthrough-detail"`
	Log               string `json:"log"`
}

// status runs `imgfuse status --output=json` as the user and returns the
// entry of mp, failing t if there is none.
func (e *userEnv) status(t *testing.T, mp string) userStatus {
	t.Helper()
	r := e.must(t, nil, "imgfuse", "status", "--output=json")
	var entries []userStatus
	if err := json.Unmarshal([]byte(r.stdout), &entries); err != nil {
		t.Fatalf("imgfuse status --output=json: %v\n%s", err, r.stdout)
	}
	for _, s := range entries {
		if s.Mountpoint == e.path(mp) {
			return s
		}
	}
	t.Fatalf("imgfuse status as %s does not list %s:\n%s", e.name, e.path(mp), r.stdout)
	return userStatus{}
}

// writeRandom writes n random bytes (from seed) to a new file of the
// workspace, readable by the user, and returns them.
func (e *userEnv) writeRandom(t *testing.T, name string, seed int64, n int) []byte {
	t.Helper()
	b := make([]byte, n)
	rand.New(rand.NewSource(seed)).Read(b)
	if err := os.WriteFile(e.path(name), b, 0o644); err != nil {
		t.Fatal(err)
	}
	return b
}

// TestRootlessQcow2: as a user, mount a qcow2 image (daemon mode), write
// and read the disk, see it in `status`, unmount; the image is clean and
// holds exactly what was written.
func TestRootlessQcow2(t *testing.T) {
	t.Parallel()
	e := requireRootless(t)
	const size = 32 << 20
	e.must(t, nil, "qemu-img", "create", "-q", "-f", "qcow2", "img.qcow2", strconv.Itoa(size))
	model := e.path("model.raw")
	if err := os.WriteFile(model, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(model, size); err != nil {
		t.Fatal(err)
	}
	e.mkdir(t, "mnt")
	pid := e.mount(t, "img.qcow2", "mnt")

	// The state file is the user's, in their XDG_RUNTIME_DIR.
	if ents, err := os.ReadDir(e.path("run/imgfuse")); err != nil || len(ents) != 1 {
		t.Errorf("state files in $XDG_RUNTIME_DIR/imgfuse: %v, %v; want one", ents, err)
	}
	if st := e.status(t, "mnt"); st.State != "mounted" || st.PID != pid || st.Log != e.path("mnt.log") {
		t.Errorf("imgfuse status as %s: %+v, want mounted by pid %d, logging to %s", e.name, st, pid, e.path("mnt.log"))
	}

	mf, err := os.OpenFile(model, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer mf.Close()
	// Aligned, unaligned across clusters, and the last bytes of the disk.
	for i, w := range []struct{ off, n int64 }{{0, 64 << 10}, {5<<20 + 512, 100 << 10}, {size - 4096, 4096}, {12<<20 - 1000, 3000}} {
		name := fmt.Sprintf("chunk%d", i)
		data := e.writeRandom(t, name, int64(i), int(w.n))
		e.must(t, nil, "dd", "if="+name, "of=mnt/disk", "bs=64K", "seek="+strconv.FormatInt(w.off, 10),
			"oflag=seek_bytes", "conv=notrunc,fsync", "status=none")
		if _, err := mf.WriteAt(data, w.off); err != nil {
			t.Fatal(err)
		}
	}
	// The user reads the whole disk back.
	e.must(t, nil, "cmp", "mnt/disk", "model.raw")

	e.must(t, nil, "imgfuse", "unmount", "mnt")
	if mounted(t, e.path("mnt")) {
		t.Fatal("imgfuse unmount returned, but mnt is still mounted")
	}
	if alive(pid) {
		t.Errorf("the server (pid %d) still runs after imgfuse unmount returned", pid)
	}
	driverstest.Cmd(t, "qemu-img", "check", "-q", e.path("img.qcow2"))
	driverstest.Cmd(t, "qemu-img", "compare", "-q", "-f", "qcow2", "-F", "raw", e.path("img.qcow2"), model)
}

// TestRootlessFuse2fs: a filesystem in a partitioned image without root at
// any step, the recipe of the README: imgfuse mount, mkfs.ext4 on
// MNT/part1, fuse2fs -o fakeroot on it, files written, fusermount3 -u,
// imgfuse unmount. The image is clean, the filesystem passes e2fsck, the
// files read back equal and belong to the user.
func TestRootlessFuse2fs(t *testing.T) {
	t.Parallel()
	e := requireRootless(t, "fuse2fs", "sfdisk", "mkfs.ext4", "e2fsck", "debugfs")
	// The GPT disk, made by the user: one Linux partition filling it.
	e.must(t, nil, "truncate", "-s", "32M", "disk.raw")
	e.must(t, []byte("label: gpt\n,\n"), "sfdisk", "-q", "disk.raw")
	e.must(t, nil, "qemu-img", "convert", "-f", "raw", "-O", "qcow2", "disk.raw", "disk.qcow2")
	part := sfdiskList(t, e.path("disk.raw"))["part1"]
	if part.Size == 0 {
		t.Fatalf("sfdisk made no partition 1: %+v", sfdiskList(t, e.path("disk.raw")))
	}

	e.mkdir(t, "mnt")
	e.mkdir(t, "fs")
	e.mount(t, "disk.qcow2", "mnt")
	e.must(t, nil, "mkfs.ext4", "-q", "mnt/part1")
	e.must(t, nil, "fuse2fs", "-o", "fakeroot", "mnt/part1", "fs")
	fsmnt := e.path("fs")
	registerMountpoint(t, fsmnt)
	t.Cleanup(func() {
		if mounted(t, fsmnt) {
			e.run(t, nil, "fusermount3", "-u", "fs")
		}
	})
	if !mounted(t, fsmnt) {
		t.Fatal("fuse2fs exited 0 but fs is not mounted")
	}

	big := e.writeRandom(t, "big", 1, 3<<20+123)
	small := []byte("written by a user through fuse2fs and imgfuse\n")
	if err := os.WriteFile(e.path("small"), small, 0o644); err != nil {
		t.Fatal(err)
	}
	e.must(t, nil, "mkdir", "fs/dir")
	e.must(t, nil, "cp", "big", "fs/dir/big")
	e.must(t, nil, "cp", "small", "fs/small.txt")
	e.must(t, nil, "cmp", "fs/dir/big", "big")

	e.must(t, nil, "fusermount3", "-u", "fs")
	e.must(t, nil, "imgfuse", "unmount", "mnt")
	if mounted(t, e.path("mnt")) || mounted(t, fsmnt) {
		t.Fatal("fs or mnt still mounted after fusermount3 -u and imgfuse unmount")
	}

	driverstest.Cmd(t, "qemu-img", "check", "-q", e.path("disk.qcow2"))
	raw := filepath.Join(t.TempDir(), "out.raw")
	driverstest.Cmd(t, "qemu-img", "convert", "-f", "qcow2", "-O", "raw", e.path("disk.qcow2"), raw)
	p1 := filepath.Join(t.TempDir(), "part1.raw")
	extract(t, raw, p1, part.Start*512, part.Size*512)
	if out, err := exec.Command("e2fsck", "-fn", p1).CombinedOutput(); err != nil {
		t.Fatalf("e2fsck -fn on partition 1: %v\n%s", err, out)
	}
	for name, want := range map[string][]byte{"/dir/big": big, "/small.txt": small} {
		got := driverstest.Cmd(t, "debugfs", "-R", "cat "+name, p1)
		if !bytes.Equal(got, want) {
			t.Errorf("%s in the image: %d bytes, want the %d written", name, len(got), len(want))
		}
		stat := driverstest.Cmd(t, "debugfs", "-R", "stat "+name, p1)
		if re := regexp.MustCompile(fmt.Sprintf(`User:\s+%d\s+Group:\s+%d\b`, e.uid, e.gid)); !re.Match(stat) {
			t.Errorf("%s does not belong to %s (uid %d):\n%s", name, e.name, e.uid, stat)
		}
	}
}

// extract copies n bytes at off of src to a new file dst.
func extract(t *testing.T, src, dst string, off, n int64) {
	t.Helper()
	in, err := os.Open(src)
	if err != nil {
		t.Fatal(err)
	}
	defer in.Close()
	out, err := os.Create(dst)
	if err != nil {
		t.Fatal(err)
	}
	defer out.Close()
	if _, err := io.Copy(out, io.NewSectionReader(in, off, n)); err != nil {
		t.Fatal(err)
	}
}

// TestRootlessDeadMount: a user's server killed with SIGKILL leaves a dead
// mount that `imgfuse unmount` as the user detaches (fusermount3 -u -z),
// exiting 0 with a note; the mountpoint then takes a new mount. On the
// way: a raw image's passthrough is off for a user (it needs
// CAP_SYS_ADMIN), and status says so; a regular file is a mountpoint for
// a user too.
func TestRootlessDeadMount(t *testing.T) {
	t.Parallel()
	e := requireRootless(t)
	e.must(t, nil, "truncate", "-s", "32M", "disk.raw")
	e.mkdir(t, "mnt")
	pid := e.mount(t, "disk.raw", "mnt")
	if st := e.status(t, "mnt"); st.Passthrough || !strings.HasPrefix(st.PassthroughDetail, "off: ") {
		t.Errorf("passthrough of a user's mount: %+v, want off with the reason", st)
	}
	if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	if !waitFor(10*time.Second, func() bool { return !alive(pid) }) {
		t.Fatalf("the server (pid %d) survived SIGKILL", pid)
	}
	if st := e.status(t, "mnt"); st.State != "dead" {
		t.Errorf("status of the dead mount: %+v, want dead", st)
	}
	r := e.must(t, nil, "imgfuse", "unmount", "mnt")
	if !strings.Contains(r.stderr, "was a dead mount") {
		t.Errorf("imgfuse unmount of the dead mount: %v, want the note", r)
	}
	if mounted(t, e.path("mnt")) {
		t.Fatal("the dead mount is still there after imgfuse unmount")
	}
	e.mount(t, "disk.raw", "mnt")
	e.must(t, nil, "sh", "-c", "echo again | dd of=mnt/disk conv=notrunc status=none")
	e.must(t, nil, "imgfuse", "unmount", "mnt")
	b := make([]byte, 6)
	f, err := os.Open(e.path("disk.raw"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.ReadAt(b, 0); err != nil || string(b) != "again\n" {
		t.Errorf("the image after the second mount starts with %q (%v), want the write", b, err)
	}

	// A regular file the user owns is a mountpoint too: the disk itself.
	if err := os.WriteFile(e.path("file"), nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Chown(e.path("file"), int(e.uid), int(e.gid)); err != nil {
		t.Fatal(err)
	}
	e.mount(t, "disk.raw", "file")
	if r := e.must(t, nil, "head", "-c", "6", "file"); r.stdout != "again\n" {
		t.Errorf("the file mountpoint starts with %q, want the disk's bytes", r.stdout)
	}
	e.must(t, nil, "imgfuse", "unmount", "file")
}

// TestRootlessMountRefused: when fusermount3 refuses a user's mount (a
// mountpoint the user may not write to; /dev/fuse closed to users, as some
// containers have it), imgfuse prints fusermount3's own reason on one line
// and exits 7, in daemon mode and in the foreground, leaving no server
// behind.
func TestRootlessMountRefused(t *testing.T) {
	t.Parallel()
	e := requireRootless(t, "unshare", "setpriv")
	e.must(t, nil, "truncate", "-s", "32M", "disk.raw")
	mp := e.path("rootmp") // root's, 0755
	if err := os.Mkdir(mp, 0o755); err != nil {
		t.Fatal(err)
	}
	registerMountpoint(t, mp)
	for _, flags := range [][]string{nil, {"--foreground"}} {
		args := append(append([]string{"mount"}, flags...), "disk.raw", "rootmp")
		r := e.run(t, nil, "imgfuse", args...)
		want := "imgfuse: mount rootmp: fusermount3: user has no write access to mountpoint " + mp + "\n"
		if r.code != 7 || r.stderr != want {
			t.Errorf("imgfuse %s as %s: %v\nwant exit 7 and stderr %q", strings.Join(args, " "), e.name, r, want)
		}
		if mounted(t, mp) {
			t.Fatalf("imgfuse %s failed but left a mount", strings.Join(args, " "))
		}
	}

	// root's mount: the user may not unmount it, and is told whose it is
	// (not fusermount3's "not found in /etc/mtab").
	if r := imgfuse(t, nil, "mount", "--read-only", e.path("disk.raw"), mp); r.code != 0 {
		t.Fatalf("mount as root: %v", r)
	}
	r := e.run(t, nil, "imgfuse", "unmount", "rootmp")
	if want := "imgfuse: unmount rootmp: it was mounted by another user (uid 0); only that user or root can unmount it\n"; r.code != 1 || r.stderr != want {
		t.Errorf("imgfuse unmount of root's mount as %s: %v\nwant exit 1 and stderr %q", e.name, r, want)
	}
	if !mounted(t, mp) {
		t.Error("the user's refused unmount unmounted root's mount")
	}
	if r := imgfuse(t, nil, "unmount", mp); r.code != 0 {
		t.Errorf("unmount as root: %v", r)
	}

	// /dev/fuse root's alone (crw-------), in a mount namespace of the
	// user's command only: a 0600 node of the device bound over it.
	fake := e.path("fuse-0600")
	if err := unix.Mknod(fake, unix.S_IFCHR|0o600, int(unix.Mkdev(10, 229))); err != nil {
		t.Fatal(err)
	}
	e.mkdir(t, "mnt")
	registerMountpoint(t, e.path("mnt"))
	script := `mount --bind "$1" /dev/fuse && exec setpriv --reuid="$2" --regid="$3" --clear-groups "$4" mount disk.raw mnt`
	var stderr bytes.Buffer
	cmd := exec.Command("unshare", "--mount", "--propagation", "private", "sh", "-c", script, "sh",
		fake, strconv.Itoa(int(e.uid)), strconv.Itoa(int(e.gid)), e.bin)
	cmd.Dir, cmd.Env, cmd.Stderr = e.dir, e.env, &stderr
	cmd.WaitDelay = 3 * time.Second
	err := cmd.Run()
	var ee *exec.ExitError
	if want := "imgfuse: mount mnt: fusermount3: failed to open /dev/fuse: Permission denied\n"; !errors.As(err, &ee) ||
		ee.ExitCode() != 7 || stderr.String() != want {
		t.Errorf("imgfuse mount as %s with /dev/fuse 0600: %v\nstderr: %s\nwant exit 7 and stderr %q", e.name, err, stderr.String(), want)
	}
	if mounted(t, e.path("mnt")) {
		t.Fatal("the refused mount left a mount")
	}

	if st := e.must(t, nil, "imgfuse", "status"); !strings.Contains(st.stdout, "no imgfuse mounts") {
		t.Errorf("imgfuse status after the refused mounts: %v", st)
	}
	if pids := running(e.bin); len(pids) > 0 {
		t.Errorf("imgfuse processes left after the refused mounts: %v", pids)
	}
}

// running lists the processes that run the executable bin.
func running(bin string) []int {
	ents, _ := os.ReadDir("/proc")
	var pids []int
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		if exe, err := os.Readlink(fmt.Sprintf("/proc/%d/exe", pid)); err == nil && exe == bin && alive(pid) {
			pids = append(pids, pid)
		}
	}
	return pids
}

// TestRootlessDemo: `imgfuse demo` run by a user prints commands that work
// without root (fuse2fs instead of a loop device), as printed, and
// unmounting leaves nothing of the demo behind.
func TestRootlessDemo(t *testing.T) {
	t.Parallel()
	e := requireRootless(t, "fuse2fs")
	out := e.must(t, nil, "imgfuse", "demo").stdout
	dirs, _ := filepath.Glob(e.path("run/imgfuse-demo-*"))
	if len(dirs) != 1 {
		t.Fatalf("the demo made %v, want one directory in $XDG_RUNTIME_DIR\n%s", dirs, out)
	}
	for _, mp := range []string{"mnt", "fs"} {
		registerMountpoint(t, filepath.Join(dirs[0], mp))
	}
	// Started without --log, the server logs to its default log in the
	// user's state directory, which status names.
	rel, err := filepath.Rel(e.path(""), filepath.Join(dirs[0], "mnt"))
	if err != nil {
		t.Fatal(err)
	}
	if st := e.status(t, rel); !strings.HasPrefix(st.Log, e.path("run/imgfuse")+"/") {
		t.Errorf("status of the demo mount names the log %q, want one in %s", st.Log, e.path("run/imgfuse"))
	} else if b, err := os.ReadFile(st.Log); err != nil || !strings.Contains(string(b), "serving ") {
		t.Errorf("the demo's default log %s: %v\n%s", st.Log, err, b)
	}
	t.Cleanup(func() {
		if mnt := filepath.Join(dirs[0], "mnt"); mounted(t, mnt) {
			e.run(t, nil, "fusermount3", "-u", filepath.Join(dirs[0], "fs"))
			e.run(t, nil, "imgfuse", "unmount", mnt)
		}
	})
	var cmds []string
	for _, line := range strings.Split(out, "\n") {
		if strings.HasPrefix(line, "  ") {
			cmds = append(cmds, strings.TrimSpace(line))
		}
	}
	if len(cmds) != 4 || !strings.HasPrefix(cmds[0], "fuse2fs -o ro ") || !strings.HasPrefix(cmds[3], "fusermount3 -u ") {
		t.Fatalf("the demo printed for a user:\n%s\nwant fuse2fs, cat, info and fusermount3 -u && unmount", out)
	}
	for _, c := range cmds {
		r := e.must(t, nil, "sh", "-c", c)
		if strings.HasPrefix(c, "cat ") && !strings.Contains(r.stdout, "Hello from inside a qcow2 image!") {
			t.Errorf("%s printed %q", c, r.stdout)
		}
	}
	if _, err := os.Stat(dirs[0]); !errors.Is(err, os.ErrNotExist) {
		ents, _ := os.ReadDir(dirs[0])
		t.Errorf("after the printed unmount the demo left %s (%v, %v)", dirs[0], ents, err)
	}
}
