package qcow2

import (
	"bytes"
	"errors"
	"fmt"
	"math/rand"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"imgfuse/coroutine"
	"imgfuse/drivers"
	"imgfuse/drivers/driverstest"
)

// writeSize is the virtual size of the write-test images: four 2 MiB
// clusters, many L2 tables at 512-byte clusters, quick to check.
const writeSize = 8 << 20

// writeCase is an image the write tests start from.
type writeCase struct {
	name string
	// cluster is the image's cluster size (steers aligned requests).
	cluster int64
	// build creates the image in dir and returns its path.
	build func(t *testing.T, dir string) string
	// opts are extra open options.
	opts drivers.OpenOptions
	// snapshot, if set, names a snapshot that must read the same
	// before and after the workload.
	snapshot string
}

func createImg(t *testing.T, dir, opts string) string {
	img := filepath.Join(dir, "img.qcow2")
	args := []string{"create", "-q", "-f", "qcow2"}
	if opts != "" {
		args = append(args, "-o", opts)
	}
	qemuImg(t, append(args, img, fmt.Sprint(writeSize))...)
	return img
}

func writeCases() []writeCase {
	fresh := func(opts string) func(t *testing.T, dir string) string {
		return func(t *testing.T, dir string) string { return createImg(t, dir, opts) }
	}
	base := func(t *testing.T, dir, name, opts string) string {
		b := filepath.Join(dir, name)
		args := []string{"create", "-q", "-f", "qcow2"}
		if opts != "" {
			args = append(args, "-o", opts)
		}
		qemuImg(t, append(args, b, fmt.Sprint(writeSize))...)
		driverstest.QemuIO(t, b, fmt.Sprintf("write -P 0x11 0 %d", writeSize))
		driverstest.QemuIO(t, b, driverstest.Scatter(writeSize, 65536, 2)...)
		return b
	}
	overlay := func(t *testing.T, dir, backing, fmt_, opts string) string {
		img := filepath.Join(dir, "img.qcow2")
		args := []string{"create", "-q", "-f", "qcow2", "-b", filepath.Base(backing), "-F", fmt_}
		if opts != "" {
			args = append(args, "-o", opts)
		}
		cmdIn(t, dir, "qemu-img", append(args, img, fmt.Sprint(writeSize))...)
		return img
	}
	return []writeCase{
		{name: "fresh", cluster: 65536, build: fresh("")},
		{name: "cluster512", cluster: 512, build: fresh("cluster_size=512")},
		{name: "cluster2M", cluster: 2 << 20, build: fresh("cluster_size=2M")},
		{name: "refcount1", cluster: 65536, build: fresh("refcount_bits=1")},
		{name: "refcount64", cluster: 65536, build: fresh("refcount_bits=64")},
		{name: "v2", cluster: 65536, build: fresh("compat=0.10")},
		{name: "extended-l2", cluster: 65536, build: fresh("extended_l2=on")},
		{name: "extended-l2-backing", cluster: 65536, build: func(t *testing.T, dir string) string {
			return overlay(t, dir, base(t, dir, "base.qcow2", ""), "qcow2", "extended_l2=on")
		}},
		{name: "lazy-refcounts", cluster: 65536, build: fresh("lazy_refcounts=on")},
		{name: "lazy-option", cluster: 4096, build: fresh("cluster_size=4096"), opts: drivers.OpenOptions{LazyRefcounts: true}},
		{name: "convert-filled", cluster: 65536, build: func(t *testing.T, dir string) string {
			src := filepath.Join(dir, "src.raw")
			driverstest.RandomRaw(t, src, writeSize, 3)
			img := filepath.Join(dir, "img.qcow2")
			qemuImg(t, "convert", "-f", "raw", "-O", "qcow2", src, img)
			return img
		}},
		{name: "zstd-compressed", cluster: 65536, build: func(t *testing.T, dir string) string {
			src := filepath.Join(dir, "src.raw")
			driverstest.RandomRaw(t, src, writeSize, 4)
			img := filepath.Join(dir, "img.qcow2")
			qemuImg(t, "convert", "-c", "-f", "raw", "-O", "qcow2", "-o", "compression_type=zstd", src, img)
			return img
		}},
		{name: "overlay-on-compressed", cluster: 65536, build: func(t *testing.T, dir string) string {
			src := filepath.Join(dir, "src.raw")
			driverstest.RandomRaw(t, src, writeSize, 5)
			b := filepath.Join(dir, "base.qcow2")
			qemuImg(t, "convert", "-c", "-f", "raw", "-O", "qcow2", src, b)
			return overlay(t, dir, b, "qcow2", "")
		}},
		{name: "v2-overlay", cluster: 65536, build: func(t *testing.T, dir string) string {
			return overlay(t, dir, base(t, dir, "base.qcow2", ""), "qcow2", "compat=0.10")
		}},
		{name: "chain3", cluster: 4096, build: func(t *testing.T, dir string) string {
			raw := filepath.Join(dir, "base.raw")
			driverstest.RandomRaw(t, raw, writeSize, 6)
			mid := filepath.Join(dir, "mid.qcow2")
			cmdIn(t, dir, "qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", mid, fmt.Sprint(writeSize))
			driverstest.QemuIO(t, mid, driverstest.Scatter(writeSize, 65536, 7)...)
			return overlay(t, dir, mid, "qcow2", "cluster_size=4096")
		}},
		{name: "data-file", cluster: 65536, build: func(t *testing.T, dir string) string {
			img := filepath.Join(dir, "img.qcow2")
			qemuImg(t, "create", "-q", "-f", "qcow2", "-o", "data_file="+filepath.Join(dir, "img.data"), img, fmt.Sprint(writeSize))
			driverstest.QemuIO(t, img, driverstest.Scatter(writeSize, 65536, 8)...)
			return img
		}},
		{name: "snapshot", cluster: 65536, snapshot: "snap1", build: func(t *testing.T, dir string) string {
			img := createImg(t, dir, "")
			driverstest.QemuIO(t, img, driverstest.Scatter(writeSize, 65536, 10)...)
			qemuImg(t, "snapshot", "-c", "snap1", img)
			driverstest.QemuIO(t, img, driverstest.Scatter(writeSize, 65536, 11)...)
			return img
		}},
	}
}

