package tests

import (
	"bytes"
	"encoding/json"
	"errors"
	"math/rand"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"imgfuse/drivers/driverstest"
)

// smallQcow2 builds an 8 MiB qcow2 image with scattered writes and returns
// it with its reference raw file.
func smallQcow2(t *testing.T) (img, ref string) {
	dir := t.TempDir()
	img = filepath.Join(dir, "img.qcow2")
	driverstest.Cmd(t, "qemu-img", "create", "-q", "-f", "qcow2", img, "8M")
	driverstest.QemuIO(t, img, driverstest.Scatter(8<<20, 65536, 1)...)
	return img, driverstest.ConvertRef(t, img, "", dir)
}

// randomRawImage writes an 8 MiB raw image of random bytes.
func randomRawImage(t *testing.T, seed int64) (string, []byte) {
	b := make([]byte, 8<<20)
	rand.New(rand.NewSource(seed)).Read(b)
	p := filepath.Join(t.TempDir(), "img.raw")
	if err := os.WriteFile(p, b, 0o644); err != nil {
		t.Fatal(err)
	}
	return p, b
}

func TestFileMountpoint(t *testing.T) {
	requireE2E(t)
	t.Parallel()
	img, ref := smallQcow2(t)
	mp, disk := mount(t, img, true)
	if disk != mp {
		t.Fatalf("disk %s, want the mountpoint itself", disk)
	}
	st, err := os.Stat(mp)
	if err != nil {
		t.Fatal(err)
	}
	if !st.Mode().IsRegular() {
		t.Fatalf("file mountpoint has mode %v, want a regular file", st.Mode())
	}
	compareFiles(t, mp, ref)
	unmount(t, mp)
	if st, err := os.Stat(mp); err != nil || st.Size() != 0 {
		t.Fatalf("after unmount the mountpoint file is %v, %v; want the empty file again", st, err)
	}
}

func TestName(t *testing.T) {
	requireE2E(t)
	t.Parallel()
	img, ref := smallQcow2(t)
	mp, disk := mount(t, img, false, "--name", "vm.img")
	compareFiles(t, disk, ref)
	ents, err := os.ReadDir(mp)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range ents {
		names = append(names, e.Name())
	}
	if len(names) == 0 || names[0] != "vm.img" {
		t.Errorf("mountpoint lists %v, want vm.img first", names)
	}
	for _, n := range names {
		if n == "disk" {
			t.Errorf("mountpoint lists %v: --name did not replace disk", names)
		}
	}
}

// TestReadOnlySemantics: a qcow2 mount and a --read-only raw mount refuse
// O_RDWR with EROFS (even for root), have mode 0444, and report the image's
// own mtime, stable across stats.
func TestReadOnlySemantics(t *testing.T) {
	requireE2E(t)
	t.Parallel()
	qimg, _ := smallQcow2(t)
	rimg, _ := randomRawImage(t, 1)
	old := time.Date(2020, 1, 2, 3, 4, 5, 0, time.UTC)
	for _, p := range []string{qimg, rimg} {
		if err := os.Chtimes(p, old, old); err != nil {
			t.Fatal(err)
		}
	}
	cases := []struct {
		name  string
		img   string
		flags []string
	}{
		{"qcow2", qimg, []string{"--read-only"}},
		{"qcow2-explicit", qimg, []string{"--read-only", "--format", "qcow2"}},
		{"qcow2-force-share", qimg, []string{"--force-share"}},
		{"raw-read-only", rimg, []string{"--read-only"}},
		{"raw-read-only-format", rimg, []string{"--read-only", "--format", "raw"}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			_, disk := mount(t, c.img, false, c.flags...)
			for _, flag := range []int{os.O_RDWR, os.O_WRONLY} {
				f, err := os.OpenFile(disk, flag, 0)
				if err == nil {
					f.Close()
					t.Errorf("open(%#x) of a read-only disk succeeded", flag)
				} else if !errors.Is(err, syscall.EROFS) {
					t.Errorf("open(%#x) of a read-only disk: %v, want EROFS", flag, err)
				}
			}
			st1, err := os.Stat(disk)
			if err != nil {
				t.Fatal(err)
			}
			if perm := st1.Mode().Perm(); perm != 0o444 {
				t.Errorf("mode %v, want 0444", perm)
			}
			time.Sleep(1100 * time.Millisecond)
			st2, err := os.Stat(disk)
			if err != nil {
				t.Fatal(err)
			}
			if !st1.ModTime().Equal(st2.ModTime()) {
				t.Errorf("mtime changed between two stats: %v, then %v", st1.ModTime(), st2.ModTime())
			}
			if !st1.ModTime().Equal(old) {
				t.Errorf("mtime %v, want the image's %v", st1.ModTime(), old)
			}
		})
	}
}

