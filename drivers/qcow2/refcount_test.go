package qcow2

import (
	"encoding/json"
	"errors"
	"fmt"
	"math/rand"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"syscall"
	"testing"
	"time"

	"imgfuse/aio"
	"imgfuse/cache"
	"imgfuse/coroutine"
	"imgfuse/drivers"
	"imgfuse/drivers/driverstest"
)

func TestRefcountPackingLayout(t *testing.T) {
	// Known on-disk layouts: sub-byte entries LSB first, wider ones
	// big-endian.
	cases := []struct {
		order uint32
		i     int64
		v     uint64
		want  []byte
	}{
		{0, 0, 1, []byte{0x01, 0}},
		{0, 7, 1, []byte{0x80, 0}},
		{0, 8, 1, []byte{0, 0x01}},
		{1, 1, 3, []byte{0x0c, 0}},
		{1, 3, 2, []byte{0x80, 0}},
		{2, 1, 0xa, []byte{0xa0, 0}},
		{2, 2, 0x5, []byte{0, 0x05}},
		{3, 1, 0xfe, []byte{0, 0xfe}},
		{4, 0, 0x1234, []byte{0x12, 0x34, 0, 0}},
		{4, 1, 0x1234, []byte{0, 0, 0x12, 0x34}},
		{5, 1, 0x01020304, []byte{0, 0, 0, 0, 1, 2, 3, 4}},
		{6, 1, 0x0102030405060708, []byte{0, 0, 0, 0, 0, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8}},
	}
	for _, tc := range cases {
		b := make([]byte, len(tc.want))
		setRefcount(b, tc.order, tc.i, tc.v)
		if string(b) != string(tc.want) {
			t.Errorf("order %d: set entry %d to %#x: % x, want % x", tc.order, tc.i, tc.v, b, tc.want)
		}
		if got := getRefcount(b, tc.order, tc.i); got != tc.v {
			t.Errorf("order %d: get entry %d = %#x, want %#x", tc.order, tc.i, got, tc.v)
		}
	}
}

// TestRefcountPackingModel sets random entries of a block of each order
// and compares every entry with a plain slice after each step.
func TestRefcountPackingModel(t *testing.T) {
	seed := driverstest.Seed(t)
	rng := rand.New(rand.NewSource(seed))
	const blockBytes = 64
	for order := uint32(0); order <= 6; order++ {
		bitsPer := uint64(1) << order
		maxV := ^uint64(0) >> (64 - bitsPer)
		n := int64(blockBytes * 8 / bitsPer)
		b := make([]byte, blockBytes)
		model := make([]uint64, n)
		for step := 0; step < 500; step++ {
			i := rng.Int63n(n)
			var v uint64
			switch rng.Intn(3) {
			case 0:
				v = maxV
			case 1:
				v = 0
			default:
				v = rng.Uint64() & maxV
			}
			setRefcount(b, order, i, v)
			model[i] = v
			for j := range n {
				if got := getRefcount(b, order, j); got != model[j] {
					t.Fatalf("order %d step %d: after setting entry %d to %#x, entry %d = %#x, want %#x",
						order, step, i, v, j, got, model[j])
				}
			}
		}
	}
}

// testImage is an image file opened for the refcount tests.
type testImage struct {
	path  string
	f     *aio.File
	h     *header
	snaps []snapshotEntry
	rc    *refcounts
	mu    coroutine.CoMutex
}

// openRefcountTest opens path read-write with its refcounts loaded; it is
// closed at the end of the test (or earlier by close).
func openRefcountTest(t testing.TB, path string) *testImage {
	t.Helper()
	ti, err := openRefcountErr(t, path)
	if err != nil {
		t.Fatal(err)
	}
	return ti
}

