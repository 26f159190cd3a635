package qcow2

import (
	"fmt"
	"math/rand"
	"os"
	"path/filepath"
	"testing"

	"imgfuse/coroutine"
	"imgfuse/drivers"
	"imgfuse/drivers/driverstest"
)

// readCase builds one image in dir and returns its path.
type readCase struct {
	name  string
	build func(t *testing.T, dir string) string
	// edge is the granularity whose boundaries reads are steered across
	// (the subcluster size with extended L2, else the cluster size).
	edge int64
	// zeros are ranges that must read as zeros whatever lies below.
	zeros [][2]int64
}

// create runs qemu-img create with -o opts (if any) and extra arguments.
func create(t *testing.T, path, opts string, size int64, extra ...string) string {
	args := []string{"create", "-q", "-f", "qcow2"}
	if opts != "" {
		args = append(args, "-o", opts)
	}
	args = append(args, extra...)
	qemuImg(t, append(args, path, fmt.Sprint(size))...)
	return path
}

// patterned is a qcow2 image with scattered patterned writes.
func patterned(opts string, size, cluster int64) func(t *testing.T, dir string) string {
	return func(t *testing.T, dir string) string {
		img := create(t, filepath.Join(dir, "img.qcow2"), opts, size)
		driverstest.QemuIO(t, img, driverstest.Scatter(size, cluster, 1)...)
		return img
	}
}

// compressedImage converts a random raw file with -c.
func compressedImage(opts string, size int64) func(t *testing.T, dir string) string {
	return func(t *testing.T, dir string) string {
		src := filepath.Join(dir, "src.raw")
		driverstest.RandomRaw(t, src, size, 3)
		img := filepath.Join(dir, "img.qcow2")
		qemuImg(t, "convert", "-c", "-f", "raw", "-O", "qcow2", "-o", opts, src, img)
		return img
	}
}

// baseImage is a backing file holding non-zero bytes everywhere, so that
// any range wrongly read from it shows.
func baseImage(t *testing.T, dir string, size int64) string {
	b := create(t, filepath.Join(dir, "base.qcow2"), "", size)
	driverstest.QemuIO(t, b, fmt.Sprintf("write -P 0x5b 0 %d", size))
	return b
}