// procMountOptions returns the options /proc/mounts lists for mountpoint
// mp (the last mount on it), as `findmnt` and scripts read them.
func procMountOptions(t *testing.T, mp string) []string {
	t.Helper()
	b, err := os.ReadFile("/proc/self/mounts")
	if err != nil {
		t.Fatal(err)
	}
	var opts []string
	found := false
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		// Spaces and the like in a mountpoint are octal escapes; test
		// mountpoints have none.
		if len(f) >= 4 && f[1] == mp {
			opts, found = strings.Split(f[3], ","), true
		}
	}
	if !found {
		t.Fatalf("%s is not in /proc/self/mounts:\n%s", mp, b)
	}
	return opts
}

// TestReadOnlyMountOption: a read-only mount is read-only to the kernel,
// so /proc/mounts and findmnt say "ro" and the kernel refuses a mode
// change with EROFS (the daemon would accept and ignore it); a writable
// mount says "rw" and takes it.
func TestReadOnlyMountOption(t *testing.T) {
	requireE2E(t)
	t.Parallel()
	qimg, _ := smallQcow2(t)
	rimg, _ := randomRawImage(t, 3)
	cases := []struct {
		name   string
		img    string
		fileMP bool
		flags  []string
		ro     bool
	}{
		{"qcow2-read-only", qimg, false, []string{"--read-only"}, true},
		{"qcow2-force-share", qimg, false, []string{"--force-share"}, true},
		{"raw-read-only", rimg, false, []string{"--read-only"}, true},
		{"raw-read-only-file-mountpoint", rimg, true, []string{"--read-only"}, true},
		{"qcow2-writable", qimg, false, nil, false},
		{"raw-writable", rimg, false, nil, false},
	}
	findmnt, _ := exec.LookPath("findmnt")
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			// Not parallel: the writable cases share their image with
			// a read-only one, and the image lock would refuse them.
			mp, disk := mount(t, c.img, c.fileMP, c.flags...)
			want, other := "rw", "ro"
			if c.ro {
				want, other = "ro", "rw"
			}
			opts := procMountOptions(t, mp)
			if !slices.Contains(opts, want) || slices.Contains(opts, other) {
				t.Errorf("/proc/mounts options of %s: %v, want %q", mp, opts, want)
			}
			if findmnt != "" {
				out, err := exec.Command(findmnt, "-no", "OPTIONS", mp).Output()
				if err != nil {
					t.Fatalf("findmnt -no OPTIONS %s: %v", mp, err)
				}
				if got := strings.Split(strings.TrimSpace(string(out)), ","); !slices.Contains(got, want) {
					t.Errorf("findmnt -no OPTIONS %s = %q, want %q among them", mp, out, want)
				}
			}
			err := os.Chmod(disk, 0o600)
			switch {
			case c.ro && !errors.Is(err, syscall.EROFS):
				t.Errorf("chmod of the disk on a read-only mount: %v, want EROFS", err)
			case !c.ro && err != nil:
				t.Errorf("chmod of the disk on a writable mount: %v", err)
			}
		})
	}
}