// openRefcountErr is openRefcountTest returning errors from the image.
func openRefcountErr(t testing.TB, path string) (*testImage, error) {
	t.Helper()
	f, err := aio.Open(path, aio.Options{})
	if err != nil {
		t.Fatal(err)
	}
	ti := &testImage{path: path, f: f}
	t.Cleanup(func() { ti.close(t) })
	size, err := f.Size()
	if err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, min(int64(headerReadSize), size))
	if err := f.Pread(buf, 0); err != nil {
		t.Fatal(err)
	}
	if ti.h, err = parseHeader(buf, size); err != nil {
		return nil, err
	}
	read := func(off int64, p []byte) error { return f.Pread(p, off) }
	if ti.snaps, err = readSnapshotTable(read, ti.h); err != nil {
		return nil, err
	}
	if ti.rc, err = openRefcounts(nil, f, ti.h, size, nil); err != nil {
		return nil, err
	}
	ti.rc.mu = &ti.mu
	return ti, nil
}

func (ti *testImage) close(t testing.TB) {
	if ti.f != nil {
		if err := ti.f.Close(); err != nil {
			t.Error(err)
		}
		ti.f = nil
	}
}

// locked runs fn in a coroutine holding the image's metadata lock.
func (ti *testImage) locked(fn func(co *coroutine.Co)) {
	coroutine.Run(func(co *coroutine.Co) {
		ti.mu.Lock(co)
		defer ti.mu.Unlock(co)
		fn(co)
	})
}

// read returns a reader of the image for computeRefcounts, in co.
func (ti *testImage) read(co *coroutine.Co) func(off int64, p []byte) error {
	return func(off int64, p []byte) error { return ti.f.PreadCo(co, p, off) }
}

// qemuCheck runs qemu-img check and returns its exit code and its counts.
func qemuCheck(t testing.TB, path string) (code int, corruptions, leaks int, out string) {
	t.Helper()
	c := exec.Command("qemu-img", "check", "-U", "--output=json", path)
	stdout, err := c.Output()
	var ee *exec.ExitError
	switch {
	case err == nil:
	case errors.As(err, &ee):
		code = ee.ExitCode()
	default:
		t.Fatalf("qemu-img check: %v", err)
	}
	var res struct {
		Corruptions int `json:"corruptions"`
		Leaks       int `json:"leaks"`
	}
	if len(stdout) > 0 {
		if err := json.Unmarshal(stdout, &res); err != nil {
			t.Fatalf("qemu-img check output %q: %v", stdout, err)
		}
	}
	return code, res.Corruptions, res.Leaks, string(stdout)
}

func wantQemuCheck(t testing.TB, path string, wantCode, wantCorrupt, wantLeaks int) {
	t.Helper()
	code, c, l, out := qemuCheck(t, path)
	if code != wantCode || c != wantCorrupt || l != wantLeaks {
		errOut, _ := exec.Command("qemu-img", "check", "-U", path).CombinedOutput()
		t.Fatalf("qemu-img check %s: exit %d, %d corruptions, %d leaks; want exit %d, %d, %d\n%s\n%s",
			path, code, c, l, wantCode, wantCorrupt, wantLeaks, out, errOut)
	}
}

// refcountImage creates a qcow2 image in dir with the given refcount bits
// and cluster size, and writes data, zeros and a compressed cluster with
// qemu-io.
func refcountImage(t testing.TB, dir string, bits int, cs int64) string {
	t.Helper()
	path := filepath.Join(dir, fmt.Sprintf("rc%d-%d.qcow2", bits, cs))
	qemuImg(t, "create", "-q", "-f", "qcow2", "-o",
		fmt.Sprintf("refcount_bits=%d,cluster_size=%d", bits, cs), path, "16M")
	driverstest.QemuIO(t, path,
		"write -P 0xa1 0 100k",
		"write -P 0xa2 3M 5k",
		"write -z 5M 64k",
		fmt.Sprintf("write -c -P 0xa3 %d %d", 8<<20, cs),
		fmt.Sprintf("write -c -P 0xa4 %d %d", 8<<20+cs, cs),
	)
	return path
}