func readCases() []readCase {
	const size = 4 << 20
	return []readCase{
		{name: "v2-cluster512", build: patterned("compat=0.10,cluster_size=512", size, 512), edge: 512},
		{name: "v3-cluster4k-refcount1", build: patterned("cluster_size=4096,refcount_bits=1", size, 4096), edge: 4096},
		{name: "v3-refcount64", build: patterned("refcount_bits=64", size, 65536), edge: 65536},
		{name: "cluster2M", build: patterned("cluster_size=2097152", 8<<20, 2<<20), edge: 2 << 20},
		{name: "zlib-4k", build: compressedImage("compression_type=zlib,cluster_size=4096", size), edge: 4096},
		{name: "zstd-2M", build: compressedImage("compression_type=zstd,cluster_size=2097152", 8<<20), edge: 2 << 20},
		{name: "zlib-v2", build: compressedImage("compat=0.10", size), edge: 65536},
		{name: "odd-size", build: patterned("", 4194704, 65536), edge: 65536},
		{
			// Subcluster writes over a backing file: 2 KiB subclusters,
			// partial subcluster writes, zero subclusters.
			name: "extended-l2-subclusters", edge: 2048,
			zeros: [][2]int64{{3<<20 + 8192, 4096}, {3<<20 + 65536, 2048}},
			build: func(t *testing.T, dir string) string {
				b := baseImage(t, dir, size)
				img := create(t, filepath.Join(dir, "img.qcow2"), "extended_l2=on", size, "-b", b, "-F", "qcow2")
				driverstest.QemuIO(t, img,
					"write -P 0xa1 0 2048",
					"write -P 0xa2 6144 2048",
					"write -P 0xa3 70000 1000",
					"write -P 0xa4 1M 200k",
					fmt.Sprintf("write -z %d 4096", 3<<20+8192),
					fmt.Sprintf("write -z -u %d 2048", 3<<20+65536),
					"write -P 0xa5 4032k 64k",
				)
				return img
			},
		},
		{
			// Host clusters with an empty bitmap: UNALLOCATED_ALLOC
			// must read the backing file, not the host cluster.
			name: "extended-l2-prealloc-metadata", edge: 2048,
			build: func(t *testing.T, dir string) string {
				b := baseImage(t, dir, size)
				img := create(t, filepath.Join(dir, "img.qcow2"), "extended_l2=on,preallocation=metadata", size, "-b", b, "-F", "qcow2")
				driverstest.QemuIO(t, img, "write -P 0xa6 10000 5000", "write -z 2M 64k")
				return img
			},
		},
		{name: "prealloc-metadata", build: patterned("preallocation=metadata", size, 65536), edge: 65536},
		{
			name: "zero-discard-over-backing", edge: 65536,
			zeros: [][2]int64{{512 << 10, 128 << 10}, {1 << 20, 64 << 10}, {2 << 20, 256 << 10}, {3<<20 + 4096, 1000}},
			build: func(t *testing.T, dir string) string {
				b := baseImage(t, dir, size)
				img := create(t, filepath.Join(dir, "img.qcow2"), "", size, "-b", b, "-F", "qcow2")
				driverstest.QemuIO(t, img, driverstest.Scatter(size, 65536, 2)...)
				driverstest.QemuIO(t, img,
					"write -z 512k 128k",
					"write -z -u 1M 64k",
					"discard 2M 256k",
					fmt.Sprintf("write -z %d 1000", 3<<20+4096),
				)
				return img
			},
		},
		{
			name: "chain-raw-qcow2-qcow2", edge: 4096,
			build: func(t *testing.T, dir string) string {
				raw := filepath.Join(dir, "base.raw")
				driverstest.RandomRaw(t, raw, size, 4)
				mid := create(t, filepath.Join(dir, "mid.qcow2"), "", size, "-b", "base.raw", "-F", "raw")
				driverstest.QemuIO(t, mid, driverstest.Scatter(size, 65536, 5)...)
				top := create(t, filepath.Join(dir, "top.qcow2"), "cluster_size=4096", size, "-b", "mid.qcow2", "-F", "qcow2")
				driverstest.QemuIO(t, top, driverstest.Scatter(size, 4096, 6)...)
				return top
			},
		},
		{
			// The backing file ends mid-cluster, 1M + 4.5k into a 4M
			// overlay: zeros past it.
			name: "overlay-larger-than-backing", edge: 65536,
			build: func(t *testing.T, dir string) string {
				b := filepath.Join(dir, "small.raw")
				if err := os.WriteFile(b, makePattern(1<<20+4608), 0o644); err != nil {
					t.Fatal(err)
				}
				img := create(t, filepath.Join(dir, "img.qcow2"), "", size, "-b", "small.raw", "-F", "raw")
				driverstest.QemuIO(t, img, "write -P 0x77 2M 4096", "write -P 0x78 1000 1000")
				return img
			},
		},
		{name: "data-file", build: dataFile("", size), edge: 65536},
		{name: "data-file-raw", build: dataFile(",data_file_raw=on", size), edge: 65536},
	}
}

// dataFile builds an image with an external data file, named relative to
// the image's directory.
func dataFile(opts string, size int64) func(t *testing.T, dir string) string {
	return func(t *testing.T, dir string) string {
		cmdIn(t, dir, "qemu-img", "create", "-q", "-f", "qcow2", "-o", "data_file=img.data"+opts, "img.qcow2", fmt.Sprint(size))
		img := filepath.Join(dir, "img.qcow2")
		args := []string{"-f", "qcow2"}
		for _, c := range driverstest.Scatter(size, 65536, 7) {
			args = append(args, "-c", c)
		}
		cmdIn(t, dir, "qemu-io", append(args, "img.qcow2")...)
		return img
	}
}

