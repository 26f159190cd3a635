package qcow2

import (
	"bytes"
	"errors"
	"io"
	"os"
	"path/filepath"
	"testing"

	"imgfuse/coroutine"
	"imgfuse/drivers"
	"imgfuse/drivers/driverstest"
)

// fuzzImage is an image with just the geometry the table decoders read:
// 1<<clusterBits clusters, extended L2 or not, version 2 or 3, an external
// data file or not, and a 1 TiB file.
func fuzzImage(clusterBits uint32, extL2, dataFile bool, version uint32) *image {
	h := &header{Version: version, ClusterBits: clusterBits, RefcountOrder: 4}
	if extL2 {
		h.Incompatible |= incompatExtendedL2
	}
	if dataFile {
		h.Incompatible |= incompatDataFile
	}
	img := &image{h: h, l2Format: newL2Format(h), fileSize: 1 << 40, extData: dataFile}
	return img
}

// FuzzL2Entry decodes arbitrary L2 entries and subcluster bitmaps in every
// geometry: entryRange never panics, fails (with ErrCorrupt) for every
// subcluster or none, and splits the cluster into maximal runs that each
// subcluster of the run agrees with; the entry round-trips through an L2
// table; the write classifier and the host-offset checks accept anything.
func FuzzL2Entry(f *testing.F) {
	for _, s := range []struct {
		e, bm uint64
		flags uint8
	}{
		{0, 0, 0},
		{oflagCopied | 0x50000, 0, 0},
		{oflagCopied | 0x50000, 0x0000ffff, 1},          // ext L2: half allocated
		{oflagCopied | 0x50000, 0xffff0000_0000ffff, 1}, // ... the rest zero
		{0, 0xffffffff_00000000, 1},                     // all zero, unallocated
		{0x50000, 0x00000001_00000001, 1},               // allocated and zero
		{oflagZero, 0, 0},
		{oflagZero | 0x50000, 0, 0},
		{oflagCompressed | 0x1234_5678, 0, 0},
		{oflagCompressed, 5, 1},
		{oflagCopied, 0, 2}, // data file: guest cluster 0 at host 0
		{l2eStdReservedMk, 0, 0},
		{oflagCopied | 0x50200, 0, 0}, // unaligned
	} {
		f.Add(s.e, s.bm, uint8(16), s.flags, uint8(0))
	}
	f.Fuzz(func(t *testing.T, e, bm uint64, cb, flags, scA uint8) {
		extL2 := flags&1 != 0
		clusterBits := 9 + uint32(cb)%13 // 512 B .. 2 MiB
		if extL2 {
			clusterBits = 14 + uint32(cb)%8 // QEMU: at least 16 KiB; 16 KiB .. 2 MiB
		}
		version := uint32(3)
		if flags&4 != 0 {
			version = 2
		}
		img := fuzzImage(clusterBits, extL2, flags&2 != 0, version)
		if !extL2 {
			bm = 0
		}
		var firstErr error
		prev := clusterType(255)
		for sc := 0; sc < img.scPerCluster; {
			typ, n, err := img.entryRange(e, bm, sc)
			if sc == 0 {
				firstErr = err
			}
			if (err != nil) != (firstErr != nil) {
				t.Fatalf("subcluster %d: error %v, subcluster 0: %v", sc, err, firstErr)
			}
			if err != nil {
				if !errors.Is(err, drivers.ErrCorrupt) {
					t.Fatalf("error does not wrap ErrCorrupt: %v", err)
				}
				break
			}
			if n < 1 || n > img.scPerCluster-sc {
				t.Fatalf("subcluster %d: run of %d (of %d)", sc, n, img.scPerCluster)
			}
			if extL2 && typ == prev {
				t.Fatalf("subcluster %d: run of %v follows a run of the same type: not maximal", sc, typ)
			}
			for j := sc + 1; j < sc+n; j++ {
				tj, nj, err := img.entryRange(e, bm, j)
				if err != nil || tj != typ || nj != n-(j-sc) {
					t.Fatalf("subcluster %d inside run [%d,+%d) of %v: %v, %d, %v", j, sc, n, typ, tj, nj, err)
				}
			}
			prev = typ
			sc += n
		}
		a := int(scA) % img.scPerCluster
		img.classify(e, bm, a, img.scPerCluster)
		img.hostCluster(e)

		// The first 4 KiB of a table are enough to place an entry
		// anywhere relative to its neighbours; a whole 2 MiB table per
		// input would slow the fuzzer a hundredfold.
		tb := make([]byte, min(img.clusterSize, 4096))
		idx := int64(scA) % (int64(len(tb)) / img.l2EntryBytes)
		img.setL2Entry(tb, idx, e, bm)
		if ge, gbm := img.l2Entry(tb, idx); ge != e || gbm != bm {
			t.Fatalf("L2 entry round trip: %#x/%#x -> %#x/%#x", e, bm, ge, gbm)
		}
		if n := bytes.Count(tb, []byte{0}); int64(n) < int64(len(tb))-img.l2EntryBytes {
			t.Fatalf("setL2Entry wrote outside entry %d", idx)
		}
	})
}