func writeAt(d drivers.Driver, p []byte, off int64) (n int, err error) {
	coroutine.Run(func(co *coroutine.Co) { n, err = d.WriteAt(co, p, off) })
	return n, err
}

func flush(d drivers.Driver) (err error) {
	coroutine.Run(func(co *coroutine.Co) { err = d.Flush(co) })
	return err
}

// openRW opens path read-write (the caller closes it).
func openRW(t testing.TB, path string, opts drivers.OpenOptions) *image {
	t.Helper()
	opts.Formats = testFormats
	d, err := Format{}.Open(path, opts)
	if err != nil {
		t.Fatalf("open %s read-write: %v", path, err)
	}
	return d.(*image)
}

// randomOp applies one random operation to d and model. It returns a
// description for failure messages.
func randomOp(t *testing.T, rng *rand.Rand, d drivers.Driver, model []byte, cluster int64) string {
	t.Helper()
	size := int64(len(model))
	var off, n int64
	switch rng.Intn(4) {
	case 0: // cluster-aligned, whole clusters
		k := max(size/cluster, 1)
		off = rng.Int63n(k) * cluster
		n = min(cluster*(1+rng.Int63n(3)), 512<<10)
	case 1: // sector-aligned
		off = rng.Int63n(size/512) * 512
		n = 512 * (1 + rng.Int63n(128))
	default: // anywhere
		off = rng.Int63n(size)
		n = 1 + rng.Int63n(200<<10)
	}
	n = min(n, size-off)
	var err error
	var op string
	switch k := rng.Intn(20); {
	case k < 13:
		op = "write"
		p := make([]byte, n)
		rng.Read(p)
		if rng.Intn(4) == 0 {
			clear(p[:n/2]) // some zeros, as real data has
		}
		var w int
		w, err = writeAt(d, p, off)
		if err == nil && int64(w) != n {
			err = fmt.Errorf("short write %d", w)
		}
		copy(model[off:], p)
	case k < 16:
		unmap := rng.Intn(2) == 0
		op = fmt.Sprintf("zeroes(unmap=%v)", unmap)
		coroutine.Run(func(co *coroutine.Co) { err = d.WriteZeroes(co, off, n, unmap) })
		clear(model[off : off+n])
	case k < 18:
		op = "discard"
		coroutine.Run(func(co *coroutine.Co) { err = d.Discard(co, off, n) })
		clear(model[off : off+n])
	default:
		op = "flush"
		err = flush(d)
	}
	desc := fmt.Sprintf("%s(off %#x, len %#x)", op, off, n)
	if err != nil {
		t.Fatalf("%s: %v", desc, err)
	}
	return desc
}