// TestRefcountGetMatchesComputed: on qemu-built images of every refcount
// width and three cluster sizes, the stored refcount of every cluster
// (getLocked) equals the references computeRefcounts counts, and qemu-img
// check agrees the image is clean.
func TestRefcountGetMatchesComputed(t *testing.T) {
	requireQemu(t)
	dir := t.TempDir()
	for _, cs := range []int64{512, 64 << 10, 2 << 20} {
		for order := 0; order <= 6; order++ {
			bits := 1 << order
			if cs == 2<<20 && order != 0 && order != 6 {
				continue // keep the run short: the extremes suffice
			}
			t.Run(fmt.Sprintf("cluster%d-bits%d", cs, bits), func(t *testing.T) {
				path := refcountImage(t, dir, bits, cs)
				wantQemuCheck(t, path, 0, 0, 0)
				ti := openRefcountTest(t, path)
				ti.locked(func(co *coroutine.Co) {
					size, _ := ti.f.Size()
					calc, err := computeRefcounts(ti.read(co), ti.h, size, ti.snaps)
					if err != nil {
						t.Fatal(err)
					}
					if calc.res.Corruptions != 0 {
						t.Fatalf("walk found corruptions: %v", calc.res.Errors)
					}
					used := 0
					for i, want := range calc.counts {
						got, err := ti.rc.getLocked(co, int64(i))
						if err != nil {
							t.Fatal(err)
						}
						if got != want {
							t.Fatalf("cluster %d: stored refcount %d, counted %d", i, got, want)
						}
						if want > 0 {
							used++
						}
					}
					if used < 6 {
						t.Fatalf("only %d clusters in use: the image is not what the test meant", used)
					}
					res, err := ti.rc.checkLocked(co, ti.read(co), ti.snaps)
					if err != nil || res.Corruptions != 0 || res.Leaks != 0 {
						t.Fatalf("checkLocked = %+v, %v", res, err)
					}
				})
			})
		}
	}
}

// writeClusters writes a pattern over n clusters at off, as a data write
// would, so the file covers them.
func writeClusters(co *coroutine.Co, f *aio.File, off, n, cs int64) error {
	buf := aio.AlignedBuffer(int(n * cs))
	for i := range buf {
		buf[i] = 0x5a
	}
	return f.PwriteCo(co, buf, off)
}

