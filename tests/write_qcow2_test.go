package tests

import (
	"bytes"
	"fmt"
	"math/rand"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"imgfuse/drivers/driverstest"
)

// writeSize is the virtual size of the images the write tests mount.
const writeSize = 32 << 20

// writeImage is a starting image for the metamorphic workload.
type writeImage struct {
	name string
	// build creates the image in dir and returns it with the files that
	// must not change (backing files).
	build func(t *testing.T, dir string) (img string, backing []string)
	// snapshot names an internal snapshot that must read the same after
	// the workload.
	snapshot string
	raw      bool
	// flags are extra mount flags.
	flags []string
	// rawData is an external data file with data_file_raw=on: it must
	// read as the disk itself.
	rawData string
}

func createQcow2(t *testing.T, dir, opts string) string {
	img := filepath.Join(dir, "img.qcow2")
	args := []string{"create", "-q", "-f", "qcow2"}
	if opts != "" {
		args = append(args, "-o", opts)
	}
	driverstest.Cmd(t, "qemu-img", append(args, img, fmtSize(writeSize))...)
	return img
}

// randomFull writes a raw file of random bytes with no hole.
func randomFull(t *testing.T, path string, size, seed int64) {
	b := make([]byte, size)
	rand.New(rand.NewSource(seed)).Read(b)
	writeModel(t, path, b)
}

func writeImages() []writeImage {
	fresh := func(opts string) func(*testing.T, string) (string, []string) {
		return func(t *testing.T, dir string) (string, []string) {
			img := createQcow2(t, dir, opts)
			// Some data to overwrite in place and to COW from.
			driverstest.QemuIO(t, img, driverstest.Scatter(writeSize, 65536, 1)...)
			return img, nil
		}
	}
	zstdImage := func(t *testing.T, dir, name string) string {
		src := filepath.Join(dir, name+".src.raw")
		driverstest.RandomRaw(t, src, writeSize, 77)
		img := filepath.Join(dir, name)
		driverstest.Cmd(t, "qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2", "-o", "compression_type=zstd", src, img)
		os.Remove(src)
		return img
	}
	return []writeImage{
		{name: "raw", raw: true, build: func(t *testing.T, dir string) (string, []string) {
			img := filepath.Join(dir, "img.raw")
			driverstest.RandomRaw(t, img, writeSize, 3)
			return img, nil
		}},
		{name: "fresh", build: func(t *testing.T, dir string) (string, []string) {
			return createQcow2(t, dir, ""), nil
		}},
		{name: "scattered", build: fresh("")},
		{name: "cluster512", build: fresh("cluster_size=512")},
		{name: "cluster2M", build: fresh("cluster_size=2097152")},
		{name: "refcount1", build: fresh("refcount_bits=1")},
		{name: "refcount64", build: fresh("refcount_bits=64")},
		{name: "compat0.10", build: fresh("compat=0.10")},
		{name: "extended-l2", build: fresh("extended_l2=on")},
		{name: "lazy-refcounts", build: fresh("lazy_refcounts=on")},
		{name: "lazy-refcounts-flag", build: fresh(""), flags: []string{"--lazy-refcounts"}},
		{name: "converted", build: func(t *testing.T, dir string) (string, []string) {
			src := filepath.Join(dir, "src.raw")
			randomFull(t, src, writeSize, 5)
			img := filepath.Join(dir, "img.qcow2")
			driverstest.Cmd(t, "qemu-img", "convert", "-f", "raw", "-O", "qcow2", src, img)
			os.Remove(src)
			return img, nil
		}},
		{name: "zstd", build: func(t *testing.T, dir string) (string, []string) {
			return zstdImage(t, dir, "img.qcow2"), nil
		}},
		{name: "overlay-on-compressed", build: func(t *testing.T, dir string) (string, []string) {
			b := zstdImage(t, dir, "base.qcow2")
			img := filepath.Join(dir, "img.qcow2")
			driverstest.Cmd(t, "qemu-img", "create", "-q", "-f", "qcow2", "-b", b, "-F", "qcow2", img, fmtSize(writeSize))
			driverstest.QemuIO(t, img, driverstest.Scatter(writeSize, 65536, 2)...)
			return img, []string{b}
		}},
		{name: "chain-raw-qcow2-qcow2-overlay", build: func(t *testing.T, dir string) (string, []string) {
			var chain driverstest.Image
			for _, c := range driverstest.Catalogue(writeSize) {
				if c.Name == "chain-raw-qcow2-qcow2" {
					chain = c
				}
			}
			if chain.Build == nil {
				t.Fatal("catalogue has no chain-raw-qcow2-qcow2")
			}
			top := chain.Build(t, dir, writeSize)
			img := filepath.Join(dir, "overlay.qcow2")
			driverstest.Cmd(t, "qemu-img", "create", "-q", "-f", "qcow2", "-b", top, "-F", "qcow2", img, fmtSize(writeSize))
			return img, []string{top, filepath.Join(dir, "mid.qcow2"), filepath.Join(dir, "base.raw")}
		}},
		{name: "data-file", build: func(t *testing.T, dir string) (string, []string) {
			return fresh("data_file="+filepath.Join(dir, "img.data"))(t, dir)
		}},
		{name: "data-file-raw", rawData: "img.data", build: func(t *testing.T, dir string) (string, []string) {
			return fresh("data_file="+filepath.Join(dir, "img.data")+",data_file_raw=on")(t, dir)
		}},
		{name: "extended-l2-overlay", build: func(t *testing.T, dir string) (string, []string) {
			// Subcluster writes over a backing file: the other
			// subclusters of a cluster keep reading the backing file.
			b := filepath.Join(dir, "base.raw")
			randomFull(t, b, writeSize, 8)
			img := filepath.Join(dir, "img.qcow2")
			driverstest.Cmd(t, "qemu-img", "create", "-q", "-f", "qcow2", "-b", b, "-F", "raw", "-o", "extended_l2=on", img, fmtSize(writeSize))
			return img, []string{b}
		}},
		{name: "snapshot", snapshot: "s1", build: func(t *testing.T, dir string) (string, []string) {
			img, _ := fresh("")(t, dir)
			driverstest.Cmd(t, "qemu-img", "snapshot", "-c", "s1", img)
			driverstest.QemuIO(t, img, driverstest.Scatter(writeSize, 65536, 3)...)
			return img, nil
		}},
	}
}