// checkImage runs qemu-img check (exit 0 wanted) and compares the image with
// model.
func checkImage(t *testing.T, img string, model []byte) {
	t.Helper()
	dir := filepath.Dir(img)
	if out, err := exec.Command("qemu-img", "check", img).CombinedOutput(); err != nil {
		t.Fatalf("qemu-img check %s: %v\n%s", img, err, out)
	}
	ref := filepath.Join(t.TempDir(), "model.raw")
	if err := os.WriteFile(ref, model, 0o644); err != nil {
		t.Fatal(err)
	}
	c := exec.Command("qemu-img", "compare", "-f", "qcow2", "-F", "raw", img, ref)
	c.Dir = dir
	if out, err := c.CombinedOutput(); err != nil {
		t.Fatalf("qemu-img compare with the model: %v\n%s", err, out)
	}
}

// TestWriteWorkload: a seeded random workload of writes, zero writes,
// discards and flushes on every kind of image, mirrored into a raw model
// and read back as it goes; after Close, qemu-img check finds the image
// clean and qemu-img compare finds it equal to the model.
func TestWriteWorkload(t *testing.T) {
	requireQemu(t)
	for _, c := range writeCases() {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			seed := driverstest.Seed(t)
			rng := rand.New(rand.NewSource(seed))
			dir := t.TempDir()
			img := c.build(t, dir)
			model := reference(t, img, "")
			var snap []byte
			if c.snapshot != "" {
				snap = reference(t, img, "snapshot.name="+c.snapshot)
			}
			d := openRW(t, img, c.opts)
			var ops []string
			t.Cleanup(func() {
				if t.Failed() && len(ops) > 0 {
					t.Logf("last operations: %s", strings.Join(ops[max(len(ops)-5, 0):], ", "))
				}
			})
			for i := 0; i < 150; i++ {
				ops = append(ops, randomOp(t, rng, d, model, c.cluster))
				if i%10 == 9 {
					checkRange(t, d, model, 0, int64(len(model)))
				}
			}
			checkRange(t, d, model, 0, int64(len(model)))
			if err := flush(d); err != nil {
				t.Fatal(err)
			}
			if err := d.Close(); err != nil {
				t.Fatalf("close: %v", err)
			}
			checkImage(t, img, model)
			if snap != nil {
				if got := reference(t, img, "snapshot.name="+c.snapshot); !bytes.Equal(got, snap) {
					t.Fatalf("snapshot %s changed", c.snapshot)
				}
			}
		})
	}
}

// rangeLock serialises the test's operations on overlapping byte ranges,
// so the model can apply them in the same order as the driver; operations
// on different bytes of one cluster still race inside the driver.
type rangeLock struct {
	mu   sync.Mutex
	cond *sync.Cond
	busy [][2]int64
}

func (l *rangeLock) lock(off, n int64) {
	l.mu.Lock()
	defer l.mu.Unlock()
	for {
		free := true
		for _, b := range l.busy {
			if off < b[0]+b[1] && b[0] < off+n {
				free = false
				break
			}
		}
		if free {
			l.busy = append(l.busy, [2]int64{off, n})
			return
		}
		l.cond.Wait()
	}
}

func (l *rangeLock) unlock(off, n int64) {
	l.mu.Lock()
	defer l.mu.Unlock()
	for i, b := range l.busy {
		if b == [2]int64{off, n} {
			l.busy = append(l.busy[:i], l.busy[i+1:]...)
			break
		}
	}
	l.cond.Broadcast()
}

