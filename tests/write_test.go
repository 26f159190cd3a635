package tests

import (
	"bytes"
	"fmt"
	"math/rand"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"testing"

	"golang.org/x/sys/unix"

	"imgfuse/drivers/driverstest"
)

// zeroRaw creates a raw image of size zero bytes (sparse).
func zeroRaw(t *testing.T, size int64) string {
	p := filepath.Join(t.TempDir(), "target.raw")
	f, err := os.Create(p)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	return p
}

// TestParallelWritesConvert reproduces the QEMU 7.2 FUSE export's shared
// request buffer bug: qemu-img convert with O_DIRECT and parallel requests
// into the exposed disk, then qemu-img compare with the source.
func TestParallelWritesConvert(t *testing.T) {
	requireE2E(t)
	t.Parallel()
	src := filepath.Join(t.TempDir(), "src.raw")
	driverstest.RandomRaw(t, src, 32<<20, 99)
	// Fill the holes too, so every request carries distinct data.
	b, err := os.ReadFile(src)
	if err != nil {
		t.Fatal(err)
	}
	rng := rand.New(rand.NewSource(100))
	for off := 0; off < len(b); off += 1 << 20 {
		rng.Read(b[off+300<<10 : off+600<<10])
	}
	if err := os.WriteFile(src, b, 0o644); err != nil {
		t.Fatal(err)
	}
	target := zeroRaw(t, 32<<20)
	mp, disk := mount(t, target, false)
	driverstest.Cmd(t, "qemu-img", "convert", "-n", "-t", "none", "-m", "16", "-W", "-f", "raw", "-O", "raw", src, disk)
	driverstest.Cmd(t, "qemu-img", "compare", "-f", "raw", "-F", "raw", src, disk)
	unmount(t, mp)
	compareFiles(t, target, src)
}

// TestFioVerify runs fio random writes with O_DIRECT, libaio and queue
// depth 16 on the exposed raw disk, verifying every block.
func TestFioVerify(t *testing.T) {
	requireE2E(t, "fio")
	t.Parallel()
	target := zeroRaw(t, 32<<20)
	_, disk := mount(t, target, false)
	cmd := exec.Command("fio", "--name=verify", "--filename="+disk, "--size=16M",
		"--direct=1", "--ioengine=libaio", "--iodepth=16", "--rw=randwrite",
		"--bs=4k", "--verify=crc32c", "--do_verify=1", "--verify_fatal=1")
	cmd.Dir = t.TempDir() // fio leaves a verify state file in its working directory
	out, err := cmd.CombinedOutput()
	if err != nil || bytes.Contains(out, []byte("verify:")) && bytes.Contains(out, []byte("bad")) {
		t.Fatalf("fio: %v\n%s", err, out)
	}
}

// TestPunchHole: fallocate(PUNCH_HOLE) on a writable raw disk really zeros
// the range (a loop device turns fstrim and discard into it).
func TestPunchHole(t *testing.T) {
	requireE2E(t)
	t.Parallel()
	img, model := randomRawImage(t, 7)
	mp, disk := mount(t, img, false)
	f, err := os.OpenFile(disk, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	holes := [][2]int64{{0, 4096}, {1 << 20, 1 << 20}, {3<<20 + 512, 70000}, {int64(len(model)) - 8192, 8192}}
	for _, h := range holes {
		if err := unix.Fallocate(int(f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, h[0], h[1]); err != nil {
			t.Fatalf("fallocate(PUNCH_HOLE, %d, %d): %v", h[0], h[1], err)
		}
		clear(model[h[0] : h[0]+h[1]])
	}
	// Zero-range too: only a kernel that does not forward it may refuse.
	err = unix.Fallocate(int(f.Fd()), unix.FALLOC_FL_ZERO_RANGE, 5<<20+100, 5000)
	if err == unix.EOPNOTSUPP {
		zeroRangeRefused(t, err)
	}
	if err != nil {
		t.Fatalf("fallocate(ZERO_RANGE): %v", err)
	}
	clear(model[5<<20+100 : 5<<20+5100])
	got := make([]byte, len(model))
	if _, err := f.ReadAt(got, 0); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, model) {
		t.Fatal("after fallocate the disk does not read as the model")
	}
	st, _ := f.Stat()
	if st.Size() != int64(len(model)) {
		t.Errorf("size changed to %d", st.Size())
	}
	f.Close()
	unmount(t, mp)
	if b, _ := os.ReadFile(img); !bytes.Equal(b, model) {
		t.Fatal("after unmount the image does not hold the punched holes")
	}
}

// TestConcurrentReads reads random ranges of mounted images from 16
// goroutines at once and compares them with the reference.
func TestConcurrentReads(t *testing.T) {
	t.Parallel()
	requireE2E(t)
	for _, img := range driverstest.Catalogue(e2eSize) {
		switch img.Name {
		case "zstd", "chain-raw-qcow2-qcow2", "extended-l2", "cluster512":
		default:
			continue
		}
		t.Run(img.Name, func(t *testing.T) {
			t.Parallel()
			dir := t.TempDir()
			path := img.Build(t, dir, e2eSize)
			ref, err := os.ReadFile(driverstest.ConvertRef(t, path, "", dir))
			if err != nil {
				t.Fatal(err)
			}
			_, disk := mount(t, path, false)
			seed := driverstest.Seed(t)
			var wg sync.WaitGroup
			errs := make(chan string, 16)
			for w := 0; w < 16; w++ {
				wg.Add(1)
				go func(w int) {
					defer wg.Done()
					f, err := os.Open(disk)
					if err != nil {
						errs <- err.Error()
						return
					}
					defer f.Close()
					rng := rand.New(rand.NewSource(seed + int64(w)))
					for i := 0; i < 30; i++ {
						n := 1 + rng.Int63n(300<<10)
						off := rng.Int63n(int64(len(ref)) - n + 1)
						buf := make([]byte, n)
						if _, err := f.ReadAt(buf, off); err != nil {
							errs <- fmt.Sprintf("pread(%d, %d): %v", off, n, err)
							return
						}
						if !bytes.Equal(buf, ref[off:off+n]) {
							errs <- fmt.Sprintf("pread(%d, %d) returned wrong data", off, n)
							return
						}
					}
				}(w)
			}
			wg.Wait()
			close(errs)
			for e := range errs {
				t.Error(e)
			}
		})
	}
}
