package tests

import (
	"crypto/sha256"
	"fmt"
	"io"
	"io/fs"
	"math/rand"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/moby/sys/mountinfo"

	"imgfuse/drivers/driverstest"
)

// buildTree writes a source tree: a few hundred small files in nested
// directories, a few large random ones, symlinks and an empty directory.
func buildTree(t *testing.T, root string) {
	rng := rand.New(rand.NewSource(42))
	for i := 0; i < 300; i++ {
		dir := filepath.Join(root, fmt.Sprintf("d%d", i%7), fmt.Sprintf("e%d", i%5))
		if i%3 == 0 {
			dir = filepath.Join(dir, "deep", fmt.Sprintf("f%d", i%4))
		}
		if err := os.MkdirAll(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		b := make([]byte, rng.Intn(9000))
		rng.Read(b)
		if err := os.WriteFile(filepath.Join(dir, fmt.Sprintf("file%03d", i)), b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	for i, n := range []int{1 << 20, 3<<20 + 17, 5<<20 + 4095} {
		b := make([]byte, n)
		rng.Read(b)
		if err := os.WriteFile(filepath.Join(root, fmt.Sprintf("big%d.bin", i)), b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	for _, l := range [][2]string{
		{"big0.bin", "link-rel"},
		{"d1/e1/file001", "d0/link-up"},
		{"/etc/hostname", "link-abs"},
		{"does/not/exist", "link-dangling"},
	} {
		if err := os.Symlink(l[0], filepath.Join(root, l[1])); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Mkdir(filepath.Join(root, "empty"), 0o755); err != nil {
		t.Fatal(err)
	}
}

// treeSummary describes every entry of a tree: type, size, content hash,
// symlink target.
func treeSummary(t *testing.T, root string) map[string]string {
	m := map[string]string{}
	err := filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(root, p)
		if rel == "lost+found" {
			return filepath.SkipDir
		}
		switch {
		case d.Type()&fs.ModeSymlink != 0:
			target, err := os.Readlink(p)
			if err != nil {
				return err
			}
			m[rel] = "symlink " + target
		case d.IsDir():
			m[rel] = "dir"
		default:
			f, err := os.Open(p)
			if err != nil {
				return err
			}
			defer f.Close()
			h := sha256.New()
			n, err := io.Copy(h, f)
			if err != nil {
				return fmt.Errorf("%s: %w", rel, err)
			}
			m[rel] = fmt.Sprintf("file %d %x", n, h.Sum(nil))
		}
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return m
}

// TestExt4 loop-mounts an ext4 filesystem from a zstd-compressed qcow2
// image through the FUSE disk and compares every file with the source.
func TestExt4(t *testing.T) {
	requireE2E(t, "mkfs.ext4", "mount", "umount")
	_, err := os.Stat("/dev/loop-control")
	driverstest.SkipUnless(t, err == nil, "/dev/loop-control: %v", err)
	t.Parallel()
	dir := t.TempDir()
	src := filepath.Join(dir, "src")
	buildTree(t, src)
	fsRaw := filepath.Join(dir, "fs.raw")
	driverstest.Cmd(t, "mkfs.ext4", "-q", "-d", src, "-b", "4096", fsRaw, "64M")
	fsQcow2 := filepath.Join(dir, "fs.qcow2")
	driverstest.Cmd(t, "qemu-img", "convert", "-c", "-O", "qcow2", "-o", "compression_type=zstd", fsRaw, fsQcow2)
	want := treeSummary(t, src)

	_, disk := mount(t, fsQcow2, false, "--read-only")
	for _, opts := range []string{"loop,ro", "loop"} {
		t.Run(opts, func(t *testing.T) {
			loopMP := filepath.Join(t.TempDir(), "fs")
			if err := os.Mkdir(loopMP, 0o755); err != nil {
				t.Fatal(err)
			}
			out, err := exec.Command("mount", "-t", "ext4", "-o", opts, disk, loopMP).CombinedOutput()
			if err != nil {
				t.Fatalf("mount -o %s: %v\n%s", opts, err, out)
			}
			t.Cleanup(func() {
				if out, err := exec.Command("umount", loopMP).CombinedOutput(); err != nil {
					t.Errorf("umount %s: %v\n%s", loopMP, err, out)
					exec.Command("umount", "-l", loopMP).Run()
				}
				waitLoopDetached(t, disk)
			})
			// Without ro, mount must have fallen back to read-only
			// because the disk refuses O_RDWR.
			if !mountOptions(t, loopMP)["ro"] {
				t.Errorf("loop mount of a read-only disk is not read-only")
			}
			got := treeSummary(t, loopMP)
			for k, w := range want {
				if g, ok := got[k]; !ok {
					t.Errorf("%s missing from the mounted filesystem", k)
				} else if g != w {
					t.Errorf("%s: got %s, want %s", k, g, w)
				}
			}
			for k := range got {
				if _, ok := want[k]; !ok && k != "." {
					t.Errorf("unexpected entry %s", k)
				}
			}
		})
	}
}

// waitLoopDetached waits until no loop device uses file: the kernel may
// detach an autoclear loop device a moment after the umount returns, and
// until then the FUSE mount is busy.
func waitLoopDetached(t *testing.T, file string) {
	if !waitFor(10*time.Second, func() bool {
		out, err := exec.Command("losetup", "-j", file).Output()
		return err == nil && len(strings.TrimSpace(string(out))) == 0
	}) {
		t.Errorf("a loop device still uses %s 10s after umount", file)
	}
}

// mountOptions returns the per-mount options of mountpoint mp.
func mountOptions(t *testing.T, mp string) map[string]bool {
	m, err := mountinfo.GetMounts(mountinfo.SingleEntryFilter(mp))
	if err != nil {
		t.Fatal(err)
	}
	if len(m) == 0 {
		t.Fatalf("%s not mounted", mp)
	}
	opts := map[string]bool{}
	for _, o := range strings.Split(m[0].Options, ",") {
		opts[o] = true
	}
	return opts
}

// TestExt4Writable is the everyday use: loop-mount an ext4 filesystem from
// a raw image through the writable FUSE disk, write, delete and fstrim
// (PUNCH_HOLE through the loop device), unmount everything, and check the
// image with e2fsck and by mounting it directly.
func TestExt4Writable(t *testing.T) {
	requireE2E(t, "mkfs.ext4", "e2fsck", "fstrim", "mount", "umount")
	_, err := os.Stat("/dev/loop-control")
	driverstest.SkipUnless(t, err == nil, "/dev/loop-control: %v", err)
	t.Parallel()
	dir := t.TempDir()
	src := filepath.Join(dir, "src")
	if err := os.MkdirAll(filepath.Join(src, "keep"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(src, "keep", "a"), []byte("hello\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	img := filepath.Join(dir, "fs.raw")
	driverstest.Cmd(t, "mkfs.ext4", "-q", "-d", src, "-b", "4096", img, "64M")

	mp, disk := mount(t, img, false)
	loopMP := filepath.Join(dir, "fs")
	if err := os.Mkdir(loopMP, 0o755); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("mount", "-t", "ext4", "-o", "loop", disk, loopMP).CombinedOutput(); err != nil {
		t.Fatalf("mount -o loop: %v\n%s", err, out)
	}
	loopMounted := true
	t.Cleanup(func() {
		if loopMounted {
			exec.Command("umount", "-l", loopMP).Run()
		}
	})
	if mountOptions(t, loopMP)["ro"] {
		t.Fatal("the loop mount of a writable disk came up read-only")
	}
	// Fill, then delete half, so fstrim has freed blocks to discard.
	rng := rand.New(rand.NewSource(9))
	for i := 0; i < 20; i++ {
		b := make([]byte, 512<<10+rng.Intn(100000))
		rng.Read(b)
		p := filepath.Join(loopMP, "keep", fmt.Sprintf("w%02d", i))
		if i%2 == 1 {
			p = filepath.Join(loopMP, fmt.Sprintf("gone%02d", i))
		}
		if err := os.WriteFile(p, b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Symlink("keep/a", filepath.Join(loopMP, "link")); err != nil {
		t.Fatal(err)
	}
	driverstest.Cmd(t, "sync", "-f", loopMP)
	for i := 1; i < 20; i += 2 {
		if err := os.Remove(filepath.Join(loopMP, fmt.Sprintf("gone%02d", i))); err != nil {
			t.Fatal(err)
		}
	}
	out := driverstest.Cmd(t, "fstrim", "-v", loopMP)
	t.Logf("fstrim: %s", strings.TrimSpace(string(out)))
	want := treeSummary(t, loopMP)
	// While the loop mount holds the disk, unmount names it and the way out.
	if r := imgfuse(t, nil, "unmount", mp); r.code != 1 || !strings.Contains(r.stderr, " is attached to "+disk+" (mounted on "+loopMP+"): umount "+loopMP) {
		t.Errorf("unmount of the busy mount: want the loop device named\n%v", r)
	}
	if out, err := exec.Command("umount", loopMP).CombinedOutput(); err != nil {
		t.Fatalf("umount %s: %v\n%s", loopMP, err, out)
	}
	loopMounted = false
	waitLoopDetached(t, disk)
	unmount(t, mp)

	driverstest.Cmd(t, "e2fsck", "-fn", img)
	if out, err := exec.Command("mount", "-t", "ext4", "-o", "loop,ro", img, loopMP).CombinedOutput(); err != nil {
		t.Fatalf("mount the image directly: %v\n%s", err, out)
	}
	loopMounted = true
	got := treeSummary(t, loopMP)
	if out, err := exec.Command("umount", loopMP).CombinedOutput(); err != nil {
		t.Errorf("umount %s: %v\n%s", loopMP, err, out)
	} else {
		loopMounted = false
	}
	for k, w := range want {
		if got[k] != w {
			t.Errorf("%s: got %q, want %q", k, got[k], w)
		}
	}
	if len(got) != len(want) {
		t.Errorf("%d entries in the image, %d were written", len(got), len(want))
	}
}