// TestWriteWorkload runs the seeded metamorphic workload through the mount
// on every starting image and then asks qemu-img whether the image holds
// the model (compare) and is consistent (check).
func TestWriteWorkload(t *testing.T) {
	t.Parallel()
	requireE2E(t)
	seed := writeSeed(t)
	for i, wi := range writeImages() {
		t.Run(wi.name, func(t *testing.T) {
			t.Parallel()
			dir := t.TempDir()
			img, backing := wi.build(t, dir)
			keep := freeze(t, backing...)
			var model []byte
			var snapRef string
			var err error
			if wi.raw {
				model, err = os.ReadFile(img)
			} else {
				model, err = os.ReadFile(driverstest.ConvertRef(t, img, "", t.TempDir()))
				if wi.snapshot != "" {
					snapRef = driverstest.ConvertRef(t, img, wi.snapshot, t.TempDir())
				}
			}
			if err != nil {
				t.Fatal(err)
			}
			mp, disk := mount(t, img, false, wi.flags...)
			w := newWorkload(t, disk, model, seed+int64(i))
			w.run(200)
			w.f.Close()
			w.direct.Close()
			unmountBusyRetry(t, mp)

			modelPath := filepath.Join(dir, "model.raw")
			writeModel(t, modelPath, w.model)
			if wi.raw {
				compareFiles(t, img, modelPath)
				return
			}
			qemuCompare(t, img, modelPath)
			requireClean(t, img)
			if dirtyBit(t, img) {
				t.Errorf("the dirty bit is still set after a clean unmount")
			}
			keep.check(t)
			if snapRef != "" {
				compareFiles(t, driverstest.ConvertRef(t, img, wi.snapshot, t.TempDir()), snapRef)
			}
			if wi.rawData != "" {
				compareFiles(t, filepath.Join(dir, wi.rawData), modelPath)
			}
		})
	}
}

