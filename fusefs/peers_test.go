package fusefs

import (
	"bytes"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"imgfuse/coroutine"
	"imgfuse/drivers"
	"imgfuse/drivers/driverstest"
	"imgfuse/drivers/raw"
	"imgfuse/internal/testenv"
)

// Regression tests for the ways peers of imgfuse corrupt or lose data
// (see docs/peers.md): parallel writes sharing a request buffer, discards
// that leave the data, and the tools people point at the exposed file. They
// run on a raw image opened the way `imgfuse mount` opens it (O_DIRECT,
// image locks), so a failure is about this package and the raw driver.

// rawMount is a raw image served through a real FUSE mount.
type rawMount struct {
	image, disk string
	d           *raw.Driver
	s           *Server
	mounted     bool
}

// mountRawT writes a raw image of data, opens it with opts and mounts it
// with mopts; the mount goes away when the test ends unless unmount was
// called first.
func mountRawT(t *testing.T, data []byte, opts drivers.OpenOptions, mopts Options) *rawMount {
	t.Helper()
	requireFUSE(t)
	dir := t.TempDir()
	m := &rawMount{image: filepath.Join(dir, "image.raw")}
	if err := os.WriteFile(m.image, data, 0o600); err != nil {
		t.Fatal(err)
	}
	d, err := raw.Open(m.image, opts)
	if err != nil {
		t.Fatal(err)
	}
	m.d = d
	mp := filepath.Join(dir, "mnt")
	if err := os.Mkdir(mp, 0o755); err != nil {
		t.Fatal(err)
	}
	mopts.Growable = mopts.Growable || opts.Growable
	m.s, err = Mount(mp, d, mopts)
	if err != nil {
		d.Close()
		t.Fatal(err)
	}
	m.mounted = true
	m.disk = filepath.Join(mp, "disk")
	t.Cleanup(func() {
		if m.mounted {
			m.unmount(t)
		}
	})
	return m
}

// unmount unmounts, then flushes and closes the driver, as the daemon does.
func (m *rawMount) unmount(t *testing.T) {
	t.Helper()
	m.mounted = false
	if err := m.s.Unmount(); err != nil {
		// A loop device may still be detaching: give it a moment.
		time.Sleep(500 * time.Millisecond)
		if err := m.s.Unmount(); err != nil {
			t.Errorf("unmount: %v", err)
			return
		}
	}
	waitT(t, m.s)
	var err error
	coroutine.Run(func(co *coroutine.Co) { err = m.d.Flush(co) })
	if err != nil {
		t.Errorf("flush: %v", err)
	}
	if err := m.d.Close(); err != nil {
		t.Errorf("close: %v", err)
	}
}

// randomData returns n seeded random bytes with zero runs in between (so
// that qemu-img and mkfs send write-zeroes and discards too).
func randomData(t *testing.T, n int) []byte {
	seed := uint64(time.Now().UnixNano())
	t.Logf("seed %d", seed)
	rng := rand.New(rand.NewPCG(seed, 7))
	b := make([]byte, n)
	for off := 0; off < n; {
		run := min(n-off, 4096*(1+rng.IntN(64))+rng.IntN(4096))
		if rng.IntN(3) != 0 {
			for i := off; i < off+run; i += 8 {
				v := rng.Uint64()
				for j := i; j < min(i+8, off+run); j++ {
					b[j] = byte(v)
					v >>= 8
				}
			}
		}
		off += run
	}
	return b
}

func fileEquals(t *testing.T, path string, want []byte) {
	t.Helper()
	got, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		i := 0
		for i < min(len(got), len(want)) && got[i] == want[i] {
			i++
		}
		t.Errorf("%s differs from the model: %d bytes vs %d, first difference at %d", path, len(got), len(want), i)
	}
}