// TestRefcountAllocate allocates clusters one by one and in runs on fresh
// 512-byte-cluster images with 1- and 64-bit refcounts, which forces new
// refcount blocks and reftable growth. Nothing references the clusters, so
// qemu-img check must report exactly that many leaks and no corruption;
// after freeing them all it must report a clean image.
func TestRefcountAllocate(t *testing.T) {
	requireQemu(t)
	seed := driverstest.Seed(t)
	for _, tc := range []struct {
		bits   int
		single int   // allocations of one cluster
		runs   int   // allocations of run clusters
		run    int64 // clusters per run
	}{
		{64, 3000, 40, 100}, // 64 refcounts a block: the reftable grows past 64 blocks
		{1, 2000, 70, 4000}, // 4096 refcounts a block: >262144 clusters to grow the reftable
		{16, 1500, 20, 300}, // the default width
		{2, 500, 10, 20000}, // runs longer than a block
	} {
		t.Run(fmt.Sprintf("bits%d", tc.bits), func(t *testing.T) {
			rng := rand.New(rand.NewSource(seed))
			path := filepath.Join(t.TempDir(), "a.qcow2")
			qemuImg(t, "create", "-q", "-f", "qcow2", "-o",
				fmt.Sprintf("refcount_bits=%d,cluster_size=512", tc.bits), path, "64M")
			ti := openRefcountTest(t, path)
			const cs = 512
			type alloc struct{ off, n int64 }
			var allocs []alloc
			total := int64(0)
			oldReftable := ti.h.ReftableOffset
			oldCover := int64(ti.h.ReftableClusters) * cs / 8 << ti.rc.blockBits
			ti.locked(func(co *coroutine.Co) {
				ops := make([]int64, 0, tc.single+tc.runs)
				for range tc.single {
					ops = append(ops, 1)
				}
				for range tc.runs {
					ops = append(ops, tc.run)
				}
				rng.Shuffle(len(ops), func(i, j int) { ops[i], ops[j] = ops[j], ops[i] })
				seen := make(map[int64]bool)
				for _, n := range ops {
					off, err := ti.rc.allocLocked(co, n)
					if err != nil {
						t.Fatalf("allocLocked(%d) after %d clusters: %v", n, total, err)
					}
					if off <= 0 || off%cs != 0 {
						t.Fatalf("allocLocked(%d) = %#x", n, off)
					}
					for c := off / cs; c < off/cs+n; c++ {
						if seen[c] {
							t.Fatalf("cluster %d handed out twice", c)
						}
						seen[c] = true
						rc, err := ti.rc.getLocked(co, c)
						if err != nil || rc != 1 {
							t.Fatalf("cluster %d just allocated has refcount %d, %v", c, rc, err)
						}
					}
					allocs = append(allocs, alloc{off, n})
					total += n
				}
				// Write the clusters (the highest one is enough for the
				// file to cover them all, but a data write covers each).
				last := allocs[0]
				for _, a := range allocs {
					if a.off > last.off {
						last = a
					}
				}
				if err := writeClusters(co, ti.f, last.off, last.n, cs); err != nil {
					t.Fatal(err)
				}
				if err := ti.rc.flushLocked(co); err != nil {
					t.Fatal(err)
				}
				res, err := ti.rc.checkLocked(co, ti.read(co), nil)
				if err != nil || res.Corruptions != 0 || res.Leaks != int(total) {
					t.Fatalf("checkLocked after allocating %d clusters: %d corruptions, %d leaks, %v; %q",
						total, res.Corruptions, res.Leaks, err, res.Errors[:min(5, len(res.Errors))])
				}
			})
			if ti.h.ReftableOffset == oldReftable && total > oldCover {
				t.Errorf("the refcount table never grew (still at %#x), yet %d clusters were allocated and it covered %d",
					oldReftable, total, oldCover)
			}
			wantQemuCheck(t, path, 3, 0, int(total))

			ti.locked(func(co *coroutine.Co) {
				rng.Shuffle(len(allocs), func(i, j int) { allocs[i], allocs[j] = allocs[j], allocs[i] })
				for _, a := range allocs {
					if err := ti.rc.updateLocked(co, a.off, a.n*cs, -1); err != nil {
						t.Fatal(err)
					}
				}
				// A second free of a cluster is a corruption, not a wrap.
				err := ti.rc.updateLocked(co, allocs[0].off, cs, -1)
				if !errors.Is(err, drivers.ErrCorrupt) {
					t.Errorf("freeing a free cluster: %v, want ErrCorrupt", err)
				}
				if err := ti.rc.flushLocked(co); err != nil {
					t.Fatal(err)
				}
			})
			wantQemuCheck(t, path, 0, 0, 0)

			// Freed clusters are reused: the next allocation starts at
			// or below the lowest cluster freed.
			lowest := allocs[0].off
			for _, a := range allocs {
				lowest = min(lowest, a.off)
			}
			ti.locked(func(co *coroutine.Co) {
				off, err := ti.rc.allocLocked(co, 1)
				if err != nil {
					t.Fatal(err)
				}
				if off > lowest {
					t.Fatalf("allocated cluster %#x after freeing everything from %#x", off, lowest)
				}
				if err := ti.rc.updateLocked(co, off, cs, -1); err != nil {
					t.Fatal(err)
				}
				if err := ti.rc.flushLocked(co); err != nil {
					t.Fatal(err)
				}
			})
			wantQemuCheck(t, path, 0, 0, 0)
		})
	}
}

