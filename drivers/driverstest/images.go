package driverstest

import (
	"fmt"
	"math/rand"
	"os"
	"path/filepath"
	"strconv"
	"testing"
)

// Image is a recipe for a qcow2 test image built with qemu-img and
// qemu-io. The driver and end-to-end tests share the catalogue so that every
// feature is exercised both below and above FUSE.
type Image struct {
	Name string
	// Build creates the image (and any backing or data files it needs) in
	// dir and returns the path of the image to open.
	Build func(t testing.TB, dir string, size int64) string
	// Snapshot, if set, names the internal snapshot to open instead of the
	// active disk; the reference is converted from that snapshot.
	Snapshot string
	// Zeros are ranges [off, off+len) that must read as zeros whatever the
	// layers below hold (zero writes and discards over a backing file).
	Zeros [][2]int64
}

// Scatter returns qemu-io commands that write distinct byte patterns at
// places spread over a disk of size bytes: unaligned, crossing cluster
// boundaries of clusterSize, spanning several clusters, and ending exactly
// at the end of the disk. A driver that maps a guest offset to the wrong
// host cluster reads some other write's pattern. seed varies the pattern
// bytes so that two layers of a chain write different data.
func Scatter(size, clusterSize int64, seed int) []string {
	const n = 12
	var cmds []string
	for k := int64(0); k < n; k++ {
		pat := (0x11*(k+1) + int64(seed)*0x35) & 0xff
		if pat == 0 {
			pat = 0x5a
		}
		base := size * k / n
		var off, ln int64
		switch k % 4 {
		case 0: // a write that straddles a cluster boundary
			off = base - base%clusterSize + clusterSize - 1000
			ln = 3000 + k*1000
		case 1: // an unaligned write inside one cluster
			off = base + 4097 + k*13
			ln = 777 + k
		case 2: // several whole clusters, capped at 1 MiB
			off = base - base%clusterSize
			ln = min(3*clusterSize, 1<<20)
		case 3: // sector-aligned, not cluster-aligned
			off = base + 512*(k+1)
			ln = 64 << 10
		}
		if off < 0 {
			off = 0
		}
		if off+ln > size {
			ln = size - off
		}
		if ln <= 0 {
			continue
		}
		cmds = append(cmds, fmt.Sprintf("write -P %#x %d %d", pat, off, ln))
	}
	tail := min(int64(5000), size)
	cmds = append(cmds, fmt.Sprintf("write -P %#x %d %d", 0xe0^seed&0xff|1, size-tail, tail))
	return cmds
}

// RandomRaw writes a raw file of size bytes that holds seeded random data in
// eight scattered regions, a region of explicit zeros, and holes elsewhere.
func RandomRaw(t testing.TB, path string, size int64, seed int64) {
	t.Helper()
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	rng := rand.New(rand.NewSource(seed))
	for k := int64(0); k < 8; k++ {
		ln := min(int64(100<<10)+k*33333, size)
		off := size * k / 8
		if off+ln > size {
			ln = size - off
		}
		buf := make([]byte, ln)
		rng.Read(buf)
		// Make some of it compressible, so that compressed images hold
		// both compressed and uncompressed clusters.
		if k%2 == 0 {
			for i := range buf[:ln/2] {
				buf[i] = byte(i / 1024)
			}
		}
		if _, err := f.WriteAt(buf, off); err != nil {
			t.Fatal(err)
		}
	}
	if size > 1<<20 {
		if _, err := f.WriteAt(make([]byte, 64<<10), size/2+12345); err != nil {
			t.Fatal(err)
		}
	}
}

func qemuImg(t testing.TB, args ...string) { t.Helper(); Cmd(t, "qemu-img", args...) }

func sz(n int64) string { return strconv.FormatInt(n, 10) }

