package tests

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
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
	"imgfuse/internal/testenv"
)

// writeSeed returns the seed of a randomized write test: IMGFUSE_SEED if
// set, otherwise the clock. The seed is always logged (the workloads are
// long enough that a flaky failure is worth replaying even when the test
// passes under -v) and repeated on failure.
func writeSeed(t *testing.T) int64 {
	t.Helper()
	seed := rand.Int63()
	if s := os.Getenv("IMGFUSE_SEED"); s != "" {
		v, err := strconv.ParseInt(s, 10, 64)
		if err != nil {
			t.Fatalf("IMGFUSE_SEED=%q: %v", s, err)
		}
		seed = v
	}
	t.Logf("seed %d (replay with IMGFUSE_SEED=%d)", seed, seed)
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("failed with IMGFUSE_SEED=%d", seed)
		}
	})
	return seed
}

// exitCode runs name with args and returns its exit status and combined
// output; it fails t only if the command could not be run at all.
func exitCode(t *testing.T, name string, args ...string) (int, string) {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	var ee *exec.ExitError
	switch {
	case err == nil:
		return 0, string(out)
	case errors.As(err, &ee):
		return ee.ExitCode(), string(out)
	}
	t.Fatalf("%s %s: %v", name, strings.Join(args, " "), err)
	return -1, ""
}

// qemuCheck runs `qemu-img check` on a qcow2 image and returns its exit
// status (0 clean, 1 check failed to run, 2 corruption, 3 leaks only) and
// its output.
func qemuCheck(t *testing.T, img string) (int, string) {
	t.Helper()
	return exitCode(t, "qemu-img", "check", "-f", "qcow2", img)
}

// requireClean fails t unless `qemu-img check` reports img clean.
func requireClean(t *testing.T, img string) {
	t.Helper()
	if code, out := qemuCheck(t, img); code != 0 {
		t.Errorf("qemu-img check %s: exit %d\n%s", img, code, out)
	}
}

// qemuCompare fails t unless the qcow2 image img reads exactly as the raw
// file model and has its size. (Not strict mode -s: that also compares
// allocation, and the model is fully allocated.)
func qemuCompare(t *testing.T, img, model string) {
	t.Helper()
	if code, out := exitCode(t, "qemu-img", "compare", "-f", "qcow2", "-F", "raw", img, model); code != 0 {
		t.Errorf("qemu-img compare %s %s: exit %d\n%s", img, model, code, out)
	}
	st, err := os.Stat(model)
	if err != nil {
		t.Fatal(err)
	}
	if got := virtualSize(t, img); got != st.Size() {
		t.Errorf("%s: virtual size %d, model %d bytes", img, got, st.Size())
	}
}

// dirtyBit reports whether the qcow2 header of img has the dirty bit set
// (incompatible feature bit 0, header bytes 72..79, big endian; version 3
// headers only).
func dirtyBit(t *testing.T, img string) bool {
	t.Helper()
	f, err := os.Open(img)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	h := make([]byte, 80)
	if _, err := io.ReadFull(f, h); err != nil {
		t.Fatal(err)
	}
	if h[7] < 3 {
		return false
	}
	return h[79]&1 != 0
}

// fileSum returns the sha256 of the file at path.
func fileSum(t *testing.T, path string) string {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		t.Fatal(err)
	}
	return hex.EncodeToString(h.Sum(nil))
}

// frozen records files that a test must leave byte-identical (backing
// files, and the image itself on a read-only mount).
type frozen map[string]string

func freeze(t *testing.T, paths ...string) frozen {
	t.Helper()
	f := frozen{}
	for _, p := range paths {
		f[p] = fileSum(t, p)
	}
	return f
}

func (f frozen) check(t *testing.T) {
	t.Helper()
	for p, sum := range f {
		if got := fileSum(t, p); got != sum {
			t.Errorf("%s changed: sha256 %s, was %s", p, got, sum)
		}
	}
}

// virtualSize returns the virtual size qemu-img info reports for img.
func virtualSize(t *testing.T, img string) int64 {
	t.Helper()
	var info struct {
		VirtualSize int64 `json:"virtual-size"`
	}
	out := driverstest.Cmd(t, "qemu-img", "info", "--output=json", img)
	if err := json.Unmarshal(out, &info); err != nil {
		t.Fatalf("qemu-img info --output=json: %v\n%s", err, out)
	}
	return info.VirtualSize
}

// mappedBytes sums the ranges `qemu-img map` reports as data. It passes
// -U, so it may be used on a mounted image (after an fsync through the
// mount has written the metadata).
func mappedBytes(t *testing.T, img string) int64 {
	t.Helper()
	var m []mapEntry
	if err := json.Unmarshal(driverstest.Cmd(t, "qemu-img", "map", "-U", "--output=json", img), &m); err != nil {
		t.Fatal(err)
	}
	var n int64
	for _, e := range m {
		if e.Data {
			n += e.Length
		}
	}
	return n
}

// workload is a seeded metamorphic workload: every operation is applied
// to the mounted disk and to an in-memory model of it, and reads compare
// the two. The model is the trivially correct raw disk.
type workload struct {
	t      *testing.T
	rng    *rand.Rand
	f      *os.File // the disk, buffered path
	direct *os.File // the disk opened O_DIRECT
	model  []byte
	counts map[string]int
}

