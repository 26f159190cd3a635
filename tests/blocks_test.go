package tests

import (
	"context"
	"math/rand"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"imgfuse/drivers/driverstest"
)

// duBytes returns what `du -B1` says path occupies.
func duBytes(t *testing.T, path string) int64 {
	t.Helper()
	out := driverstest.Cmd(t, "du", "-B1", path)
	f := strings.Fields(string(out))
	if len(f) == 0 {
		t.Fatalf("du %s: no output", path)
	}
	n, err := strconv.ParseInt(f[0], 10, 64)
	if err != nil {
		t.Fatalf("du %s: %q: %v", path, out, err)
	}
	return n
}

// between fails t unless lo <= got <= hi.
func between(t *testing.T, what string, got, lo, hi int64) {
	t.Helper()
	if got < lo || got > hi {
		t.Errorf("%s: %d bytes, want [%d, %d]", what, got, lo, hi)
	}
}

// writeRandom writes n random bytes at off of the mounted disk and
// closes it (which flushes).
func writeRandom(t *testing.T, disk string, off, n int64, seed int64) {
	t.Helper()
	p := make([]byte, n)
	rand.New(rand.NewSource(seed)).Read(p)
	f, err := os.OpenFile(disk, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt(p, off); err != nil {
		t.Fatal(err)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
}

// cpSparse runs cp --sparse=MODE src dst, bounded: a cp that missed the
// sparse path on a 1 TiB disk would read it all.
func cpSparse(t *testing.T, mode, src, dst string) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	if out, err := exec.CommandContext(ctx, "cp", "--sparse="+mode, src, dst).CombinedOutput(); err != nil {
		t.Fatalf("cp --sparse=%s %s %s: %v\n%s", mode, src, dst, err, out)
	}
}

// TestBlocks: st_blocks of the exposed disk tells what the image stores,
// so du, cp --sparse=auto and cp --sparse=always treat a sparse disk as
// sparse.
func TestBlocks(t *testing.T) {
	requireE2E(t, "du", "cp")
	t.Parallel()

	// An empty 1 TiB qcow2 disk occupies nothing; writing 8 MiB through
	// the mount adds 8 MiB; cp --sparse=auto takes the SEEK_DATA path
	// (else it would read a terabyte) and copies just that.
	t.Run("qcow2-1TiB", func(t *testing.T) {
		t.Parallel()
		dir := t.TempDir()
		img := filepath.Join(dir, "img.qcow2")
		driverstest.Cmd(t, "qemu-img", "create", "-q", "-f", "qcow2", img, "1T")
		mp, disk := mount(t, img, true)
		before := duBytes(t, disk)
		between(t, "du of an empty 1 TiB disk", before, 0, 64<<10)
		writeRandom(t, disk, 100<<30, 8<<20, 1)
		between(t, "du growth after writing 8 MiB", duBytes(t, disk)-before, 8<<20, 8<<20+128<<10)
		out := filepath.Join(dir, "out.raw")
		cpSparse(t, "auto", disk, out)
		between(t, "du of cp --sparse=auto's copy", duBytes(t, out), 8<<20, 8<<20+128<<10)
		unmount(t, mp)
		driverstest.Cmd(t, "qemu-img", "compare", "-q", "-f", "raw", "-F", "qcow2", out, img)
	})

	// cp --sparse=always of the disk is a sparse file with the bytes of
	// qemu-img convert -O raw: data, zero clusters, written zeros, holes.
	t.Run("cp-sparse-always", func(t *testing.T) {
		t.Parallel()
		dir := t.TempDir()
		img := filepath.Join(dir, "img.qcow2")
		driverstest.Cmd(t, "qemu-img", "create", "-q", "-f", "qcow2", img, "32M")
		driverstest.QemuIO(t, img, "write -P 0x11 1M 3M", "write -z 2M 512k", "write -P 0 8M 2M",
			"write -P 0x22 20M 64k", "write -P 0x33 31M 1M")
		ref := filepath.Join(dir, "ref.raw")
		driverstest.Cmd(t, "qemu-img", "convert", "-f", "qcow2", "-O", "raw", img, ref)
		_, disk := mount(t, img, false, "--read-only")
		between(t, "du of the disk", duBytes(t, disk), 6<<20, 6<<20+128<<10)
		out := filepath.Join(dir, "out.raw")
		cpSparse(t, "always", disk, out)
		compareFiles(t, out, ref)
		// 3.5 MiB of data in [1M, 4M) less the zeroed 512 KiB, 64 KiB,
		// 1 MiB: the written zeros and the zero clusters are holes.
		between(t, "du of cp --sparse=always's copy", duBytes(t, out), 3<<20+512<<10+64<<10, 4<<20)
	})

	// A raw image: its own allocation, what is written through the mount
	// and what a punched hole frees.
	t.Run("raw-sparse", func(t *testing.T) {
		t.Parallel()
		img := filepath.Join(t.TempDir(), "img.raw")
		driverstest.Cmd(t, "qemu-img", "create", "-q", "-f", "raw", img, "64M")
		driverstest.Cmd(t, "qemu-io", "-f", "raw", "-c", "write -P 0x44 16M 4M", img)
		_, disk := mount(t, img, false)
		between(t, "du of a raw disk with 4 MiB written", duBytes(t, disk), 4<<20, 4<<20+64<<10)
		writeRandom(t, disk, 40<<20, 2<<20, 2)
		between(t, "du after writing 2 MiB", duBytes(t, disk), 6<<20, 6<<20+64<<10)
		f, err := os.OpenFile(disk, os.O_RDWR, 0)
		if err != nil {
			t.Fatal(err)
		}
		err = unix.Fallocate(int(f.Fd()), unix.FALLOC_FL_KEEP_SIZE|unix.FALLOC_FL_PUNCH_HOLE, 16<<20, 4<<20)
		f.Close()
		if err != nil {
			t.Fatal(err)
		}
		between(t, "du after punching 4 MiB", duBytes(t, disk), 2<<20, 2<<20+64<<10)
	})

	// An empty overlay over a full base shows the base's allocation:
	// the whole disk; what it writes itself adds nothing past the size.
	t.Run("overlay-over-full-base", func(t *testing.T) {
		t.Parallel()
		dir := t.TempDir()
		base := filepath.Join(dir, "base.qcow2")
		driverstest.Cmd(t, "qemu-img", "create", "-q", "-f", "qcow2", base, "32M")
		driverstest.QemuIO(t, base, "write -P 0x55 0 32M")
		over := filepath.Join(dir, "over.qcow2")
		driverstest.Cmd(t, "qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", over)
		_, disk := mount(t, over, true)
		between(t, "du of an empty overlay over a full base", duBytes(t, disk), 32<<20, 32<<20)
		writeRandom(t, disk, 4<<20, 1<<20, 3)
		between(t, "du after writing to the overlay", duBytes(t, disk), 32<<20, 32<<20)
		st, err := os.Stat(disk)
		if err != nil {
			t.Fatal(err)
		}
		if b := st.Sys().(*syscall.Stat_t).Blocks; b != 32<<20/512 {
			t.Errorf("st_blocks %d, want %d", b, 32<<20/512)
		}
	})
}