// fromRaw converts a random raw file to qcow2 with opts and scatters
// pattern writes over it.
func fromRaw(opts string, cluster int64) func(testing.TB, string, int64) string {
	return func(t testing.TB, dir string, size int64) string {
		src := filepath.Join(dir, "src.raw")
		RandomRaw(t, src, size, size^cluster)
		img := filepath.Join(dir, "img.qcow2")
		qemuImg(t, "convert", "-f", "raw", "-O", "qcow2", "-o", opts, src, img)
		QemuIO(t, img, Scatter(size, cluster, 1)...)
		return img
	}
}

// compressed converts a random raw file with -c.
func compressed(opts string) func(testing.TB, string, int64) string {
	return func(t testing.TB, dir string, size int64) string {
		src := filepath.Join(dir, "src.raw")
		RandomRaw(t, src, size, 77)
		img := filepath.Join(dir, "img.qcow2")
		qemuImg(t, "convert", "-c", "-f", "raw", "-O", "qcow2", "-o", opts, src, img)
		return img
	}
}

// base builds a qcow2 backing file full of patterns.
func base(t testing.TB, dir string, size int64) string {
	b := filepath.Join(dir, "base.qcow2")
	qemuImg(t, "create", "-q", "-f", "qcow2", b, sz(size))
	QemuIO(t, b, fmt.Sprintf("write -P 0x11 0 %d", size))
	QemuIO(t, b, Scatter(size, 65536, 2)...)
	return b
}

// overlay creates a qcow2 image over backing with extra -o options.
func overlay(t testing.TB, dir, name, backing, backingFmt, opts string, size int64) string {
	img := filepath.Join(dir, name)
	args := []string{"create", "-q", "-f", "qcow2", "-b", backing, "-F", backingFmt}
	if opts != "" {
		args = append(args, "-o", opts)
	}
	qemuImg(t, append(args, img, sz(size))...)
	return img
}

// zeroRanges are where zeroImage writes zeros and discards, as fractions of
// the disk so they scale with its size: offsets are multiples of 64 KiB.
func zeroRanges(size int64) [][2]int64 {
	c := int64(65536)
	at := func(frac int64) int64 { return size * frac / 8 / c * c }
	return [][2]int64{
		{at(1), 2 * c},       // write -z
		{at(3) + c, c},       // write -z -u
		{at(5), 4 * c},       // discard
		{at(6) + 4096, 1000}, // unaligned write -z inside a cluster
	}
}

