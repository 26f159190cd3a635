package qcow2

import (
	"bytes"
	"compress/flate"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/klauspost/compress/zstd"

	"imgfuse/coroutine"
	"imgfuse/drivers"
	"imgfuse/drivers/driverstest"
)

// compressibleData returns n bytes mixing text-like runs (compressible),
// zero runs and random runs (incompressible), in 4 KiB pieces, so that
// qemu-img convert -c produces compressed, uncompressed and unallocated
// clusters depending on the cluster size.
func compressibleData(n int, seed uint64) []byte {
	r := rand.New(rand.NewPCG(seed, 1))
	words := []string{"qcow2 ", "cluster ", "refcount ", "snapshot ", "backing ", "zstd ", "deflate ", "\n", "L2 ", "0xdeadbeef "}
	out := make([]byte, 0, n)
	for len(out) < n {
		piece := make([]byte, 0, 4096)
		switch k := r.IntN(8); {
		case k < 5:
			for len(piece) < 4096 {
				piece = append(piece, words[r.IntN(len(words))]...)
			}
		case k < 6:
			piece = piece[:4096] // zeros
		default:
			piece = piece[:4096]
			for i := range piece {
				piece[i] = byte(r.Uint32())
			}
		}
		out = append(out, piece[:4096]...)
	}
	return out[:n]
}

// qemuCompressed writes src as a qcow2 image with `qemu-img convert -c`
// (compression type typ, cluster size cs) and returns its path and what
// `qemu-img convert -O raw` reads from it.
func qemuCompressed(t *testing.T, src []byte, typ, cs string) (img string, ref []byte) {
	t.Helper()
	dir := t.TempDir()
	in := filepath.Join(dir, "in.raw")
	if err := os.WriteFile(in, src, 0o644); err != nil {
		t.Fatal(err)
	}
	img = filepath.Join(dir, "c.qcow2")
	out := filepath.Join(dir, "out.raw")
	qemuImg(t, "convert", "-c", "-f", "raw", "-O", "qcow2", "-o", "compression_type="+typ+",cluster_size="+cs, in, img)
	qemuImg(t, "convert", "-f", "qcow2", "-O", "raw", img, out)
	ref, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	return img, ref
}

// compressedCluster is one compressed L2 entry, decoded the way
// qcow2.md §1.7 describes.
type compressedCluster struct {
	guest, coffset, csize int64
}

// findCompressedClusters walks the active L1/L2 tables of a (non
// extended-L2) image file and lists its compressed clusters. It is a test
// oracle independent of the driver's mapping code.
func findCompressedClusters(t *testing.T, file []byte, h *header) []compressedCluster {
	t.Helper()
	cs := h.clusterSize()
	l2e := cs / 8
	x := 62 - (h.ClusterBits - 8)
	var out []compressedCluster
	for i := int64(0); i < int64(h.L1Size); i++ {
		l1 := binary.BigEndian.Uint64(file[int64(h.L1Offset)+8*i:])
		l2off := int64(l1 & l1eOffsetMask)
		if l2off == 0 {
			continue
		}
		for j := int64(0); j < l2e; j++ {
			e := binary.BigEndian.Uint64(file[l2off+8*j:])
			if e&oflagCompressed == 0 {
				continue
			}
			desc := e &^ (oflagCopied | oflagCompressed)
			coff := int64(desc & (1<<x - 1))
			nsec := int64(desc>>x&(1<<(h.ClusterBits-8)-1)) + 1
			out = append(out, compressedCluster{
				guest:   (i*l2e + j) * cs,
				coffset: coff,
				csize:   nsec*512 - coff&511,
			})
		}
	}
	return out
}

// TestDecompressQemuClusters decodes every compressed cluster of images
// written by `qemu-img convert -c` and compares it with
// `qemu-img convert -O raw`.
func TestDecompressQemuClusters(t *testing.T) {
	driverstest.RequireTools(t, "qemu-img")
	src := compressibleData(5<<20+3000, 42)
	for _, typ := range []string{"zlib", "zstd"} {
		for _, cs := range []string{"4k", "64k", "2M"} {
			t.Run(typ+"/"+cs, func(t *testing.T) {
				t.Parallel()
				img, ref := qemuCompressed(t, src, typ, cs)
				file, err := os.ReadFile(img)
				if err != nil {
					t.Fatal(err)
				}
				h, err := parseHeader(file[:min(len(file), 2<<20)], int64(len(file)))
				if err != nil {
					t.Fatal(err)
				}
				clusters := findCompressedClusters(t, file, h)
				if len(clusters) < 2 {
					t.Fatalf("only %d compressed clusters; the test data is not mixed enough", len(clusters))
				}
				csz := h.clusterSize()
				dst := make([]byte, csz)
				want := make([]byte, csz)
				for _, c := range clusters {
					// The range may end past EOF: reads there are zeros.
					in := make([]byte, c.csize)
					if c.coffset < int64(len(file)) {
						copy(in, file[c.coffset:])
					}
					if err := decompressCluster(h.CompressionType, in, dst); err != nil {
						t.Fatalf("cluster at guest %#x (coffset %#x csize %d): %v", c.guest, c.coffset, c.csize, err)
					}
					clear(want)
					if c.guest < int64(len(ref)) {
						copy(want, ref[c.guest:])
					}
					if !bytes.Equal(dst, want) {
						t.Fatalf("cluster at guest %#x decodes differently from qemu-img", c.guest)
					}
				}
				t.Logf("%d compressed clusters match", len(clusters))
			})
		}
	}
}