// TestRawWritable writes through a raw mount, unmounts, and finds the bytes
// in the image; unmount has waited for the daemon, so qemu-img can take its
// locks at once. Without fsync, unmount itself must flush (through the page
// cache with --no-direct-io).
func TestRawWritable(t *testing.T) {
	t.Parallel()
	requireE2E(t)
	cases := []struct {
		name   string
		fileMP bool
		flags  []string
		fsync  bool
	}{
		{name: "fsync", fsync: true},
		{name: "no-fsync"},
		{name: "no-direct-io", flags: []string{"--no-direct-io"}},
		{name: "no-direct-io-fsync", flags: []string{"--no-direct-io"}, fsync: true},
		{name: "file-mountpoint", fileMP: true},
		{name: "format-raw", flags: []string{"--format", "raw"}, fsync: true},
	}
	for i, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			img, model := randomRawImage(t, int64(20+i))
			mp, disk := mount(t, img, c.fileMP, c.flags...)
			st, err := os.Stat(disk)
			if err != nil {
				t.Fatal(err)
			}
			if st.Mode().Perm()&0o200 == 0 {
				t.Errorf("writable raw disk has mode %v", st.Mode().Perm())
			}
			f, err := os.OpenFile(disk, os.O_RDWR, 0)
			if err != nil {
				t.Fatal(err)
			}
			rng := rand.New(rand.NewSource(int64(i)))
			for i := 0; i < 40; i++ {
				n := 1 + rng.Intn(200<<10)
				off := rng.Int63n(int64(len(model) - n + 1))
				if i == 0 {
					off = int64(len(model) - n) // one write ends at the end
				}
				p := make([]byte, n)
				rng.Read(p)
				if _, err := f.WriteAt(p, off); err != nil {
					t.Fatalf("write %d at %d: %v", n, off, err)
				}
				copy(model[off:], p)
			}
			if c.fsync {
				if err := f.Sync(); err != nil {
					t.Fatalf("fsync: %v", err)
				}
			}
			// Read back through the mount before unmounting.
			got := make([]byte, len(model))
			if _, err := f.ReadAt(got, 0); err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, model) {
				t.Fatal("reading back through the mount differs from what was written")
			}
			// Writing past the end of the disk fails; the size stays.
			if _, err := f.WriteAt([]byte{1}, int64(len(model))); err == nil {
				t.Errorf("a write past the end of the disk succeeded")
			}
			f.Close()
			if st, err := os.Stat(disk); err != nil || st.Size() != int64(len(model)) {
				t.Errorf("disk size after writes: %v, %v; want %d", st.Size(), err, len(model))
			}

			pid := daemonPID(t, mp)
			unmount(t, mp)
			if alive(pid) {
				t.Errorf("imgfuse unmount returned while the daemon (pid %d) is still running", pid)
			}
			// Without -U: fails if the daemon still holds its image locks.
			driverstest.Cmd(t, "qemu-img", "info", "-f", "raw", img)
			onDisk, err := os.ReadFile(img)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(onDisk, model) {
				t.Fatal("the image file does not hold what was written through the mount")
			}
		})
	}
}

// TestUnmountWaitsQcow2: after unmount of a qcow2 mount returns, the daemon
// is gone and qemu-img opens the image without -U.
func TestUnmountWaitsQcow2(t *testing.T) {
	requireE2E(t)
	t.Parallel()
	img, ref := smallQcow2(t)
	mp, disk := mount(t, img, false)
	compareFiles(t, disk, ref)
	pid := daemonPID(t, mp)
	unmount(t, mp)
	if alive(pid) {
		t.Errorf("imgfuse unmount returned while the daemon (pid %d) is still running", pid)
	}
	driverstest.Cmd(t, "qemu-img", "check", "-q", img)
	driverstest.Cmd(t, "qemu-io", "-f", "qcow2", "-c", "write -P 0x42 0 4096", img)
}