// TestQcow2ConvertInto is the QEMU 7.2 FUSE export's shared-buffer bug on
// a qcow2 mount: qemu-img convert with O_DIRECT and 16 parallel requests
// into the exposed disk allocates clusters concurrently.
func TestQcow2ConvertInto(t *testing.T) {
	requireE2E(t)
	t.Parallel()
	dir := t.TempDir()
	src := filepath.Join(dir, "src.raw")
	randomFull(t, src, writeSize, 11)
	img := createQcow2(t, dir, "")
	mp, disk := mount(t, img, false)
	driverstest.Cmd(t, "qemu-img", "convert", "-n", "-t", "none", "-m", "16", "-W", "-f", "raw", "-O", "raw", src, disk)
	driverstest.Cmd(t, "qemu-img", "compare", "-f", "raw", "-F", "raw", src, disk)
	unmountBusyRetry(t, mp)
	qemuCompare(t, img, src)
	requireClean(t, img)
}

// TestQcow2Fio runs fio random 4k writes with libaio at queue depth 16 and
// crc32c verification on a fresh qcow2 mount, so allocations race.
func TestQcow2Fio(t *testing.T) {
	requireE2E(t, "fio")
	t.Parallel()
	dir := t.TempDir()
	img := createQcow2(t, dir, "")
	mp, disk := mount(t, img, false)
	cmd := exec.Command("fio", "--name=verify", "--filename="+disk, "--size=32M",
		"--direct=1", "--ioengine=libaio", "--iodepth=16", "--rw=randwrite",
		"--bs=4k", "--verify=crc32c", "--do_verify=1", "--verify_fatal=1")
	cmd.Dir = t.TempDir()
	out, err := cmd.CombinedOutput()
	if err != nil || bytes.Contains(out, []byte("verify:")) && bytes.Contains(out, []byte("bad")) {
		t.Fatalf("fio: %v\n%s", err, out)
	}
	ref := filepath.Join(dir, "mounted.raw")
	driverstest.Cmd(t, "cp", "--sparse=never", disk, ref)
	unmountBusyRetry(t, mp)
	qemuCompare(t, img, ref)
	requireClean(t, img)
}

// TestQcow2LoopDirectIO puts a loop device with --direct-io=on on a qcow2
// mount (and a raw one), makes and fills an ext4 filesystem through it,
// and checks the filesystem and the image.
func TestQcow2LoopDirectIO(t *testing.T) {
	t.Parallel()
	requireE2E(t, "losetup", "mkfs.ext4", "e2fsck", "mount", "umount")
	_, err := os.Stat("/dev/loop-control")
	driverstest.SkipUnless(t, err == nil, "/dev/loop-control: %v", err)
	for _, format := range []string{"qcow2", "raw"} {
		t.Run(format, func(t *testing.T) {
			t.Parallel()
			dir := t.TempDir()
			src := filepath.Join(dir, "src")
			buildTree(t, src)
			want := treeSummary(t, src)
			img := filepath.Join(dir, "img."+format)
			driverstest.Cmd(t, "qemu-img", "create", "-q", "-f", format, img, "64M")
			mp, disk := mount(t, img, false)

			dev := strings.TrimSpace(string(driverstest.Cmd(t, "losetup", "--direct-io=on", "--show", "-f", disk)))
			attached := true
			detach := func() {
				if attached {
					if out, err := exec.Command("losetup", "-d", dev).CombinedOutput(); err != nil {
						t.Errorf("losetup -d %s: %v\n%s", dev, err, out)
					}
					attached = false
					waitLoopDetached(t, disk)
				}
			}
			t.Cleanup(detach)
			if b, err := os.ReadFile(fmt.Sprintf("/sys/block/%s/loop/dio", filepath.Base(dev))); err == nil && strings.TrimSpace(string(b)) != "1" {
				t.Errorf("%s: direct I/O is off (loop/dio = %s)", dev, strings.TrimSpace(string(b)))
			}
			driverstest.Cmd(t, "mkfs.ext4", "-q", "-b", "4096", dev)
			fsMP := filepath.Join(dir, "fs")
			if err := os.Mkdir(fsMP, 0o755); err != nil {
				t.Fatal(err)
			}
			driverstest.Cmd(t, "mount", "-t", "ext4", dev, fsMP)
			fsMounted := true
			t.Cleanup(func() {
				if fsMounted {
					exec.Command("umount", "-l", fsMP).Run()
				}
			})
			driverstest.Cmd(t, "cp", "-a", src+"/.", fsMP)
			driverstest.Cmd(t, "umount", fsMP)
			fsMounted = false
			detach()
			driverstest.Cmd(t, "e2fsck", "-fn", disk)

			// The filesystem reads back through a fresh loop device.
			driverstest.Cmd(t, "mount", "-t", "ext4", "-o", "loop,ro", disk, fsMP)
			fsMounted = true
			got := treeSummary(t, fsMP)
			driverstest.Cmd(t, "umount", fsMP)
			fsMounted = false
			waitLoopDetached(t, disk)
			compareTrees(t, got, want)
			unmountBusyRetry(t, mp)
			if format == "qcow2" {
				requireClean(t, img)
			} else {
				driverstest.Cmd(t, "e2fsck", "-fn", img)
			}
		})
	}
}