// TestConcurrentAllocation: 16 goroutines write, zero and discard small
// ranges of a small region at once, so that allocations of the same
// cluster race (different bytes of one unallocated cluster, COW from a
// backing file or a compressed cluster). Operations on overlapping bytes
// are serialised by the test; the result must equal the model and the
// image must check clean.
func TestConcurrentAllocation(t *testing.T) {
	requireQemu(t)
	for _, c := range writeCases() {
		switch c.name {
		case "fresh", "extended-l2-backing", "overlay-on-compressed", "cluster512", "v2-overlay", "zstd-compressed", "lazy-refcounts":
		default:
			continue
		}
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			seed := driverstest.Seed(t)
			dir := t.TempDir()
			img := c.build(t, dir)
			model := reference(t, img, "")
			d := openRW(t, img, c.opts)
			const workers = 16
			region := min(int64(len(model)), 16*c.cluster, 2<<20)
			base := int64(len(model)) / 3 &^ (c.cluster - 1)
			rl := &rangeLock{}
			rl.cond = sync.NewCond(&rl.mu)
			var wg sync.WaitGroup
			errs := make(chan error, workers)
			for w := 0; w < workers; w++ {
				rng := rand.New(rand.NewSource(seed + int64(w)))
				wg.Add(1)
				go func() {
					defer wg.Done()
					for i := 0; i < 40; i++ {
						off := base + rng.Int63n(region)
						n := 1 + rng.Int63n(min(c.cluster*2, 48<<10))
						n = min(n, int64(len(model))-off)
						p := make([]byte, n)
						rng.Read(p)
						k := rng.Intn(10)
						rl.lock(off, n)
						var err error
						switch {
						case k < 8:
							_, err = writeAt(d, p, off)
							copy(model[off:], p)
						case k < 9:
							coroutine.Run(func(co *coroutine.Co) { err = d.WriteZeroes(co, off, n, rng.Intn(2) == 0) })
							clear(model[off : off+n])
						default:
							coroutine.Run(func(co *coroutine.Co) { err = d.Discard(co, off, n) })
							clear(model[off : off+n])
						}
						rl.unlock(off, n)
						if err != nil {
							errs <- fmt.Errorf("op %d at %#x+%#x: %w", k, off, n, err)
							return
						}
					}
				}()
			}
			wg.Wait()
			close(errs)
			for err := range errs {
				t.Fatal(err)
			}
			checkRange(t, d, model, 0, int64(len(model)))
			if err := d.Close(); err != nil {
				t.Fatalf("close: %v", err)
			}
			checkImage(t, img, model)
		})
	}
}

// qemuCheckCode runs qemu-img check on img and returns its exit code and
// output.
func qemuCheckCode(t *testing.T, img string) (int, string) {
	t.Helper()
	out, err := exec.Command("qemu-img", "check", img).CombinedOutput()
	var ee *exec.ExitError
	switch {
	case err == nil:
		return 0, string(out)
	case errors.As(err, &ee):
		return ee.ExitCode(), string(out)
	}
	t.Fatalf("qemu-img check: %v", err)
	return -1, ""
}

// copyImage copies the files of an image (the image and, if present, its
// data file) into dir, as a crash at this moment would leave them; the
// other files of its directory (backing files) are linked.
func copyImage(t *testing.T, img, dir string) string {
	t.Helper()
	src := filepath.Dir(img)
	ents, err := os.ReadDir(src)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range ents {
		name := e.Name()
		if name != filepath.Base(img) && name != "img.data" {
			if err := os.Symlink(filepath.Join(src, name), filepath.Join(dir, name)); err != nil {
				t.Fatal(err)
			}
			continue
		}
		b, err := os.ReadFile(filepath.Join(src, name))
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(dir, name), b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	return filepath.Join(dir, filepath.Base(img))
}

// TestCrashStates abandons a writable image at random points of a workload
// (the files are copied as they are, with metadata still in the caches):
// without lazy refcounts qemu-img check may find leaks (exit 3) but never
// corruption (exit 2), and a copy taken right after Flush holds exactly
// the data written so far. With lazy refcounts the copy is marked dirty; a
// read-write open repairs it and it then checks clean.
func TestCrashStates(t *testing.T) {
	requireQemu(t)
	for _, c := range writeCases() {
		switch c.name {
		case "fresh", "cluster512", "refcount1", "extended-l2-backing", "zstd-compressed", "snapshot", "lazy-refcounts", "lazy-option":
		default:
			continue
		}
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			seed := driverstest.Seed(t)
			rng := rand.New(rand.NewSource(seed))
			dir := t.TempDir()
			img := c.build(t, dir)
			model := reference(t, img, "")
			d := openRW(t, img, c.opts)
			defer d.Close()
			lazy := d.lazy
			for round := 0; round < 4; round++ {
				for i, n := 0, 1+rng.Intn(25); i < n; i++ {
					randomOp(t, rng, d, model, c.cluster)
				}
				flushed := rng.Intn(2) == 0
				if flushed {
					if err := flush(d); err != nil {
						t.Fatal(err)
					}
				}
				crash := copyImage(t, img, t.TempDir())
				code, out := qemuCheckCode(t, crash)
				switch {
				case lazy && fileBE64(t, crash, 72)&incompatDirty == 0:
					// The dirty bit is set before the first L2
					// update; ops that changed no mapping (a
					// discard of a hole, say) leave a clean image.
					if code != 0 {
						t.Fatalf("round %d: lazy refcounts, not dirty, yet qemu-img check exit %d:\n%s", round, code, out)
					}
				case lazy:
					r := openRW(t, crash, c.opts)
					if err := r.Close(); err != nil {
						t.Fatalf("round %d: close after repair: %v", round, err)
					}
					if code, out := qemuCheckCode(t, crash); code != 0 {
						t.Fatalf("round %d: after the repairing open, qemu-img check exit %d:\n%s", round, code, out)
					}
				case flushed && code != 0:
					t.Fatalf("round %d: after Flush, qemu-img check exit %d:\n%s", round, code, out)
				case code != 0 && code != 3:
					t.Fatalf("round %d: qemu-img check exit %d (only 0 or 3 allowed):\n%s", round, code, out)
				}
				if flushed {
					checkImage(t, crash, model)
				}
			}
		})
	}
}