// TestPeerQemuImgConvert: QEMU 7.2's FUSE export corrupted `qemu-img
// convert -n -t none` into the exported file in 4 of 4 runs (parallel
// O_DIRECT writes sharing a request buffer). The target starts as garbage,
// so the zero runs of the source must be written (as write-zeroes) too.
func TestPeerQemuImgConvert(t *testing.T) {
	driverstest.RequireTools(t, "qemu-img")
	const size = 48 << 20
	src := randomData(t, size)
	srcPath := filepath.Join(t.TempDir(), "src.raw")
	if err := os.WriteFile(srcPath, src, 0o600); err != nil {
		t.Fatal(err)
	}
	m := mountRawT(t, pattern(size, 30), drivers.OpenOptions{}, Options{})
	driverstest.Cmd(t, "qemu-img", "convert", "-n", "-t", "none", "-f", "raw", "-O", "raw", srcPath, m.disk)
	driverstest.Cmd(t, "qemu-img", "compare", "-f", "raw", "-F", "raw", srcPath, m.disk)
	m.unmount(t)
	fileEquals(t, m.image, src)
}

// TestPeerFioVerify: fio's O_DIRECT random writes at queue depth 16 with
// crc32c verification (QEMU 7.2's export failed it intermittently).
func TestPeerFioVerify(t *testing.T) {
	driverstest.RequireTools(t, "fio")
	m := mountRawT(t, make([]byte, 32<<20), drivers.OpenOptions{}, Options{})
	c := exec.Command("fio", "--name=v", "--filename="+m.disk, "--direct=1", "--ioengine=libaio",
		"--iodepth=16", "--rw=randwrite", "--bs=4k", "--size=32M", "--verify=crc32c",
		"--do_verify=1", "--verify_fatal=1", "--verify_state_save=0", "--output-format=normal")
	// fio may leave state files in its working directory.
	c.Dir = t.TempDir()
	out, err := c.CombinedOutput()
	if err != nil || !bytes.Contains(out, []byte("err= 0")) || bytes.Contains(out, []byte("verify:")) {
		t.Fatalf("fio: %v\n%s", err, out)
	}
	// What fio wrote reaches the image: its verify headers are there.
	m.unmount(t)
	b, err := os.ReadFile(m.image)
	if err != nil {
		t.Fatal(err)
	}
	if zeroBlocks := bytes.Count(b, make([]byte, 4096)); zeroBlocks > len(b)/4096/2 {
		t.Errorf("%d of %d blocks of the image are zeros after fio wrote all of them", zeroBlocks, len(b)/4096)
	}
}

// requireRoot skips (or fails under IMGFUSE_REQUIRE_E2E/CI) without root,
// which loop devices and mount(8) need.
func requireRoot(t *testing.T) {
	t.Helper()
	driverstest.SkipUnless(t, os.Geteuid() == 0, "root (for loop devices and mount)")
}

// waitLoopDetached waits until no loop device uses file (losetup -d is
// asynchronous while the device is busy).
func waitLoopDetached(t *testing.T, file string) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		out, err := exec.Command("losetup", "-j", file).Output()
		if err == nil && len(bytes.TrimSpace(out)) == 0 {
			return
		}
		time.Sleep(50 * time.Millisecond)
	}
	t.Errorf("a loop device still uses %s after 10 s", file)
}