// TestSIGTERM: SIGTERM to the daemon unmounts cleanly.
func TestSIGTERM(t *testing.T) {
	requireE2E(t)
	t.Parallel()
	img, model := randomRawImage(t, 4)
	mp, disk := mount(t, img, false)
	f, err := os.OpenFile(disk, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	p := bytes.Repeat([]byte{0xab}, 12345)
	if _, err := f.WriteAt(p, 1000); err != nil {
		t.Fatal(err)
	}
	copy(model[1000:], p)
	f.Close()
	pid := daemonPID(t, mp)
	if err := syscall.Kill(pid, syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	if !waitFor(10*time.Second, func() bool { return !alive(pid) }) {
		t.Fatalf("daemon still running 10s after SIGTERM")
	}
	if mounted(t, mp) {
		t.Fatalf("%s still mounted after the daemon exited on SIGTERM", mp)
	}
	driverstest.Cmd(t, "qemu-img", "info", "-f", "raw", img)
	if b, _ := os.ReadFile(img); !bytes.Equal(b, model) {
		t.Fatal("the image does not hold the write made before SIGTERM")
	}
}

// TestKill9: after kill -9 of the daemon the mount is dead; imgfuse unmount
// clears it.
func TestKill9(t *testing.T) {
	requireE2E(t)
	t.Parallel()
	img, _ := smallQcow2(t)
	mp, disk := mount(t, img, false)
	pid := daemonPID(t, mp)
	if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	if !waitFor(10*time.Second, func() bool { return !alive(pid) }) {
		t.Fatalf("daemon still running 10s after SIGKILL")
	}
	// The mount is dead: reads reach no server. A read that races the
	// kernel's teardown of the connection (the process can look gone a
	// moment before its /dev/fuse descriptor is released) fails with EIO.
	switch errno, _ := readErrno(t, disk, 0, 4096); errno {
	case syscall.ENOTCONN, syscall.ECONNABORTED, syscall.EIO:
	default:
		t.Errorf("read after kill -9 of the daemon: errno %v, want ENOTCONN, ECONNABORTED or EIO", errno)
	}
	if !mounted(t, mp) {
		t.Fatalf("the dead mount disappeared by itself; nothing left to test")
	}
	unmount(t, mp)
	if _, err := os.Stat(mp); err != nil {
		t.Fatalf("mountpoint unusable after clearing the dead mount: %v", err)
	}
}

// TestInfo checks `imgfuse info --json` against qemu-img info.
func TestInfo(t *testing.T) {
	requireE2E(t)
	t.Parallel()
	img, _ := smallQcow2(t)
	driverstest.Cmd(t, "qemu-img", "snapshot", "-c", "s1", img)
	r := imgfuse(t, nil, "info", "--json", img)
	if r.code != 0 {
		t.Fatalf("imgfuse info --json: %v", r)
	}
	var got struct {
		Format      string `json:"format"`
		VirtualSize int64  `json:"virtual-size"`
		Snapshots   []struct {
			Name string `json:"name"`
		} `json:"snapshots"`
	}
	if err := json.Unmarshal([]byte(r.stdout), &got); err != nil {
		t.Fatalf("imgfuse info --json is not JSON: %v\n%s", err, r.stdout)
	}
	if got.Format != "qcow2" || got.VirtualSize != 8<<20 || len(got.Snapshots) != 1 || got.Snapshots[0].Name != "s1" {
		t.Errorf("imgfuse info --json = %+v, want qcow2, 8 MiB, snapshot s1", got)
	}
	if r := imgfuse(t, nil, "info", img); r.code != 0 || !strings.Contains(r.stdout, "qcow2") {
		t.Errorf("imgfuse info: %v", r)
	}
}

// TestNoDirectIO mounts with --no-direct-io and --allow-other and reads
// through the page cache.
func TestNoDirectIO(t *testing.T) {
	requireE2E(t)
	t.Parallel()
	img, ref := smallQcow2(t)
	_, disk := mount(t, img, false, "--no-direct-io", "--allow-other")
	compareFiles(t, disk, ref)
	// A second pass is served from the page cache.
	compareFiles(t, disk, ref)
	if out, err := exec.Command("cmp", disk, ref).CombinedOutput(); err != nil {
		t.Errorf("cmp: %v %s", err, out)
	}
}