// TestResize grows a disk with Truncate (moving L1 at 512-byte clusters),
// writes its last byte, and checks that qemu sees the new size and the
// byte; shrinking is refused; a write past the end needs Growable.
func TestResize(t *testing.T) {
	requireQemu(t)
	dir := t.TempDir()
	img := filepath.Join(dir, "img.qcow2")
	qemuImg(t, "create", "-q", "-f", "qcow2", "-o", "cluster_size=512", img, "1M")
	driverstest.QemuIO(t, img, "write -P 0x42 0 4096")
	d := openRW(t, img, drivers.OpenOptions{})
	oldL1 := d.h.L1Offset
	const newSize = 64 << 20
	var err error
	coroutine.Run(func(co *coroutine.Co) { err = d.Truncate(co, newSize) })
	if err != nil {
		t.Fatalf("Truncate: %v", err)
	}
	if d.Size() != newSize || d.h.L1Offset == oldL1 {
		t.Fatalf("after Truncate: size %d, L1 at %#x (was %#x)", d.Size(), d.h.L1Offset, oldL1)
	}
	if _, err := writeAt(d, []byte{0x99}, newSize-1); err != nil {
		t.Fatalf("write of the last byte: %v", err)
	}
	if _, err := writeAt(d, []byte{1}, newSize); !errors.Is(err, drivers.ErrNoSpace) {
		t.Fatalf("write past the end: %v, want ErrNoSpace", err)
	}
	coroutine.Run(func(co *coroutine.Co) { err = d.Truncate(co, 1<<20) })
	if !errors.Is(err, drivers.ErrUnsupported) || !strings.Contains(err.Error(), "shrinking a qcow2 disk is not supported") {
		t.Fatalf("shrink: %v", err)
	}
	if err := d.Close(); err != nil {
		t.Fatal(err)
	}
	info := string(qemuImg(t, "info", "--output=json", img))
	if !strings.Contains(info, fmt.Sprintf(`"virtual-size": %d`, newSize)) {
		t.Fatalf("qemu-img info after grow: %s", info)
	}
	driverstest.QemuIO(t, img, fmt.Sprintf("read -P 0x99 %d 1", newSize-1), "read -P 0x42 0 4096")
	if code, out := qemuCheckCode(t, img); code != 0 {
		t.Fatalf("check: %d\n%s", code, out)
	}

	// Growable: a write past the end grows the disk first.
	g := openRW(t, img, drivers.OpenOptions{Growable: true})
	if _, err := writeAt(g, bytes.Repeat([]byte{0x77}, 1000), newSize+5000); err != nil {
		t.Fatalf("growable write: %v", err)
	}
	if g.Size() < newSize+6000 {
		t.Fatalf("size after growable write: %d", g.Size())
	}
	if err := g.Close(); err != nil {
		t.Fatal(err)
	}
	driverstest.QemuIO(t, img, fmt.Sprintf("read -P 0x77 %d 1000", newSize+5000))
	if code, out := qemuCheckCode(t, img); code != 0 {
		t.Fatalf("check: %d\n%s", code, out)
	}
}