// compareTrees fails t for every entry that differs between two
// treeSummary results.
func compareTrees(t *testing.T, got, want map[string]string) {
	t.Helper()
	for k, w := range want {
		if g, ok := got[k]; !ok {
			t.Errorf("%s missing", k)
		} else if g != w {
			t.Errorf("%s: got %s, want %s", k, g, w)
		}
	}
	for k := range got {
		if _, ok := want[k]; !ok && k != "." {
			t.Errorf("unexpected entry %s", k)
		}
	}
}

// TestQcow2PunchHole: fallocate --punch-hole and ZERO_RANGE over data make
// the range read as zeros, in the overlay's own clusters and over clusters
// that only the backing file holds, whose data must not show through; the
// backing file is not touched.
func TestQcow2PunchHole(t *testing.T) {
	t.Parallel()
	requireE2E(t, "fallocate")
	for _, opts := range []string{"", "compat=0.10", "extended_l2=on"} {
		name := opts
		if name == "" {
			name = "v3"
		}
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			dir := t.TempDir()
			b := filepath.Join(dir, "base.qcow2")
			driverstest.Cmd(t, "qemu-img", "create", "-q", "-f", "qcow2", b, fmtSize(writeSize))
			driverstest.QemuIO(t, b, fmt.Sprintf("write -P 0x11 0 %d", writeSize))
			img := filepath.Join(dir, "img.qcow2")
			args := []string{"create", "-q", "-f", "qcow2", "-b", b, "-F", "qcow2"}
			if opts != "" {
				args = append(args, "-o", opts)
			}
			driverstest.Cmd(t, "qemu-img", append(args, img, fmtSize(writeSize))...)
			// Overlay data in the first 4 MiB.
			driverstest.QemuIO(t, img, "write -P 0x22 0 4M")
			keep := freeze(t, b)
			model, err := os.ReadFile(driverstest.ConvertRef(t, img, "", t.TempDir()))
			if err != nil {
				t.Fatal(err)
			}
			mp, disk := mount(t, img, false)
			holes := []struct {
				off, n int64
				cli    bool // use the fallocate(1) command
				zero   bool
			}{
				{0, 65536, true, false},              // a whole overlay cluster
				{1<<20 + 1000, 200000, true, false},  // ragged, overlay data
				{8 << 20, 1 << 20, true, false},      // whole clusters over backing only
				{10<<20 + 3000, 70000, false, false}, // ragged, backing only
				{3<<20 + 4096, 8192, false, true},    // zero-range in overlay data
				{12 << 20, 131072, false, true},      // zero-range over backing
				{writeSize - 5000, 5000, true, false},
			}
			f, err := os.OpenFile(disk, os.O_RDWR, 0)
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			for _, h := range holes {
				switch {
				case h.cli:
					driverstest.Cmd(t, "fallocate", "--punch-hole", "--offset", fmtSize(h.off), "--length", fmtSize(h.n), disk)
				case h.zero:
					err := unix.Fallocate(int(f.Fd()), unix.FALLOC_FL_ZERO_RANGE|unix.FALLOC_FL_KEEP_SIZE, h.off, h.n)
					if err == unix.EOPNOTSUPP {
						zeroRangeRefused(t, err)
					}
					if err != nil {
						t.Fatalf("fallocate(ZERO_RANGE, %d, %d): %v", h.off, h.n, err)
					}
				default:
					if err := unix.Fallocate(int(f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, h.off, h.n); err != nil {
						t.Fatalf("fallocate(PUNCH_HOLE, %d, %d): %v", h.off, h.n, err)
					}
				}
				clear(model[h.off : h.off+h.n])
				errno, got := readErrno(t, disk, h.off, h.n)
				if errno != 0 {
					t.Fatalf("read [%d, +%d): %v", h.off, h.n, errno)
				}
				if d := firstDiff(got, make([]byte, h.n)); d >= 0 {
					t.Fatalf("after punching [%d, +%d) byte %d reads %#x", h.off, h.n, h.off+int64(d), got[d])
				}
			}
			f.Close()
			compareFiles(t, disk, writeModelTemp(t, model))
			unmountBusyRetry(t, mp)
			qemuCompare(t, img, writeModelTemp(t, model))
			requireClean(t, img)
			keep.check(t)
		})
	}
}