// Catalogue returns the qcow2 images every reader must handle. size is
// the virtual size; it must be a multiple of 2 MiB and at least 8 MiB.
func Catalogue(size int64) []Image {
	zr := zeroRanges(size)
	return []Image{
		{Name: "v2", Build: fromRaw("compat=0.10", 65536)},
		{Name: "v3", Build: fromRaw("compat=1.1", 65536)},
		{Name: "cluster512", Build: fromRaw("cluster_size=512", 512)},
		{Name: "cluster4k", Build: fromRaw("cluster_size=4096", 4096)},
		{Name: "cluster64k-v2", Build: fromRaw("compat=0.10,cluster_size=65536", 65536)},
		{Name: "cluster2M", Build: fromRaw("cluster_size=2097152", 2<<20)},
		{Name: "refcount1", Build: fromRaw("refcount_bits=1", 65536)},
		{Name: "refcount64", Build: fromRaw("refcount_bits=64", 65536)},
		{Name: "prealloc-metadata", Build: func(t testing.TB, dir string, size int64) string {
			img := filepath.Join(dir, "img.qcow2")
			qemuImg(t, "create", "-q", "-f", "qcow2", "-o", "preallocation=metadata", img, sz(size))
			QemuIO(t, img, Scatter(size, 65536, 3)...)
			return img
		}},
		{Name: "zlib", Build: compressed("compression_type=zlib")},
		{Name: "zlib-4k", Build: compressed("compression_type=zlib,cluster_size=4096")},
		{Name: "zlib-2M", Build: compressed("compression_type=zlib,cluster_size=2097152")},
		{Name: "zlib-v2", Build: compressed("compat=0.10")},
		{Name: "zstd", Build: compressed("compression_type=zstd")},
		{Name: "zstd-4k", Build: compressed("compression_type=zstd,cluster_size=4096")},
		{Name: "zstd-2M", Build: compressed("compression_type=zstd,cluster_size=2097152")},
		{Name: "mixed-compressed", Build: func(t testing.TB, dir string, size int64) string {
			// Compressed clusters partly overwritten: the rewritten
			// clusters become normal ones, the rest stay compressed.
			img := compressed("compression_type=zstd")(t, dir, size)
			QemuIO(t, img, Scatter(size, 65536, 4)...)
			return img
		}},
		{Name: "extended-l2", Build: func(t testing.TB, dir string, size int64) string {
			b := base(t, dir, size)
			img := overlay(t, dir, "img.qcow2", b, "qcow2", "extended_l2=on,cluster_size=65536", size)
			// Subcluster writes: 2 KiB subclusters of a 64 KiB cluster.
			// Partial subclusters force a read-modify-write of backing data.
			QemuIO(t, img,
				"write -P 0xa1 0 2048",
				"write -P 0xa2 6144 2048",
				"write -P 0xa3 70000 1000",
				fmt.Sprintf("write -P 0xa4 %d 5000", size/2+30000),
				fmt.Sprintf("write -z %d 4096", size/2+65536+8192),
				fmt.Sprintf("write -P 0xa5 %d 65536", size-65536),
			)
			return img
		}},
		{Name: "zero-discard-over-backing", Zeros: zr, Build: func(t testing.TB, dir string, size int64) string {
			b := base(t, dir, size)
			img := overlay(t, dir, "img.qcow2", b, "qcow2", "", size)
			QemuIO(t, img, Scatter(size, 65536, 5)...)
			QemuIO(t, img,
				fmt.Sprintf("write -z %d %d", zr[0][0], zr[0][1]),
				fmt.Sprintf("write -z -u %d %d", zr[1][0], zr[1][1]),
				fmt.Sprintf("discard %d %d", zr[2][0], zr[2][1]),
				fmt.Sprintf("write -z %d %d", zr[3][0], zr[3][1]),
			)
			return img
		}},
		{Name: "zero-over-backing-extended-l2", Zeros: zr, Build: func(t testing.TB, dir string, size int64) string {
			b := base(t, dir, size)
			img := overlay(t, dir, "img.qcow2", b, "qcow2", "extended_l2=on", size)
			QemuIO(t, img,
				fmt.Sprintf("write -z %d %d", zr[0][0], zr[0][1]),
				fmt.Sprintf("write -z -u %d %d", zr[1][0], zr[1][1]),
				fmt.Sprintf("discard %d %d", zr[2][0], zr[2][1]),
				fmt.Sprintf("write -z %d %d", zr[3][0], zr[3][1]),
			)
			return img
		}},
		{Name: "chain-raw-qcow2-qcow2", Build: func(t testing.TB, dir string, size int64) string {
			raw := filepath.Join(dir, "base.raw")
			RandomRaw(t, raw, size, 5)
			mid := overlay(t, dir, "mid.qcow2", "base.raw", "raw", "", size)
			QemuIO(t, mid, Scatter(size, 65536, 6)...)
			top := overlay(t, dir, "img.qcow2", "mid.qcow2", "qcow2", "cluster_size=4096", size)
			QemuIO(t, top, Scatter(size, 4096, 7)...)
			QemuIO(t, top, fmt.Sprintf("write -z %d 65536", size/4))
			return top
		}},
		{Name: "overlay-larger-than-backing", Build: func(t testing.TB, dir string, size int64) string {
			b := filepath.Join(dir, "small.qcow2")
			qemuImg(t, "create", "-q", "-f", "qcow2", b, sz(size/4+4096+512))
			QemuIO(t, b, fmt.Sprintf("write -P 0x66 0 %d", size/4+4096+512))
			img := overlay(t, dir, "img.qcow2", b, "qcow2", "", size)
			QemuIO(t, img, fmt.Sprintf("write -P 0x77 %d 4096", size/2), "write -P 0x78 1000 1000")
			return img
		}},
		{Name: "data-file", Build: func(t testing.TB, dir string, size int64) string {
			img := filepath.Join(dir, "img.qcow2")
			qemuImg(t, "create", "-q", "-f", "qcow2", "-o", "data_file="+filepath.Join(dir, "img.data"), img, sz(size))
			QemuIO(t, img, Scatter(size, 65536, 8)...)
			return img
		}},
		{Name: "data-file-raw", Build: func(t testing.TB, dir string, size int64) string {
			img := filepath.Join(dir, "img.qcow2")
			qemuImg(t, "create", "-q", "-f", "qcow2", "-o", "data_file="+filepath.Join(dir, "img.data")+",data_file_raw=on", img, sz(size))
			QemuIO(t, img, Scatter(size, 65536, 9)...)
			return img
		}},
		{Name: "snapshot", Snapshot: "snap1", Build: func(t testing.TB, dir string, size int64) string {
			img := filepath.Join(dir, "img.qcow2")
			qemuImg(t, "create", "-q", "-f", "qcow2", img, sz(size))
			QemuIO(t, img, Scatter(size, 65536, 10)...)
			qemuImg(t, "snapshot", "-c", "snap1", img)
			QemuIO(t, img, Scatter(size, 65536, 11)...)
			return img
		}},
		{Name: "odd-size", Build: func(t testing.TB, dir string, _ int64) string {
			img := filepath.Join(dir, "img.qcow2")
			const odd = 4194704 // qemu rounds it up to 4194816, a whole sector
			qemuImg(t, "create", "-q", "-f", "qcow2", img, sz(odd))
			QemuIO(t, img, Scatter(4194816, 65536, 12)...)
			return img
		}},
	}
}