// TestOpenRWRefusals: the corrupt bit and persistent bitmaps refuse a
// read-write open with a clear error (read-only still works); lazy
// refcounts asked of a v2 image are refused.
func TestOpenRWRefusals(t *testing.T) {
	requireQemu(t)
	dir := t.TempDir()
	corrupt := filepath.Join(dir, "corrupt.qcow2")
	qemuImg(t, "create", "-q", "-f", "qcow2", corrupt, "1M")
	putFileBE64(t, corrupt, 72, fileBE64(t, corrupt, 72)|incompatCorrupt)
	bitmaps := filepath.Join(dir, "bitmaps.qcow2")
	qemuImg(t, "create", "-q", "-f", "qcow2", bitmaps, "1M")
	qemuImg(t, "bitmap", "--add", bitmaps, "b0")
	v2 := filepath.Join(dir, "v2.qcow2")
	qemuImg(t, "create", "-q", "-f", "qcow2", "-o", "compat=0.10", v2, "1M")
	for _, c := range []struct {
		path string
		opts drivers.OpenOptions
		want error
		msg  string
	}{
		{corrupt, drivers.OpenOptions{}, drivers.ErrCorrupt, "marked corrupt"},
		{bitmaps, drivers.OpenOptions{}, drivers.ErrUnsupported, "bitmaps"},
		{v2, drivers.OpenOptions{LazyRefcounts: true}, drivers.ErrUnsupported, "lazy refcounts"},
	} {
		c.opts.Formats = testFormats
		d, err := Format{}.Open(c.path, c.opts)
		if err == nil {
			d.Close()
			t.Errorf("%s: read-write open succeeded", c.path)
			continue
		}
		if !errors.Is(err, c.want) || !strings.Contains(err.Error(), c.msg) {
			t.Errorf("%s: %v, want %v mentioning %q", c.path, err, c.want, c.msg)
		}
		c.opts.ReadOnly = true
		c.opts.LazyRefcounts = false
		d, err = Format{}.Open(c.path, c.opts)
		if err != nil {
			t.Errorf("%s: read-only open: %v", c.path, err)
			continue
		}
		d.Close()
	}
}

// TestHeaderBits: a read-write open clears unknown autoclear bits and keeps
// unknown compatible bits; a dirty image is repaired and marked clean.
func TestHeaderBits(t *testing.T) {
	requireQemu(t)
	img := filepath.Join(t.TempDir(), "img.qcow2")
	qemuImg(t, "create", "-q", "-f", "qcow2", img, "4M")
	driverstest.QemuIO(t, img, "write -P 0x31 0 300k")
	putFileBE64(t, img, 80, fileBE64(t, img, 80)|1<<9)
	putFileBE64(t, img, 88, fileBE64(t, img, 88)|1<<7)
	putFileBE64(t, img, 72, fileBE64(t, img, 72)|incompatDirty)
	d := openRW(t, img, drivers.OpenOptions{})
	if _, err := writeAt(d, []byte("hello"), 1<<20); err != nil {
		t.Fatal(err)
	}
	if err := d.Close(); err != nil {
		t.Fatal(err)
	}
	if v := fileBE64(t, img, 88); v&(1<<7) != 0 {
		t.Errorf("unknown autoclear bit kept: %#x", v)
	}
	if v := fileBE64(t, img, 80); v&(1<<9) == 0 {
		t.Errorf("unknown compatible bit dropped: %#x", v)
	}
	if v := fileBE64(t, img, 72); v&incompatDirty != 0 {
		t.Errorf("dirty bit still set: %#x", v)
	}
	driverstest.QemuIO(t, img, "read -P 0x31 0 300k", "read -P 0x68 1M 1")
	if code, out := qemuCheckCode(t, img); code != 0 {
		t.Fatalf("check: %d\n%s", code, out)
	}
}

// TestDriversSuite runs the shared write suite on a fresh image and on an
// overlay.
func TestDriversSuite(t *testing.T) {
	requireQemu(t)
	for _, c := range writeCases() {
		if c.name != "fresh" && c.name != "extended-l2-backing" {
			continue
		}
		t.Run(c.name, func(t *testing.T) {
			driverstest.RunWritable(t, func(t *testing.T) (drivers.Driver, []byte) {
				dir := t.TempDir()
				img := c.build(t, dir)
				ref := reference(t, img, "")
				return openRW(t, img, c.opts), ref
			})
		})
	}
}