// FuzzCompressedDescriptor decodes compressed cluster descriptors for every
// cluster size: the stream starts inside the offset field's range and its
// length is at least 1 byte and at most two clusters (what the sector
// count field can express), so no descriptor asks for an unbounded read.
func FuzzCompressedDescriptor(f *testing.F) {
	f.Add(uint64(oflagCompressed|0x1234_5678), uint8(16))
	f.Add(^uint64(0), uint8(9))
	f.Add(^uint64(0), uint8(21))
	f.Add(uint64(0x1ff), uint8(12))
	f.Fuzz(func(t *testing.T, e uint64, cb uint8) {
		clusterBits := 9 + uint32(cb)%13
		img := fuzzImage(clusterBits, false, false, 3)
		coff, csize := img.compressedRange(e)
		x := 62 - (clusterBits - 8)
		if coff < 0 || coff >= 1<<x {
			t.Fatalf("offset %#x outside the %d-bit field", coff, x)
		}
		if csize < 1 || csize > 2*img.clusterSize {
			t.Fatalf("compressed size %d for %d-byte clusters", csize, img.clusterSize)
		}
		if (coff+csize)%512 != 0 {
			t.Fatalf("stream [%#x, +%d) does not end on a sector", coff, csize)
		}
	})
}

// refcountRef is the reference decoder for refcount blocks: 1<<order bits
// per entry, packed LSB first within a byte below 8 bits, big-endian
// bytes from 8 bits up.
func refcountRef(b []byte, order uint32, i int64) uint64 {
	w := int64(1) << order
	if w < 8 {
		bit := i * w
		return uint64(b[bit/8]>>(bit%8)) & (1<<w - 1)
	}
	var v uint64
	for k := range w / 8 {
		v = v<<8 | uint64(b[i*(w/8)+k])
	}
	return v
}

// FuzzRefcountBlock decodes and updates refcount blocks of every width
// (1 to 64 bits) against the reference decoder: every entry reads as the
// reference says, and a set changes exactly one entry, to the value masked
// to the width.
func FuzzRefcountBlock(f *testing.F) {
	for order := range uint8(7) {
		f.Add(bytes.Repeat([]byte{0xa5, 0x3c}, 32), order, uint16(3), uint64(1))
		f.Add(make([]byte, 512), order, uint16(511), ^uint64(0))
	}
	f.Fuzz(func(t *testing.T, block []byte, ord uint8, i uint16, v uint64) {
		order := uint32(ord % 7)
		entries := int64(len(block)) * 8 >> order
		if entries == 0 {
			return
		}
		entries = min(entries, 4096)
		for j := range entries {
			if got, want := getRefcount(block, order, j), refcountRef(block, order, j); got != want {
				t.Fatalf("order %d entry %d: got %d, want %d", order, j, got, want)
			}
		}
		idx := int64(i) % entries
		maxV := uint64(1)<<(1<<order) - 1
		if order == 6 {
			maxV = ^uint64(0)
		}
		before := bytes.Clone(block)
		setRefcount(block, order, idx, v&maxV)
		if got := getRefcount(block, order, idx); got != v&maxV {
			t.Fatalf("order %d entry %d: set %d, read %d", order, idx, v&maxV, got)
		}
		for j := range entries {
			if j != idx && refcountRef(block, order, j) != refcountRef(before, order, j) {
				t.Fatalf("order %d: setting entry %d changed entry %d", order, idx, j)
			}
		}
	})
}

// imageSeedPrefix names the whole-image seeds in seedDir: small qemu-img
// images (512-byte clusters where the feature allows, so that the fuzzer
// mutates metadata rather than data), made by TestUpdateImageSeeds.
const imageSeedPrefix = "image-"