func makePattern(n int) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(i*7/512 + 1)
	}
	return b
}

// TestRead compares whole-disk reads, reads across every edge near a few
// places, and random unaligned reads with `qemu-img convert -O raw`.
func TestRead(t *testing.T) {
	requireQemu(t)
	for _, tc := range readCases() {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			dir := t.TempDir()
			img := tc.build(t, dir)
			ref := reference(t, img, "")
			for _, z := range tc.zeros {
				for i, c := range ref[z[0] : z[0]+z[1]] {
					if c != 0 {
						t.Fatalf("reference not zero at %d: the recipe is wrong", z[0]+int64(i))
					}
				}
			}
			d := openTest(t, img, drivers.OpenOptions{})
			size := int64(len(ref))
			if d.Size() != size {
				t.Fatalf("Size = %d, want %d", d.Size(), size)
			}
			checkRange(t, d, ref, 0, size)

			// Around edges: the first few, some in the middle, the last.
			var edges []int64
			for k := int64(1); k <= 5; k++ {
				edges = append(edges, k*tc.edge, size/2/tc.edge*tc.edge+k*tc.edge)
			}
			edges = append(edges, size/tc.edge*tc.edge)
			for _, e := range edges {
				for _, r := range [][2]int64{{-1, 2}, {-1, 1}, {0, 1}, {-700, 1300}, {-tc.edge + 1, 2*tc.edge - 2}, {-3, 3*tc.edge + 5}} {
					off, n := e+r[0], r[1]
					off = max(off, 0)
					n = min(n, size-off)
					if n > 0 && off < size {
						checkRange(t, d, ref, off, n)
					}
				}
			}
			rng := rand.New(rand.NewSource(driverstest.Seed(t)))
			for range 200 {
				off := rng.Int63n(size)
				n := min(1+rng.Int63n(3*tc.edge+4096), size-off)
				checkRange(t, d, ref, off, n)
			}
		})
	}
}

// BenchmarkRead measures 64 KiB sequential reads of an allocated image and
// 4 KiB random reads (dominated by the mapping: lock, L2 cache hit, pread
// from the page cache), from one coroutine.
func BenchmarkRead(b *testing.B) {
	requireQemu(b)
	const size = 64 << 20
	dir := b.TempDir()
	img := filepath.Join(dir, "img.qcow2")
	qemuImg(b, "create", "-q", "-f", "qcow2", img, fmt.Sprint(size))
	driverstest.QemuIO(b, img, fmt.Sprintf("write -P 0x3c 0 %d", size))
	zimg := filepath.Join(dir, "z.qcow2")
	qemuImg(b, "convert", "-c", "-f", "qcow2", "-O", "qcow2", "-o", "compression_type=zstd", img, zimg)
	d := openTest(b, img, drivers.OpenOptions{NoDirectIO: true})
	zd := openTest(b, zimg, drivers.OpenOptions{NoDirectIO: true})

	run := func(b *testing.B, d drivers.Driver, n int64, next func(i int) int64) {
		buf := make([]byte, n)
		b.SetBytes(n)
		b.ReportAllocs()
		b.ResetTimer()
		coroutine.Run(func(co *coroutine.Co) {
			for i := 0; i < b.N; i++ {
				if _, err := d.ReadAt(co, buf, next(i)); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
	seq := func(n int64) func(int) int64 {
		return func(i int) int64 { return int64(i) * n % size }
	}
	rnd := func(n int64) func(int) int64 {
		rng := rand.New(rand.NewSource(1))
		return func(int) int64 { return rng.Int63n(size/n) * n }
	}
	b.Run("seq64k", func(b *testing.B) { run(b, d, 64<<10, seq(64<<10)) })
	b.Run("rand4k", func(b *testing.B) { run(b, d, 4096, rnd(4096)) })
	b.Run("zstd-seq4k", func(b *testing.B) { run(b, zd, 4096, seq(4096)) })
	b.Run("zstd-rand4k", func(b *testing.B) { run(b, zd, 4096, rnd(4096)) })
}