// TestRefcountReopenAfterGrowth: after reftable growth the header points
// at the new table, so a fresh open sees the same refcounts.
func TestRefcountReopenAfterGrowth(t *testing.T) {
	requireQemu(t)
	path := filepath.Join(t.TempDir(), "g.qcow2")
	qemuImg(t, "create", "-q", "-f", "qcow2", "-o", "refcount_bits=64,cluster_size=512", path, "8M")
	ti := openRefcountTest(t, path)
	var offs []int64
	ti.locked(func(co *coroutine.Co) {
		for range 6000 {
			off, err := ti.rc.allocLocked(co, 1)
			if err != nil {
				t.Fatal(err)
			}
			offs = append(offs, off)
		}
		if err := ti.rc.updateLocked(co, offs[10], 512, 2); err != nil {
			t.Fatal(err)
		}
		if err := writeClusters(co, ti.f, slices.Max(offs), 1, 512); err != nil {
			t.Fatal(err)
		}
		if err := ti.rc.flushLocked(co); err != nil {
			t.Fatal(err)
		}
	})
	hdrOff, hdrClusters := fileBE64(t, path, 48), fileBE64(t, path, 56)>>32
	if hdrOff != ti.h.ReftableOffset || uint32(hdrClusters) != ti.h.ReftableClusters {
		t.Fatalf("header says reftable %#x (%d clusters), memory %#x (%d)", hdrOff, hdrClusters, ti.h.ReftableOffset, ti.h.ReftableClusters)
	}
	ti.close(t)
	t2 := openRefcountTest(t, path)
	t2.locked(func(co *coroutine.Co) {
		for i, off := range offs {
			want := uint64(1)
			if i == 10 {
				want = 3
			}
			if rc, err := t2.rc.getLocked(co, off/512); err != nil || rc != want {
				t.Fatalf("cluster %#x: refcount %d, %v; want %d", off, rc, err, want)
			}
		}
	})
	wantQemuCheck(t, path, 3, 0, len(offs))
}

// TestRefcountOverflow: raising a refcount past refcount_max fails without
// changing anything.
func TestRefcountOverflow(t *testing.T) {
	requireQemu(t)
	path := filepath.Join(t.TempDir(), "o.qcow2")
	qemuImg(t, "create", "-q", "-f", "qcow2", "-o", "refcount_bits=2", path, "1M")
	ti := openRefcountTest(t, path)
	ti.locked(func(co *coroutine.Co) {
		off, err := ti.rc.allocLocked(co, 2)
		if err != nil {
			t.Fatal(err)
		}
		if err := ti.rc.updateLocked(co, off+ti.rc.clusterSize, 1, 2); err != nil {
			t.Fatal(err) // second cluster: 3 = max
		}
		err = ti.rc.updateLocked(co, off, 2*ti.rc.clusterSize, 1)
		if !errors.Is(err, drivers.ErrUnsupported) {
			t.Fatalf("overflow: %v, want ErrUnsupported", err)
		}
		for i, want := range []uint64{1, 3} {
			if rc, _ := ti.rc.getLocked(co, off/ti.rc.clusterSize+int64(i)); rc != want {
				t.Errorf("after the failed update cluster %d has refcount %d, want %d", i, rc, want)
			}
		}
	})
}

// diskRefcount reads the refcount of cluster c from the file itself.
func diskRefcount(t testing.TB, path string, c int64) uint64 {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	h, err := parseHeader(b[:min(len(b), headerReadSize)], int64(len(b)))
	if err != nil {
		t.Fatal(err)
	}
	blockBits := h.ClusterBits + 3 - h.RefcountOrder
	ti := c >> blockBits
	if int64(h.ReftableOffset)+ti*8+8 > int64(len(b)) {
		return 0
	}
	rb := int64(be.Uint64(b[int64(h.ReftableOffset)+ti*8:]))
	if rb == 0 || rb >= int64(len(b)) {
		return 0
	}
	return getRefcount(b[rb:rb+h.clusterSize()], h.RefcountOrder, c&(1<<blockBits-1))
}