func writeModelTemp(t *testing.T, model []byte) string {
	p := filepath.Join(t.TempDir(), "model.raw")
	writeModel(t, p, model)
	return p
}

// TestReadOnlyStaysReadOnly: a --read-only mount of a qcow2 overlay, read
// in full, writes nothing to the image or its backing file: same bytes,
// same mtime.
func TestReadOnlyStaysReadOnly(t *testing.T) {
	requireE2E(t)
	t.Parallel()
	dir := t.TempDir()
	var img string
	for _, c := range driverstest.Catalogue(writeSize) {
		if c.Name == "zero-discard-over-backing" {
			img = c.Build(t, dir, writeSize)
		}
	}
	if img == "" {
		t.Fatal("catalogue has no zero-discard-over-backing")
	}
	ref := driverstest.ConvertRef(t, img, "", t.TempDir())
	// A lazy-refcounts image too: a writer would set its dirty bit.
	lazy := createQcow2(t, t.TempDir(), "lazy_refcounts=on")
	driverstest.QemuIO(t, lazy, driverstest.Scatter(writeSize, 65536, 4)...)
	lazyRef := driverstest.ConvertRef(t, lazy, "", t.TempDir())
	files := []string{img, filepath.Join(dir, "base.qcow2"), lazy}
	old := time.Date(2021, 2, 3, 4, 5, 6, 0, time.UTC)
	for _, p := range files {
		if err := os.Chtimes(p, old, old); err != nil {
			t.Fatal(err)
		}
	}
	keep := freeze(t, files...)
	for _, c := range [][2]string{{img, ref}, {lazy, lazyRef}} {
		mp, disk := mount(t, c[0], false, "--read-only")
		compareFiles(t, disk, c[1])
		if f, err := os.OpenFile(disk, os.O_RDWR, 0); err == nil {
			f.Close()
			t.Errorf("open O_RDWR of a --read-only mount succeeded")
		}
		unmountBusyRetry(t, mp)
	}
	keep.check(t)
	for _, p := range files {
		st, err := os.Stat(p)
		if err != nil {
			t.Fatal(err)
		}
		if !st.ModTime().Equal(old) {
			t.Errorf("%s: mtime %v, want %v untouched", p, st.ModTime(), old)
		}
	}
	requireClean(t, lazy)
}