// newWorkload opens disk twice (with and without O_DIRECT) and starts from
// model, the disk's current contents.
func newWorkload(t *testing.T, disk string, model []byte, seed int64) *workload {
	t.Helper()
	f, err := os.OpenFile(disk, os.O_RDWR, 0)
	if err != nil {
		t.Fatalf("open %s O_RDWR: %v", disk, err)
	}
	t.Cleanup(func() { f.Close() })
	d, err := os.OpenFile(disk, os.O_RDWR|syscall.O_DIRECT, 0)
	if err != nil {
		t.Fatalf("open %s O_RDWR|O_DIRECT: %v", disk, err)
	}
	t.Cleanup(func() { d.Close() })
	if st, err := f.Stat(); err != nil || st.Size() != int64(len(model)) {
		t.Fatalf("disk size %v (%v), model %d", st.Size(), err, len(model))
	}
	return &workload{t: t, rng: rand.New(rand.NewSource(seed)), f: f, direct: d, model: model, counts: map[string]int{}}
}

// size returns a length in [1, max] spread log-uniformly, so that one-byte
// writes and megabyte writes both happen often.
func (w *workload) size(max int64) int64 {
	bits := w.rng.Intn(21) // up to 2^20
	n := int64(1)<<bits + w.rng.Int63n(int64(1)<<bits)
	return min(max, n)
}

// offset returns an offset for a request of n bytes: at a random alignment
// (none, sector, page, 64 KiB) or just before a 64 KiB boundary so the
// request straddles it.
func (w *workload) offset(n int64) int64 {
	size := int64(len(w.model))
	off := w.rng.Int63n(size - n + 1)
	switch w.rng.Intn(5) {
	case 1:
		off &^= 511
	case 2:
		off &^= 4095
	case 3:
		off &^= 65535
	case 4:
		off = off&^65535 + 65536 - min(n/2+1, 65536)
	}
	return max(0, min(off, size-n))
}

// step runs one random operation.
func (w *workload) step(i int) {
	t := w.t
	size := int64(len(w.model))
	switch r := w.rng.Intn(100); {
	case r < 30: // buffered pwrite, any size and alignment
		n := w.size(1 << 20)
		off := w.offset(n)
		p := make([]byte, n)
		w.rng.Read(p)
		if _, err := w.f.WriteAt(p, off); err != nil {
			t.Fatalf("op %d: pwrite(%d, %d): %v", i, off, n, err)
		}
		copy(w.model[off:], p)
		w.counts["write"]++
	case r < 50: // O_DIRECT pwrite: page-aligned offset, length and buffer
		n := (w.size(1<<20) + 4095) &^ 4095
		off := w.rng.Int63n(size/4096-n/4096+1) * 4096
		p := driverstest.AlignedBuffer(int(n), 4096)
		w.rng.Read(p)
		if _, err := w.direct.WriteAt(p, off); err != nil {
			t.Fatalf("op %d: O_DIRECT pwrite(%d, %d): %v", i, off, n, err)
		}
		copy(w.model[off:], p)
		w.counts["direct-write"]++
	case r < 60:
		w.fallocate(i, unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE)
	case r < 70:
		w.fallocate(i, unix.FALLOC_FL_ZERO_RANGE|unix.FALLOC_FL_KEEP_SIZE)
	case r < 75:
		f := w.f
		if w.rng.Intn(2) == 0 {
			f = w.direct
		}
		if err := f.Sync(); err != nil {
			t.Fatalf("op %d: fsync: %v", i, err)
		}
		w.counts["fsync"]++
	default: // read back a random range, sometimes O_DIRECT
		n := w.size(1 << 20)
		off := w.offset(n)
		f, p := w.f, make([]byte, n)
		if w.rng.Intn(3) == 0 {
			n = (n + 4095) &^ 4095
			off = w.rng.Int63n(size/4096-n/4096+1) * 4096
			f, p = w.direct, driverstest.AlignedBuffer(int(n), 4096)
		}
		if _, err := f.ReadAt(p, off); err != nil {
			t.Fatalf("op %d: pread(%d, %d): %v", i, off, n, err)
		}
		if d := firstDiff(p, w.model[off:off+n]); d >= 0 {
			t.Fatalf("op %d: pread(%d, %d) differs from the model at %d: got %#x, want %#x",
				i, off, n, off+int64(d), p[d], w.model[off+int64(d)])
		}
		w.counts["read"]++
	}
}

// fallocate punches or zeroes a random range, sometimes whole 64 KiB
// clusters, sometimes a ragged range.
func (w *workload) fallocate(i int, mode uint32) {
	t := w.t
	n := w.size(2 << 20)
	off := w.offset(n)
	if w.rng.Intn(2) == 0 {
		off &^= 65535
		n = (n + 65535) &^ 65535
		n = min(n, int64(len(w.model))-off)
	}
	name := "punch-hole"
	if mode&unix.FALLOC_FL_ZERO_RANGE != 0 {
		name = "zero-range"
	}
	err := unix.Fallocate(int(w.f.Fd()), mode, off, n)
	if err == unix.EOPNOTSUPP && mode&unix.FALLOC_FL_ZERO_RANGE != 0 {
		zeroRangeRefused(t, err)
	}
	if err != nil {
		t.Fatalf("op %d: fallocate(%s, %d, %d): %v", i, name, off, n, err)
	}
	clear(w.model[off : off+n])
	w.counts[name]++
}