func TestCompressRoundTrip(t *testing.T) {
	data := compressibleData(256<<10, 7)
	random := make([]byte, 64<<10)
	for i := range random {
		random[i] = byte(rand.Uint32())
	}
	for _, typ := range []uint8{compressionDeflate, compressionZstd} {
		for _, cs := range []int{512, 4096, 64 << 10} {
			t.Run(fmt.Sprintf("%s/%d", compressionName(typ), cs), func(t *testing.T) {
				for off := 0; off+cs <= len(data); off += cs {
					c, ok := compressCluster(typ, data[off:off+cs])
					if !ok {
						continue // random pieces do not compress
					}
					if len(c) >= cs {
						t.Fatalf("compressed to %d bytes, not below the cluster size", len(c))
					}
					// The stream is followed by the next cluster's bytes
					// on disk; decoding must stop after one cluster.
					c = append(c, data[:700]...)
					dst := make([]byte, cs)
					if err := decompressCluster(typ, c, dst); err != nil {
						t.Fatal(err)
					}
					if !bytes.Equal(dst, data[off:off+cs]) {
						t.Fatalf("round trip at %d differs", off)
					}
				}
				if _, ok := compressCluster(typ, random[:cs]); ok {
					t.Error("random data reported as compressible")
				}
			})
		}
	}
	if _, ok := compressCluster(7, data[:4096]); ok {
		t.Error("unknown type compressed")
	}
}

func TestDecompressErrors(t *testing.T) {
	data := compressibleData(64<<10, 3)
	zl, _ := compressCluster(compressionDeflate, data)
	zs, _ := compressCluster(compressionZstd, data)
	var zlibHdr bytes.Buffer // a zlib (RFC 1950) stream is not what qcow2 stores
	{
		w, _ := flate.NewWriter(&zlibHdr, 5)
		zlibHdr.Write([]byte{0x78, 0x9c})
		w.Write(data)
		w.Close()
	}
	tests := []struct {
		name string
		typ  uint8
		src  []byte
	}{
		{"zlib truncated", compressionDeflate, zl[:len(zl)/2]},
		{"zlib empty", compressionDeflate, nil},
		{"zlib garbage", compressionDeflate, bytes.Repeat([]byte{0xff}, 1000)},
		{"zlib with header", compressionDeflate, zlibHdr.Bytes()[:100]},
		{"zstd truncated", compressionZstd, zs[:len(zs)/2]},
		{"zstd empty", compressionZstd, nil},
		{"zstd garbage", compressionZstd, bytes.Repeat([]byte{0xff}, 1000)},
		{"zstd bad magic", compressionZstd, append([]byte{0, 0, 0, 0}, zs[4:]...)},
		// A frame declaring a 1 GiB window (window descriptor 0xa0:
		// log 30) with one raw block: refused before any allocation.
		{"zstd 1 GiB window", compressionZstd, append([]byte{0x28, 0xb5, 0x2f, 0xfd, 0x00, 0xa0, 0x01, 0x02, 0x00}, data[:64]...)},
		{"unknown type", 5, zs},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			dst := make([]byte, len(data))
			err := decompressCluster(tc.typ, tc.src, dst)
			if !errors.Is(err, drivers.ErrCorrupt) {
				t.Fatalf("err = %v, want ErrCorrupt", err)
			}
		})
	}
}

// TestDecompressZstdFrames checks what QEMU accepts: a cluster split over
// several frames, followed by the next cluster's frame. One-shot DecodeAll
// rejects the trailing bytes; the streaming decode must not.
func TestDecompressZstdFrames(t *testing.T) {
	data := compressibleData(64<<10, 11)
	enc, err := zstd.NewWriter(nil)
	if err != nil {
		t.Fatal(err)
	}
	var src []byte
	src = enc.EncodeAll(data[:10000], src)
	src = enc.EncodeAll(data[10000:], src)
	src = enc.EncodeAll(data[:5000], src) // the next cluster's stream
	src = append(src, 0xde, 0xad)         // and the start of garbage
	dst := make([]byte, len(data))
	if err := decompressCluster(compressionZstd, src, dst); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(dst, data) {
		t.Fatal("multi-frame cluster decoded wrongly")
	}
}