// TestWriteParallel has several writers on one mount at once, each owning
// every fourth 64 KiB chunk of the disk: their writes land in different
// clusters that share L2 tables and refcount blocks and are allocated
// concurrently, so two writers given the same host cluster, or a lost L2
// update, shows as a wrong byte in qemu-img compare.
func TestWriteParallel(t *testing.T) {
	t.Parallel()
	requireE2E(t)
	seed := writeSeed(t)
	var images []writeImage
	for _, wi := range writeImages() {
		switch wi.name {
		case "fresh", "cluster512", "extended-l2", "overlay-on-compressed", "raw":
			images = append(images, wi)
		}
	}
	for i, wi := range images {
		t.Run(wi.name, func(t *testing.T) {
			t.Parallel()
			dir := t.TempDir()
			img, backing := wi.build(t, dir)
			keep := freeze(t, backing...)
			var model []byte
			var err error
			if wi.raw {
				model, err = os.ReadFile(img)
			} else {
				model, err = os.ReadFile(driverstest.ConvertRef(t, img, "", t.TempDir()))
			}
			if err != nil {
				t.Fatal(err)
			}
			mp, disk := mount(t, img, false)
			const writers, chunk = 4, 64 << 10
			var wg sync.WaitGroup
			errs := make(chan error, writers)
			for g := 0; g < writers; g++ {
				wg.Add(1)
				go func(g int, rng *rand.Rand) {
					defer wg.Done()
					errs <- parallelWriter(disk, model, g, writers, chunk, rng)
				}(g, rand.New(rand.NewSource(seed+int64(i*writers+g))))
			}
			wg.Wait()
			close(errs)
			for err := range errs {
				if err != nil {
					t.Error(err)
				}
			}
			if t.Failed() {
				return
			}
			modelPath := writeModelTemp(t, model)
			compareFiles(t, disk, modelPath)
			unmountBusyRetry(t, mp)
			if wi.raw {
				compareFiles(t, img, modelPath)
				return
			}
			qemuCompare(t, img, modelPath)
			requireClean(t, img)
			keep.check(t)
		})
	}
}

// parallelWriter does 150 random writes, punch-holes and zero-ranges inside
// the chunks it owns (chunk index % writers == g), updating model there
// only, and reads each write back.
func parallelWriter(disk string, model []byte, g, writers int, chunk int64, rng *rand.Rand) error {
	f, err := os.OpenFile(disk, os.O_RDWR, 0)
	if err != nil {
		return err
	}
	defer f.Close()
	d, err := os.OpenFile(disk, os.O_RDWR|syscall.O_DIRECT, 0)
	if err != nil {
		return err
	}
	defer d.Close()
	chunks := int64(len(model)) / chunk / int64(writers)
	for i := 0; i < 150; i++ {
		base := (rng.Int63n(chunks)*int64(writers) + int64(g)) * chunk
		off := base + rng.Int63n(chunk)
		n := 1 + rng.Int63n(base+chunk-off)
		var p []byte
		switch r := rng.Intn(10); {
		case r < 4:
			p = make([]byte, n)
			rng.Read(p)
			_, err = f.WriteAt(p, off)
		case r < 8:
			off = base + rng.Int63n(chunk/4096)*4096
			n = (1 + rng.Int63n((base+chunk-off)/4096)) * 4096
			p = driverstest.AlignedBuffer(int(n), 4096)
			rng.Read(p)
			_, err = d.WriteAt(p, off)
		case r < 9:
			p = make([]byte, n)
			err = unix.Fallocate(int(f.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, off, n)
		default:
			p = make([]byte, n)
			err = unix.Fallocate(int(f.Fd()), unix.FALLOC_FL_ZERO_RANGE|unix.FALLOC_FL_KEEP_SIZE, off, n)
		}
		if err != nil {
			return fmt.Errorf("writer %d op %d at %d (+%d): %w", g, i, off, n, err)
		}
		copy(model[off:], p)
		got := make([]byte, n)
		if _, err := f.ReadAt(got, off); err != nil {
			return fmt.Errorf("writer %d op %d: read back at %d (+%d): %w", g, i, off, n, err)
		}
		if k := firstDiff(got, p); k >= 0 {
			return fmt.Errorf("writer %d op %d: read back at %d (+%d) differs at %d", g, i, off, n, off+int64(k))
		}
	}
	return nil
}