// TestPeerLoopDirectIO: a loop device with --direct-io=on over the exposed
// file (the third QEMU 7.2 reproducer), holding an ext4 made, written and
// unmounted through it; e2fsck then finds it clean, through the mount and
// in the image file, and the files read back after a fresh attach.
func TestPeerLoopDirectIO(t *testing.T) {
	driverstest.RequireTools(t, "losetup", "mkfs.ext4", "e2fsck", "mount", "umount")
	requireRoot(t)
	m := mountRawT(t, pattern(64<<20, 31), drivers.OpenOptions{}, Options{})

	attach := func() string {
		t.Helper()
		dev := strings.TrimSpace(string(driverstest.Cmd(t, "losetup", "--direct-io=on", "-f", "--show", m.disk)))
		if !strings.HasPrefix(dev, "/dev/loop") {
			t.Fatalf("losetup printed %q", dev)
		}
		// The loop driver falls back to buffered I/O, silently, when the
		// backing file refuses O_DIRECT or reports an alignment it cannot
		// honour: then this test would not test what it says.
		if dio, err := os.ReadFile("/sys/block/" + filepath.Base(dev) + "/loop/dio"); err != nil || strings.TrimSpace(string(dio)) != "1" {
			exec.Command("losetup", "-d", dev).Run()
			t.Fatalf("%s: direct I/O not in effect over the exposed file (dio=%q, %v)", dev, dio, err)
		}
		return dev
	}
	detach := func(dev string) {
		t.Helper()
		driverstest.Cmd(t, "losetup", "-d", dev)
		waitLoopDetached(t, m.disk)
	}
	fsDir := filepath.Join(t.TempDir(), "fs")
	if err := os.Mkdir(fsDir, 0o755); err != nil {
		t.Fatal(err)
	}
	files := map[string][]byte{}
	for i := range 20 {
		files[fmt.Sprintf("f%02d", i)] = pattern(1000+i*37000, uint64(100+i))
	}

	dev := attach()
	driverstest.Cmd(t, "mkfs.ext4", "-q", "-F", dev)
	driverstest.Cmd(t, "mount", dev, fsDir)
	for name, b := range files {
		if err := os.WriteFile(filepath.Join(fsDir, name), b, 0o644); err != nil {
			exec.Command("umount", fsDir).Run()
			detach(dev)
			t.Fatal(err)
		}
	}
	driverstest.Cmd(t, "sync", "-f", fsDir)
	driverstest.Cmd(t, "umount", fsDir)
	detach(dev)
	driverstest.Cmd(t, "e2fsck", "-fn", m.disk)

	// A fresh attach (no cache left anywhere) reads the files back.
	dev = attach()
	driverstest.Cmd(t, "mount", "-o", "ro", dev, fsDir)
	for name, b := range files {
		got, err := os.ReadFile(filepath.Join(fsDir, name))
		if err != nil || !bytes.Equal(got, b) {
			t.Errorf("%s after re-attach: %d bytes, %v (equal %v)", name, len(got), err, bytes.Equal(got, b))
		}
	}
	driverstest.Cmd(t, "umount", fsDir)
	detach(dev)

	m.unmount(t)
	driverstest.Cmd(t, "e2fsck", "-fn", m.image)
}

// TestPeerPunchHole: fallocate(1) --punch-hole on the exposed file must
// zero the range (QEMU 7.2 and qemu-nbd returned 0 and left the data), in
// the image file too, and free its blocks.
func TestPeerPunchHole(t *testing.T) {
	driverstest.RequireTools(t, "fallocate")
	const size = 8 << 20
	model := pattern(size, 32)
	m := mountRawT(t, bytes.Clone(model), drivers.OpenOptions{}, Options{})
	var before unix.Stat_t
	if err := unix.Stat(m.image, &before); err != nil {
		t.Fatal(err)
	}
	for _, r := range [][2]int64{{1 << 20, 3 << 20}, {5<<20 + 1000, 70000}, {size - 4097, 4097}} {
		driverstest.Cmd(t, "fallocate", "--punch-hole", "--offset", fmt.Sprint(r[0]), "--length", fmt.Sprint(r[1]), m.disk)
		clear(model[r[0] : r[0]+r[1]])
	}
	fileEquals(t, m.disk, model)
	m.unmount(t)
	fileEquals(t, m.image, model)
	var after unix.Stat_t
	if err := unix.Stat(m.image, &after); err != nil {
		t.Fatal(err)
	}
	if freed := (before.Blocks - after.Blocks) * 512; freed < 3<<20 {
		// Whether the image's filesystem frees punched blocks at all is
		// asked of it directly: only then is this a failure.
		if err := punchFrees(filepath.Dir(m.image)); err != nil {
			testenv.Skip(t, "%v", err)
		}
		t.Errorf("punching 3 MiB and more freed only %d bytes of the image file", freed)
	}
}