// imageSeedCases are the images behind the whole-image seeds: qemu-img
// create options and qemu-io commands.
var imageSeedCases = []struct {
	name, opts string
	size       string
	io         []string
}{
	{"plain", "cluster_size=512", "64k", []string{"write -P 1 0 1k", "write -z 2k 512", "write -P 2 60k 4k"}},
	{"compressed", "cluster_size=512", "64k", []string{"write -c -P 3 0 512", "write -c -P 4 4k 512", "write -P 5 8k 512"}},
	{"zstd", "cluster_size=512,compression_type=zstd", "64k", []string{"write -c -P 3 0 512", "write -P 6 1k 512"}},
	{"v2", "cluster_size=512,compat=0.10", "64k", []string{"write -P 7 0 1k", "write -z 4k 512"}},
	{"refcount1", "cluster_size=512,refcount_bits=1", "64k", []string{"write -P 8 0 2k"}},
	{"refcount64", "cluster_size=512,refcount_bits=64", "64k", []string{"write -P 9 0 2k"}},
	{"extl2", "cluster_size=16k,extended_l2=on", "64k", []string{"write -P 10 0 1k", "write -z 2k 1k", "write -P 11 17k 512"}},
	{"lazy", "cluster_size=512,lazy_refcounts=on", "64k", []string{"write -P 12 0 1k"}},
}

// TestUpdateImageSeeds regenerates the whole-image fuzz seeds with qemu-img:
//
//	IMGFUSE_UPDATE_SEEDS=1 go test -run TestUpdateImageSeeds ./drivers/qcow2/
func TestUpdateImageSeeds(t *testing.T) {
	if os.Getenv("IMGFUSE_UPDATE_SEEDS") == "" {
		t.Skip("set IMGFUSE_UPDATE_SEEDS=1 to regenerate the seeds from qemu-img")
	}
	for _, c := range imageSeedCases {
		p := filepath.Join(t.TempDir(), "seed.qcow2")
		driverstest.Cmd(t, "qemu-img", "create", "-q", "-f", "qcow2", "-o", c.opts, p, c.size)
		driverstest.QemuIO(t, p, c.io...)
		if c.name == "plain" {
			driverstest.Cmd(t, "qemu-img", "snapshot", "-c", "s1", p)
			driverstest.QemuIO(t, p, "write -P 13 0 512")
		}
		b, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(seedDir, imageSeedPrefix+c.name+".bin"), b, 0o644); err != nil {
			t.Fatal(err)
		}
	}
}

// FuzzOpenImage opens mutated qemu-img images read-only and reads them
// through the driver: the whole disk (at most 1 MiB of it), its block
// status, its info and snapshots. Nothing may panic or hang, and a
// refused open or a failed read must say why with one of the sentinels
// (or an I/O error from the file).
func FuzzOpenImage(f *testing.F) {
	for _, b := range seedFiles(f, imageSeedPrefix) {
		f.Add(b)
	}
	dir := f.TempDir()
	if d, err := os.MkdirTemp("/dev/shm", "qcow2fuzz"); err == nil {
		dir = d
		f.Cleanup(func() { os.RemoveAll(d) })
	}
	path := filepath.Join(dir, "img.qcow2")
	f.Fuzz(func(t *testing.T, data []byte) {
		if err := os.WriteFile(path, data, 0o644); err != nil {
			t.Fatal(err)
		}
		d, err := Format{}.Open(path, drivers.OpenOptions{ReadOnly: true, NoDirectIO: true})
		if err != nil {
			checkFuzzErr(t, err)
			return
		}
		defer d.Close()
		img := d.(*image)
		_ = img.Info()
		_ = img.Snapshots()
		_ = img.Files()
		if dmg := img.Damage(); dmg != nil && !errors.Is(dmg, drivers.ErrCorrupt) {
			t.Fatalf("Damage wraps no ErrCorrupt: %v", dmg)
		}
		size := d.Size()
		buf := make([]byte, 64<<10)
		coroutine.Run(func(co *coroutine.Co) {
			for off := int64(0); off < min(size, 1<<20); off += int64(len(buf)) {
				p := buf[:min(int64(len(buf)), size-off)]
				if _, err := d.ReadAt(co, p, off); err != nil {
					checkFuzzErr(t, err)
				}
			}
			for off, steps := int64(0), 0; off < size && steps < 256; steps++ {
				ext, err := d.BlockStatus(co, off)
				if err != nil {
					checkFuzzErr(t, err)
					break
				}
				if ext.Off != off || ext.Len <= 0 {
					t.Fatalf("block status at %#x: extent %+v", off, ext)
				}
				off += ext.Len
			}
		})
	})
}

// checkFuzzErr fails t for an error that names no cause a user could act
// on: not corrupt, unsupported, or an I/O error of the file.
func checkFuzzErr(t *testing.T, err error) {
	t.Helper()
	var pe *os.PathError
	switch {
	case errors.Is(err, drivers.ErrCorrupt), errors.Is(err, drivers.ErrUnsupported),
		errors.Is(err, drivers.ErrUnknownFormat), errors.As(err, &pe), errors.Is(err, io.ErrUnexpectedEOF):
	default:
		t.Fatalf("error wraps no sentinel: %v", err)
	}
}