// run does ops random operations, then reads the whole disk back.
func (w *workload) run(ops int) {
	w.t.Helper()
	for i := 0; i < ops; i++ {
		w.step(i)
		if w.t.Failed() {
			return
		}
	}
	got := make([]byte, len(w.model))
	if _, err := w.f.ReadAt(got, 0); err != nil {
		w.t.Fatalf("final read: %v", err)
	}
	if d := firstDiff(got, w.model); d >= 0 {
		w.t.Fatalf("after the workload the disk differs from the model at %d: got %#x, want %#x", d, got[d], w.model[d])
	}
	w.t.Logf("ops: %v", w.counts)
}

// firstDiff returns the first index where a and b differ, or -1.
func firstDiff(a, b []byte) int {
	if bytes.Equal(a, b) {
		return -1
	}
	for i := range min(len(a), len(b)) {
		if a[i] != b[i] {
			return i
		}
	}
	return min(len(a), len(b))
}

// writeModel stores model as a raw file at path.
func writeModel(t *testing.T, path string, model []byte) {
	t.Helper()
	if err := os.WriteFile(path, model, 0o644); err != nil {
		t.Fatal(err)
	}
}

// patternAt fills n bytes with a pattern that names its own offset, so a
// misplaced block is recognisable.
func patternAt(off, n int64, tag byte) []byte {
	p := make([]byte, n)
	for i := range p {
		o := off + int64(i)
		p[i] = byte(o>>9) ^ byte(o) ^ tag
	}
	return p
}

func fmtSize(n int64) string { return fmt.Sprint(n) }

// unmountBusyRetry is unmount that retries a few times, for up to about a
// second, when the kernel says the mount is busy. Tests run in parallel
// and fork children (qemu-img, mkfs, ...) all the time; a child holds a
// copy of this process's descriptors between fork and exec, so a disk file
// the test has just closed can still pin the mount for a moment. A mount
// that stays busy still fails t.
func unmountBusyRetry(t *testing.T, mp string) {
	t.Helper()
	for i := 0; i < 5; i++ {
		r := imgfuse(t, nil, "unmount", mp)
		if r.code == 0 {
			if mounted(t, mp) {
				t.Fatalf("imgfuse unmount %s returned, but it is still mounted", mp)
			}
			return
		}
		if !strings.Contains(r.stderr, "busy") {
			t.Fatalf("imgfuse unmount %s: %v", mp, r)
		}
		t.Logf("imgfuse unmount %s: busy, retrying: %s", mp, strings.TrimSpace(r.stderr))
		time.Sleep(time.Duration(50<<i) * time.Millisecond)
	}
	unmount(t, mp)
}

// zeroRangeRefused is called when fallocate(FALLOC_FL_ZERO_RANGE) on an
// imgfuse disk failed with err, EOPNOTSUPP, and never returns. imgfuse
// serves ZERO_RANGE (as WriteZeroes) and must never refuse it: that fails
// t. Only a kernel that does not forward ZERO_RANGE to FUSE servers (it
// then answers EOPNOTSUPP itself) is a missing prerequisite, for
// testenv.Skip. Which of the two happened is read from the debug log of a
// fresh mount: a FALLOCATE request there means the kernel forwarded it.
func zeroRangeRefused(t *testing.T, err error) {
	t.Helper()
	dir := t.TempDir()
	img := filepath.Join(dir, "probe.raw")
	if err := os.WriteFile(img, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(img, 1<<20); err != nil {
		t.Fatal(err)
	}
	mp := newMountpoint(t, false)
	logFile := filepath.Join(dir, "debug.log")
	if r := imgfuse(t, nil, "mount", "--log", logFile, "--debug", img, mp); r.code != 0 {
		t.Fatalf("fallocate(ZERO_RANGE): %v; probe mount: %v", err, r)
	}
	f, ferr := os.OpenFile(filepath.Join(mp, "disk"), os.O_RDWR, 0)
	if ferr != nil {
		t.Fatal(ferr)
	}
	perr := unix.Fallocate(int(f.Fd()), unix.FALLOC_FL_ZERO_RANGE|unix.FALLOC_FL_KEEP_SIZE, 0, 4096)
	f.Close()
	unmount(t, mp)
	b, rerr := os.ReadFile(logFile)
	if rerr != nil {
		t.Fatal(rerr)
	}
	if bytes.Contains(b, []byte("FALLOCATE")) {
		t.Fatalf("fallocate(ZERO_RANGE): %v: the kernel forwarded it and imgfuse refused it (probe: %v)", err, perr)
	}
	testenv.Skip(t, "this kernel does not forward fallocate(ZERO_RANGE) to FUSE servers: %v", err)
}