// probeBackend is an L2 cache backend that records, at each table write,
// the on-disk refcount of one cluster.
type probeBackend struct {
	t       testing.TB
	path    string
	cluster int64
	seen    []uint64
}

func (b *probeBackend) ReadTable(co *coroutine.Co, off int64, p []byte) error {
	clear(p)
	return nil
}

func (b *probeBackend) WriteTable(co *coroutine.Co, off int64, p []byte) error {
	b.seen = append(b.seen, diskRefcount(b.t, b.path, b.cluster))
	return nil
}

func (b *probeBackend) Sync(co *coroutine.Co) error { return nil }

// TestRefcountOrdering: an allocation reaches the disk before an L2 table
// written after it (the L2 cache depends on the refcount cache), and a
// decrease reaches the disk only after the L2 tables (the refcount cache
// depends on the L2 cache).
func TestRefcountOrdering(t *testing.T) {
	requireQemu(t)
	path := filepath.Join(t.TempDir(), "ord.qcow2")
	qemuImg(t, "create", "-q", "-f", "qcow2", path, "64M")
	f, err := aio.Open(path, aio.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	size, _ := f.Size()
	buf := make([]byte, size)
	if err := f.Pread(buf, 0); err != nil {
		t.Fatal(err)
	}
	h, err := parseHeader(buf, size)
	if err != nil {
		t.Fatal(err)
	}
	probe := &probeBackend{t: t, path: path}
	l2 := cache.New("probe L2", 4, int(h.clusterSize()), probe)
	rc, err := openRefcounts(nil, f, h, size, l2)
	if err != nil {
		t.Fatal(err)
	}
	var mu coroutine.CoMutex
	rc.mu = &mu
	coroutine.Run(func(co *coroutine.Co) {
		mu.Lock(co)
		defer mu.Unlock(co)
		off, err := rc.allocLocked(co, 1)
		if err != nil {
			t.Fatal(err)
		}
		probe.cluster = off >> h.ClusterBits
		// The image's rule for an L2 entry about to point at the
		// cluster (refcountsBeforeL2Locked).
		if err := l2.SetDependency(co, rc.cache); err != nil {
			t.Fatal(err)
		}
		if got := diskRefcount(t, path, probe.cluster); got != 0 {
			t.Fatalf("refcount on disk right after allocLocked is %d: the test needs it cached", got)
		}
		dirtyL2 := func() {
			tb, err := l2.Get(co, 1<<30)
			if err != nil {
				t.Fatal(err)
			}
			tb.Bytes()[0] ^= 1
			l2.MarkDirty(tb)
			l2.Put(tb)
		}
		dirtyL2()
		if err := l2.Write(co); err != nil {
			t.Fatal(err)
		}
		if err := rc.updateLocked(co, off, 1, -1); err != nil {
			t.Fatal(err)
		}
		dirtyL2()
		if err := rc.writeLocked(co); err != nil {
			t.Fatal(err)
		}
		if len(probe.seen) != 2 || probe.seen[0] != 1 || probe.seen[1] != 1 {
			t.Fatalf("on-disk refcount at the L2 writes: %v, want [1 1] (raised before, lowered after)", probe.seen)
		}
		if got := diskRefcount(t, path, probe.cluster); got != 0 {
			t.Fatalf("refcount on disk after the write-back is %d, want 0", got)
		}
	})
}

// BenchmarkAllocLocked measures allocating one cluster at a time on a fresh
// 512-byte-cluster image, refcount blocks and reftable growth included, with
// a flush every 1024 allocations.
func BenchmarkAllocLocked(b *testing.B) {
	requireQemu(b)
	path := filepath.Join(b.TempDir(), "bench.qcow2")
	qemuImg(b, "create", "-q", "-f", "qcow2", "-o", "cluster_size=512", path, "1G")
	ti := openRefcountTest(b, path)
	b.ResetTimer()
	ti.locked(func(co *coroutine.Co) {
		for i := range b.N {
			if _, err := ti.rc.allocLocked(co, 1); err != nil {
				b.Fatal(err)
			}
			if i%1024 == 1023 {
				if err := ti.rc.flushLocked(co); err != nil {
					b.Fatal(err)
				}
			}
		}
	})
}

// TestRefcountRandomModel applies a seeded random sequence of allocations,
// raises and frees to fresh 512-byte-cluster images and to a map, checking
// the refcounts of the touched clusters after each step, all of them after
// a reopen, and qemu-img check's leak count (nothing references the
// clusters, so every cluster the model holds is a leak).
func TestRefcountRandomModel(t *testing.T) {
	requireQemu(t)
	seed := driverstest.Seed(t)
	for _, bits := range []int{1, 8, 64} {
		t.Run(fmt.Sprintf("bits%d", bits), func(t *testing.T) {
			rng := rand.New(rand.NewSource(seed + int64(bits)))
			path := filepath.Join(t.TempDir(), "m.qcow2")
			qemuImg(t, "create", "-q", "-f", "qcow2", "-o",
				fmt.Sprintf("refcount_bits=%d,cluster_size=512", bits), path, "64M")
			const cs = 512
			maxRC := ^uint64(0) >> (64 - bits)
			model := make(map[int64]uint64) // cluster -> refcount
			var held []int64
			ti := openRefcountTest(t, path)
			ti.locked(func(co *coroutine.Co) {
				check := func(c int64) {
					if got, err := ti.rc.getLocked(co, c); err != nil || got != model[c] {
						t.Fatalf("cluster %d: refcount %d, %v; model %d", c, got, err, model[c])
					}
				}
				steps := 3000
				if bits == 64 {
					steps = 1000 // 64 refcounts a block: many blocks to scan
				}
				for step := range steps {
					switch op := rng.Intn(10); {
					case op < 5 || len(held) == 0:
						n := int64(1 + rng.Intn(40))
						if rng.Intn(20) == 0 {
							n = int64(1 + rng.Intn(3000))
						}
						off, err := ti.rc.allocLocked(co, n)
						if err != nil {
							t.Fatalf("step %d: alloc %d: %v", step, n, err)
						}
						for c := off / cs; c < off/cs+n; c++ {
							if model[c] != 0 {
								t.Fatalf("step %d: cluster %d handed out with model refcount %d", step, c, model[c])
							}
							model[c] = 1
							held = append(held, c)
							check(c)
						}
					case op < 7:
						c := held[rng.Intn(len(held))]
						err := ti.rc.updateLocked(co, c*cs+int64(rng.Intn(cs)), 1, 1)
						if model[c] == maxRC {
							if !errors.Is(err, drivers.ErrUnsupported) {
								t.Fatalf("step %d: overflow of cluster %d: %v", step, c, err)
							}
						} else if err != nil {
							t.Fatalf("step %d: raise cluster %d: %v", step, c, err)
						} else {
							model[c]++
						}
						check(c)
					default:
						i := rng.Intn(len(held))
						c := held[i]
						if err := ti.rc.updateLocked(co, c*cs, cs, -1); err != nil {
							t.Fatalf("step %d: lower cluster %d: %v", step, c, err)
						}
						model[c]--
						if model[c] == 0 {
							delete(model, c)
							held[i] = held[len(held)-1]
							held = held[:len(held)-1]
						}
						check(c)
					}
				}
				var top int64
				for c := range model {
					top = max(top, c)
				}
				if err := writeClusters(co, ti.f, top*cs, 1, cs); err != nil {
					t.Fatal(err)
				}
				if err := ti.rc.flushLocked(co); err != nil {
					t.Fatal(err)
				}
			})
			ti.close(t)
			t2 := openRefcountTest(t, path)
			t2.locked(func(co *coroutine.Co) {
				for c, want := range model {
					if got, err := t2.rc.getLocked(co, c); err != nil || got != want {
						t.Fatalf("after reopen: cluster %d: refcount %d, %v; model %d", c, got, err, want)
					}
				}
			})
			wantQemuCheck(t, path, 3, 0, len(model))
		})
	}
}

// crashChildEnv names the image the crash child allocates in.
const crashChildEnv = "IMGFUSE_REFCOUNT_CRASH_CHILD"

// TestRefcountCrashChild is the process TestRefcountCrash kills: it
// allocates, writes, frees and flushes until it is killed.
func TestRefcountCrashChild(t *testing.T) {
	path := os.Getenv(crashChildEnv)
	if path == "" {
		return // only run as TestRefcountCrash's child
	}
	ti := openRefcountTest(t, path)
	rng := rand.New(rand.NewSource(int64(os.Getpid())))
	cs := ti.rc.clusterSize
	ti.locked(func(co *coroutine.Co) {
		var held []int64
		for i := 0; ; i++ {
			n := int64(1 + rng.Intn(8))
			off, err := ti.rc.allocLocked(co, n)
			if err != nil {
				t.Fatal(err)
			}
			if err := writeClusters(co, ti.f, off, n, cs); err != nil {
				t.Fatal(err)
			}
			for c := range n {
				held = append(held, off+c*cs)
			}
			if rng.Intn(3) == 0 {
				j := rng.Intn(len(held))
				if err := ti.rc.updateLocked(co, held[j], cs, -1); err != nil {
					t.Fatal(err)
				}
				held[j] = held[len(held)-1]
				held = held[:len(held)-1]
			}
			if rng.Intn(50) == 0 {
				if err := ti.rc.flushLocked(co); err != nil {
					t.Fatal(err)
				}
			}
		}
	})
}

// TestRefcountCrash kills a process that allocates and frees clusters
// (creating refcount blocks and growing the reftable as it goes) at random
// moments: the clusters are referenced by nothing, so qemu-img check may
// find leaks but never a corruption, and neither may the checker.
func TestRefcountCrash(t *testing.T) {
	requireQemu(t)
	seed := driverstest.Seed(t)
	rng := rand.New(rand.NewSource(seed))
	for _, opts := range []string{"refcount_bits=64,cluster_size=512", "refcount_bits=4,cluster_size=512"} {
		t.Run(opts, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "crash.qcow2")
			qemuImg(t, "create", "-q", "-f", "qcow2", "-o", opts, path, "64M")
			startTable := fileBE64(t, path, 48)
			for round := range 6 {
				cmd := exec.Command(os.Args[0], "-test.run=^TestRefcountCrashChild$", "-test.count=1")
				cmd.Env = append(os.Environ(), crashChildEnv+"="+path)
				if err := cmd.Start(); err != nil {
					t.Fatal(err)
				}
				time.Sleep(time.Duration(100+rng.Intn(400)) * time.Millisecond)
				cmd.Process.Kill()
				err := cmd.Wait()
				if ws, ok := cmd.ProcessState.Sys().(syscall.WaitStatus); !ok || !ws.Signaled() {
					t.Fatalf("round %d: the child was not killed but ended: %v", round, err)
				}
				code, corr, leaks, _ := qemuCheck(t, path)
				if code != 0 && code != 3 || corr != 0 {
					out, _ := exec.Command("qemu-img", "check", path).CombinedOutput()
					t.Fatalf("round %d: qemu-img check exit %d, %d corruptions:\n%s", round, code, corr, out)
				}
				ti := openRefcountTest(t, path)
				ti.locked(func(co *coroutine.Co) {
					res, err := ti.rc.checkLocked(co, ti.read(co), ti.snaps)
					if err != nil || res.Corruptions != 0 || res.Leaks != leaks {
						t.Fatalf("round %d: check: %d corruptions, %d leaks (qemu-img: %d), %v", round, res.Corruptions, res.Leaks, leaks, err)
					}
				})
				ti.close(t)
			}
			st, _ := os.Stat(path)
			t.Logf("%s: file %d bytes, reftable at %#x (was %#x)", opts, st.Size(), fileBE64(t, path, 48), startTable)
		})
	}
}