// ConvertRef writes `qemu-img convert -O raw` of img (of its snapshot, if
// snapshot is set) to a new file in dir and returns its path: the
// reference every reader must match byte for byte.
func ConvertRef(t testing.TB, img, snapshot, dir string) string {
	t.Helper()
	return ConvertRefFormat(t, "qcow2", img, snapshot, dir)
}

// ConvertRefFormat is ConvertRef for an image of the named format.
func ConvertRefFormat(t testing.TB, format, img, snapshot, dir string) string {
	t.Helper()
	ref := filepath.Join(dir, "ref.raw")
	args := []string{"convert", "-U", "-f", format}
	if snapshot != "" {
		args = append(args, "-l", "snapshot.name="+snapshot)
	}
	qemuImg(t, append(args, "-O", "raw", img, ref)...)
	return ref
}

// OrByte ORs or into the byte at off of the file at path: the one-bit
// damage (a feature bit, a corrupt flag, a refcount) tests make to
// images that qemu-img wrote.
func OrByte(t testing.TB, path string, off int64, or byte) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	b := make([]byte, 1)
	if _, err := f.ReadAt(b, off); err != nil {
		t.Fatal(err)
	}
	b[0] |= or
	if _, err := f.WriteAt(b, off); err != nil {
		t.Fatal(err)
	}
}

// QemuImage makes an image of format with `qemu-img create` (opts, size)
// at dir/name, fills it with qemu-io commands, and returns its path and
// the raw bytes `qemu-img convert` reads from it.
func QemuImage(t testing.TB, format, dir, name string, opts []string, size string, io ...string) (string, []byte) {
	t.Helper()
	RequireTools(t, "qemu-img", "qemu-io")
	path := filepath.Join(dir, name)
	Cmd(t, "qemu-img", append(append([]string{"create", "-q", "-f", format}, opts...), path, size)...)
	QemuIOFormat(t, format, path, io...)
	ref, err := os.ReadFile(ConvertRefFormat(t, format, path, "", t.TempDir()))
	if err != nil {
		t.Fatal(err)
	}
	return path, ref
}