// TestWriteOverlapsMetadata: an L2 entry that points a COPIED cluster at
// the L1 table makes the write fail with ErrCorrupt instead of overwriting
// the table, and the image is marked corrupt.
func TestWriteOverlapsMetadata(t *testing.T) {
	requireQemu(t)
	img := filepath.Join(t.TempDir(), "img.qcow2")
	qemuImg(t, "create", "-q", "-f", "qcow2", img, "1M")
	driverstest.QemuIO(t, img, "write -P 0x42 0 64k")
	l2, l1 := firstL2(t, img)
	putFileBE64(t, img, l2, uint64(l1)|oflagCopied)
	before := fileBE64(t, img, l1)
	d := openRW(t, img, drivers.OpenOptions{})
	if _, err := writeAt(d, []byte("x"), 100); !errors.Is(err, drivers.ErrCorrupt) {
		t.Fatalf("write through a cluster overlapping L1: %v, want ErrCorrupt", err)
	}
	if _, err := writeAt(d, []byte("x"), 512<<10); !errors.Is(err, drivers.ErrCorrupt) {
		t.Fatalf("write after corruption: %v, want ErrCorrupt", err)
	}
	if err := d.Close(); err == nil {
		t.Errorf("clean close of a corrupt image succeeded")
	}
	if got := fileBE64(t, img, l1); got != before {
		t.Fatalf("L1 entry 0 changed from %#x to %#x", before, got)
	}
	if v := fileBE64(t, img, 72); v&incompatCorrupt == 0 {
		t.Fatalf("corrupt bit not set: %#x", v)
	}
}

// TestSubclusterAllocation: with extended L2 over a backing file, a write
// of one subcluster allocates that subcluster only (no copy of the
// others), a partial subcluster is completed from the backing file, and a
// discard of a whole cluster leaves zero bits so the backing file does not
// show through.
func TestSubclusterAllocation(t *testing.T) {
	requireQemu(t)
	dir := t.TempDir()
	b := filepath.Join(dir, "base.qcow2")
	qemuImg(t, "create", "-q", "-f", "qcow2", b, "4M")
	driverstest.QemuIO(t, b, "write -P 0x11 0 4M")
	img := filepath.Join(dir, "img.qcow2")
	cmdIn(t, dir, "qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", "-o", "extended_l2=on", img, "4M")
	d := openRW(t, img, drivers.OpenOptions{})
	// Subclusters are 2 KiB: subcluster 1 whole, 100 bytes of subcluster 3.
	if _, err := writeAt(d, bytes.Repeat([]byte{0xa1}, 2048), 2048); err != nil {
		t.Fatal(err)
	}
	if _, err := writeAt(d, bytes.Repeat([]byte{0xa3}, 100), 3*2048+500); err != nil {
		t.Fatal(err)
	}
	var err error
	coroutine.Run(func(co *coroutine.Co) { err = d.Discard(co, 65536, 65536) })
	if err != nil {
		t.Fatal(err)
	}
	if err := d.Close(); err != nil {
		t.Fatal(err)
	}
	l2, _ := firstL2(t, img)
	e0, bm0 := fileBE64(t, img, l2), fileBE64(t, img, l2+8)
	if e0&oflagCopied == 0 || e0&l2eOffsetMask == 0 || bm0 != 0b1010 {
		t.Errorf("cluster 0: entry %#x bitmap %#x, want a COPIED cluster with alloc bits 0b1010", e0, bm0)
	}
	if bm1 := fileBE64(t, img, l2+24); bm1 != 0xffffffff00000000 {
		t.Errorf("discarded cluster 1: bitmap %#x, want every zero bit set", bm1)
	}
	driverstest.QemuIO(t, img,
		"read -P 0x11 0 2048", "read -P 0xa1 2048 2048", "read -P 0x11 4096 2548",
		"read -P 0xa3 6644 100", "read -P 0x11 6744 58792", "read -P 0 65536 65536",
		"read -P 0x11 131072 65536")
	if code, out := qemuCheckCode(t, img); code != 0 {
		t.Fatalf("check: %d\n%s", code, out)
	}
}