// punchFrees reports why punching a hole in a file in dir does not free
// its blocks, or nil if it does.
func punchFrees(dir string) error {
	f, err := os.CreateTemp(dir, "punch")
	if err != nil {
		return err
	}
	defer os.Remove(f.Name())
	defer f.Close()
	if _, err := f.Write(pattern(4<<20, 1)); err != nil {
		return err
	}
	if err := f.Sync(); err != nil {
		return err
	}
	if err := unix.Fallocate(int(f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, 0, 2<<20); err != nil {
		return fmt.Errorf("the filesystem under %s cannot punch holes: %w", dir, err)
	}
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil {
		return err
	}
	if st.Blocks*512 > 2<<20+64<<10 {
		return fmt.Errorf("the filesystem under %s punches holes without freeing blocks (%d bytes left of 4 MiB after punching 2)", dir, st.Blocks*512)
	}
	return nil
}

// TestRawGrow: `truncate -s +1M` on the exposed file grows a raw disk;
// stat shows it at once; the last byte is writable; after unmount the image
// file has the new size and the byte. On a Growable mount a write past the
// end grows the disk too.
func TestRawGrow(t *testing.T) {
	driverstest.RequireTools(t, "truncate", "stat", "dd")
	const size = 4<<20 + 512
	for _, growable := range []bool{false, true} {
		t.Run(fmt.Sprintf("growable=%v", growable), func(t *testing.T) {
			model := pattern(size, 33)
			m := mountRawT(t, bytes.Clone(model), drivers.OpenOptions{Growable: growable}, Options{})
			driverstest.Cmd(t, "truncate", "-s", "+1M", m.disk)
			model = append(model, make([]byte, 1<<20)...)
			statSize := func() int64 {
				t.Helper()
				out := strings.TrimSpace(string(driverstest.Cmd(t, "stat", "-c", "%s", m.disk)))
				var n int64
				if _, err := fmt.Sscan(out, &n); err != nil {
					t.Fatalf("stat printed %q", out)
				}
				return n
			}
			if got := statSize(); got != int64(len(model)) {
				t.Fatalf("stat after truncate -s +1M: %d, want %d", got, len(model))
			}
			// The last byte, with dd as a script would.
			end := int64(len(model))
			driverstest.Cmd(t, "dd", "if=/dev/zero", "of="+m.disk, "bs=1", "count=1", "conv=notrunc,nocreat",
				"oflag=seek_bytes", fmt.Sprintf("seek=%d", end-1), "status=none")
			f, err := os.OpenFile(m.disk, os.O_WRONLY, 0)
			if err != nil {
				t.Fatal(err)
			}
			if _, err := f.WriteAt([]byte{0x5a}, end-1); err != nil {
				t.Fatalf("write of the last byte: %v", err)
			}
			model[end-1] = 0x5a
			_, err = f.WriteAt([]byte("grown"), end+100)
			if growable {
				if err != nil {
					t.Fatalf("write past the end of a growable disk: %v", err)
				}
				model = append(model, make([]byte, 100)...)
				model = append(model, "grown"...)
			} else if err == nil {
				t.Fatal("write past the end of a non-growable disk succeeded")
			}
			if err := f.Close(); err != nil {
				t.Fatalf("close: %v", err)
			}
			if got := statSize(); got != int64(len(model)) {
				t.Errorf("stat after the writes: %d, want %d", got, len(model))
			}
			// Shrinking (a shell's '>' opens with O_TRUNC) is refused
			// with EOPNOTSUPP, as the README says, and destroys nothing.
			if err := os.Truncate(m.disk, 0); !errors.Is(err, syscall.EOPNOTSUPP) {
				t.Errorf("truncate to 0: %v, want EOPNOTSUPP", err)
			}
			if f, err := os.OpenFile(m.disk, os.O_WRONLY|os.O_TRUNC, 0); !errors.Is(err, syscall.EOPNOTSUPP) {
				if err == nil {
					f.Close()
				}
				t.Errorf("open with O_TRUNC: %v, want EOPNOTSUPP", err)
			}
			fileEquals(t, m.disk, model)
			m.unmount(t)
			fileEquals(t, m.image, model)
		})
	}
}