// TestDecompressConcurrent runs decoders from many goroutines (run with
// -race): the pools must hand each decoder to one user at a time.
func TestDecompressConcurrent(t *testing.T) {
	data := compressibleData(64<<10, 5)
	streams := map[uint8][]byte{}
	for _, typ := range []uint8{compressionDeflate, compressionZstd} {
		c, ok := compressCluster(typ, data)
		if !ok {
			t.Fatal("not compressible")
		}
		streams[typ] = c
	}
	var wg sync.WaitGroup
	errs := make(chan error, 16)
	for g := 0; g < 16; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			dst := make([]byte, len(data))
			for i := 0; i < 20; i++ {
				typ := uint8((g + i) % 2)
				if err := decompressCluster(typ, streams[typ], dst); err != nil {
					errs <- err
					return
				}
				if !bytes.Equal(dst, data) {
					errs <- fmt.Errorf("goroutine %d: wrong data", g)
					return
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
}

// BenchmarkDecompressCluster measures one 64 KiB cluster, with the pooled
// decoders and with a decoder created per call (what pooling saves).
func BenchmarkDecompressCluster(b *testing.B) {
	data := compressibleData(64<<10, 9)
	for _, typ := range []uint8{compressionDeflate, compressionZstd} {
		src, ok := compressCluster(typ, data)
		if !ok {
			b.Fatal("not compressible")
		}
		dst := make([]byte, len(data))
		b.Run(compressionName(typ)+"/pooled", func(b *testing.B) {
			b.SetBytes(int64(len(data)))
			b.ReportAllocs()
			for b.Loop() {
				if err := decompressCluster(typ, src, dst); err != nil {
					b.Fatal(err)
				}
			}
		})
		b.Run(compressionName(typ)+"/fresh", func(b *testing.B) {
			b.SetBytes(int64(len(data)))
			b.ReportAllocs()
			for b.Loop() {
				var err error
				if typ == compressionDeflate {
					r := flate.NewReader(bytes.NewReader(src))
					_, err = io.ReadFull(r, dst)
				} else {
					var d *zstd.Decoder
					d, err = zstd.NewReader(bytes.NewReader(src), zstd.WithDecoderConcurrency(1), zstd.WithDecoderLowmem(true))
					if err == nil {
						_, err = io.ReadFull(d, dst)
						d.Close()
					}
				}
				if err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

func BenchmarkCompressCluster(b *testing.B) {
	data := compressibleData(64<<10, 9)
	for _, typ := range []uint8{compressionDeflate, compressionZstd} {
		b.Run(compressionName(typ), func(b *testing.B) {
			b.SetBytes(int64(len(data)))
			b.ReportAllocs()
			for b.Loop() {
				if _, ok := compressCluster(typ, data); !ok {
					b.Fatal("not compressible")
				}
			}
		})
	}
}

// TestQemuReadsOurClusters replaces every compressed cluster of a
// qemu-img image with a stream from compressCluster, packed byte-granular
// at the end of the file (so streams share sectors, as QEMU packs them),
// and checks that `qemu-img convert -O raw` still yields the original
// data: QEMU can read what a compressed write of ours would store.
func TestQemuReadsOurClusters(t *testing.T) {
	driverstest.RequireTools(t, "qemu-img")
	src := compressibleData(2<<20, 77)
	for _, typ := range []string{"zlib", "zstd"} {
		t.Run(typ, func(t *testing.T) {
			t.Parallel()
			dir := t.TempDir()
			in := filepath.Join(dir, "in.raw")
			if err := os.WriteFile(in, src, 0o644); err != nil {
				t.Fatal(err)
			}
			img := filepath.Join(dir, "c.qcow2")
			driverstest.Cmd(t, "qemu-img", "convert", "-c", "-f", "raw", "-O", "qcow2",
				"-o", "compression_type="+typ+",cluster_size=64k", in, img)
			file, err := os.ReadFile(img)
			if err != nil {
				t.Fatal(err)
			}
			h, err := parseHeader(file[:min(len(file), 2<<20)], int64(len(file)))
			if err != nil {
				t.Fatal(err)
			}
			cs := h.clusterSize()
			x := 62 - (h.ClusterBits - 8)
			file = append(file, make([]byte, (cs-int64(len(file))%cs)%cs)...)
			clusters := findCompressedClusters(t, file, h)
			for _, c := range clusters {
				stream, ok := compressCluster(h.CompressionType, src[c.guest:c.guest+cs])
				if !ok {
					t.Fatalf("cluster at %#x: QEMU compressed it, we could not", c.guest)
				}
				coff := int64(len(file))
				file = append(file, stream...)
				sectors := (coff+int64(len(stream))-1)/512 - coff/512
				entry := uint64(oflagCompressed) | uint64(sectors)<<x | uint64(coff)
				// Rewrite the L2 entry that pointed at the old stream.
				l1 := binary.BigEndian.Uint64(file[int64(h.L1Offset)+8*(c.guest/cs/(cs/8)):])
				l2off := int64(l1&l1eOffsetMask) + 8*(c.guest/cs%(cs/8))
				binary.BigEndian.PutUint64(file[l2off:], entry)
			}
			if err := os.WriteFile(img, file, 0o644); err != nil {
				t.Fatal(err)
			}
			out := filepath.Join(dir, "out.raw")
			driverstest.Cmd(t, "qemu-img", "convert", "-f", "qcow2", "-O", "raw", img, out)
			got, err := os.ReadFile(out)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, src) {
				t.Fatalf("QEMU read our %d compressed clusters differently", len(clusters))
			}
			t.Logf("QEMU read %d clusters compressed by us", len(clusters))
		})
	}
}

// TestReadCompressedRuns reads images written by `qemu-img convert -c`
// (compressed clusters among stored and unallocated ones) with requests of
// every size from a byte to 1.5 MiB at unaligned offsets, so that runs of
// compressed clusters are read and decompressed together (whole and
// partial clusters, some cached), and compares with `qemu-img convert -O
// raw`. Then it damages one compressed stream: a read across it returns
// the bytes before it, right, and an error that names it.
func TestReadCompressedRuns(t *testing.T) {
	driverstest.RequireTools(t, "qemu-img")
	src := compressibleData(6<<20+777, 9)
	for _, typ := range []string{"zlib", "zstd"} {
		for _, cs := range []string{"4k", "64k"} {
			t.Run(typ+"/"+cs, func(t *testing.T) {
				t.Parallel()
				img, ref := qemuCompressed(t, src, typ, cs)
				dir := filepath.Dir(img)
				var err error
				d := openTest(t, img, drivers.OpenOptions{})
				r := rand.New(rand.NewPCG(3, 4))
				buf := make([]byte, 3<<19)
				for i := range 300 {
					n := 1 + r.IntN(len(buf))
					if i%3 == 0 {
						n = 1 + r.IntN(70000)
					}
					off := r.Int64N(int64(len(ref) - n))
					var got int
					coroutine.Run(func(co *coroutine.Co) { got, err = d.ReadAt(co, buf[:n], off) })
					if err != nil || got != n {
						t.Fatalf("ReadAt(%d bytes at %#x) = %d, %v", n, off, got, err)
					}
					if !bytes.Equal(buf[:n], ref[off:off+int64(n)]) {
						t.Fatalf("ReadAt(%d bytes at %#x) differs from qemu-img", n, off)
					}
				}

				// Damage the stream of a compressed cluster that has
				// compressed clusters before it.
				file, err := os.ReadFile(img)
				if err != nil {
					t.Fatal(err)
				}
				h, err := parseHeader(file[:min(len(file), 2<<20)], int64(len(file)))
				if err != nil {
					t.Fatal(err)
				}
				cl := findCompressedClusters(t, file, h)
				var bad compressedCluster
				for i := 1; i < len(cl); i++ {
					if cl[i-1].guest == cl[i].guest-h.clusterSize() && cl[i].guest > 4*h.clusterSize() {
						bad = cl[i]
						break
					}
				}
				if bad.csize == 0 {
					t.Fatal("no two consecutive compressed clusters")
				}
				for j := range bad.csize {
					file[bad.coffset+j] = 0xa5
				}
				damaged := filepath.Join(dir, "damaged.qcow2")
				if err := os.WriteFile(damaged, file, 0o644); err != nil {
					t.Fatal(err)
				}
				d2 := openTest(t, damaged, drivers.OpenOptions{})
				off := bad.guest - h.clusterSize() - 100
				n := int(3*h.clusterSize() + 200)
				var got int
				coroutine.Run(func(co *coroutine.Co) { got, err = d2.ReadAt(co, buf[:n], off) })
				if !errors.Is(err, drivers.ErrCorrupt) {
					t.Fatalf("read across a damaged stream: %d, %v; want ErrCorrupt", got, err)
				}
				if want := int(bad.guest - off); got != want {
					t.Errorf("read across a damaged stream filled %d bytes, want the %d before it", got, want)
				}
				if !bytes.Equal(buf[:got], ref[off:off+int64(got)]) {
					t.Error("the bytes before the damaged stream differ")
				}
				if !strings.Contains(err.Error(), fmt.Sprintf("%#x", bad.guest)) {
					t.Errorf("error %q does not name guest %#x", err, bad.guest)
				}
			})
		}
	}
}
