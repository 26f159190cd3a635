package qcow2

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"maps"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"imgfuse/coroutine"
	"imgfuse/drivers"
	"imgfuse/drivers/driverstest"
	"imgfuse/drivers/raw"
)

// hostileBase is the image every hostile case starts from: 4 MiB, 64 KiB
// clusters, data 0x11 in [0, 1M), a compressed cluster of 0x22 at 2M, a
// zero cluster at 3M. Its layout, from qemu-img: header, reftable,
// refblock, L1, L2, data.
type hostileBase struct {
	b        []byte
	l1, rt   int64
	l2       int64 // the one L2 table
	cEntry   int64 // file offset of the compressed cluster's L2 entry
	want     []byte
	fileSize int64
}

const hostileCluster = 65536

func buildHostileBase(t *testing.T) hostileBase {
	t.Helper()
	driverstest.RequireTools(t, "qemu-img", "qemu-io")
	p := filepath.Join(t.TempDir(), "base.qcow2")
	driverstest.Cmd(t, "qemu-img", "create", "-q", "-f", "qcow2", p, "4M")
	driverstest.QemuIO(t, p, "write -P 0x11 0 1M", "write -c -P 0x22 2M 64k", "write -z 3M 64k")
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	hb := hostileBase{b: b, fileSize: int64(len(b))}
	hb.l1 = int64(binary.BigEndian.Uint64(b[40:]))
	hb.rt = int64(binary.BigEndian.Uint64(b[48:]))
	hb.l2 = int64(binary.BigEndian.Uint64(b[hb.l1:]) & l2eOffsetMask)
	hb.cEntry = hb.l2 + 32*8
	if binary.BigEndian.Uint64(b[hb.cEntry:])&oflagCompressed == 0 {
		t.Fatal("base image: cluster at 2M is not compressed")
	}
	hb.want = make([]byte, 4<<20)
	copy(hb.want, bytes.Repeat([]byte{0x11}, 1<<20))
	copy(hb.want[2<<20:], bytes.Repeat([]byte{0x22}, 64<<10))
	return hb
}

// put64 and put32 write big-endian fields into a copy-on-write image.
func put64(b []byte, off int64, v uint64) { binary.BigEndian.PutUint64(b[off:], v) }
func put32(b []byte, off int64, v uint32) { binary.BigEndian.PutUint32(b[off:], v) }

// compressedAt appends stream to b at a cluster boundary and points the
// compressed cluster's L2 entry at it, claiming sectors 512-byte sectors.
func compressedAt(b []byte, hb hostileBase, stream []byte, sectors uint64) []byte {
	off := (int64(len(b)) + hostileCluster - 1) &^ (hostileCluster - 1)
	b = append(b, make([]byte, off-int64(len(b)))...)
	b = append(b, stream...)
	x := uint64(62 - (16 - 8))
	put64(b, hb.cEntry, oflagCompressed|(sectors-1)<<x|uint64(off))
	return b
}

// bomb returns a deflate or zstd stream that decodes to 4 MiB of zeros
// (64 clusters from at most one); the zstd frame declares the largest
// window zstd allows. Made with klauspost/compress/zstd
// (WithWindowSize(MaxWindowSize)) and compress/flate (BestCompression),
// kept as files because making them under -race takes seconds.
func bomb(t *testing.T, zstdFmt bool) []byte {
	t.Helper()
	name := "deflate-bomb.bin"
	if zstdFmt {
		name = "zstd-bomb.bin"
	}
	b, err := os.ReadFile(filepath.Join("testdata", "hostile", name))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// hostileCase is one hostile image: a mutation of the base image (or a
// chain of files), and what a reader must do with it.
type hostileCase struct {
	name string
	// mutate returns the image bytes; dir is where it lives (for backing
	// files).
	mutate func(t *testing.T, hb hostileBase, dir string) []byte
	// openFails: the open must be refused with an error matching msg.
	openFails bool
	msg       string
	// bad is the guest range [bad[0], bad[1]) the damage may reach: a
	// read there returns what the damaged image maps there
	// (driverstest.Qcow2Oracle) or fails with ErrCorrupt, and must fail
	// where the mapping names metadata; outside it every read returns
	// the base image's bytes.
	bad [2]int64
	// stream is what the compressed cluster at 2M decodes to.
	stream streamKind
}

// streamKind is what a compressed cluster's stream decodes to.
type streamKind uint8

const (
	// streamBase: the base image's cluster of 0x22.
	streamBase streamKind = iota
	// streamZeros: a cluster of zeros (the bombs decode to zeros).
	streamZeros
	// streamGarbage: nothing: the read must fail.
	streamGarbage
)

// decoded returns what a compressed cluster with stream k reads as; nil:
// the read must fail.
func (k streamKind) decoded() []byte {
	switch k {
	case streamBase:
		return bytes.Repeat([]byte{0x22}, hostileCluster)
	case streamZeros:
		return make([]byte, hostileCluster)
	}
	return nil
}

func hostileCases() []hostileCase {
	all := [2]int64{0, 4 << 20}
	comp := [2]int64{2 << 20, 2<<20 + 64<<10}
	return []hostileCase{
		// An L1 table past EOF (a truncated copy) opens read-only, as
		// every piece of metadata past EOF does (bounds.go): lookups
		// in the part the file lacks fail, the rest reads right.
		{name: "L1 past EOF", bad: all,
			mutate: func(t *testing.T, hb hostileBase, _ string) []byte { put64(hb.b, 40, 1<<30); return hb.b }},
		{name: "L1 at the header", bad: all,
			mutate: func(t *testing.T, hb hostileBase, _ string) []byte { put64(hb.b, 40, 0); return hb.b }},
		{name: "L1 size absurd", openFails: true, msg: "too large",
			mutate: func(t *testing.T, hb hostileBase, _ string) []byte { put32(hb.b, 36, 0x7fffffff); return hb.b }},
		{name: "L1 size past EOF",
			mutate: func(t *testing.T, hb hostileBase, _ string) []byte { put32(hb.b, 36, 1<<20); return hb.b }},
		{name: "L2 table past EOF", bad: all,
			mutate: func(t *testing.T, hb hostileBase, _ string) []byte {
				put64(hb.b, hb.l1, oflagCopied|1<<40)
				return hb.b
			}},
		// Offset 0 in an L1 entry means no table, whatever the flags:
		// the disk reads as zeros, as in QEMU.
		{name: "L1 entry COPIED with offset 0", bad: all,
			mutate: func(t *testing.T, hb hostileBase, _ string) []byte { put64(hb.b, hb.l1, oflagCopied); return hb.b }},
		{name: "L2 table is the L1 table", bad: all,
			mutate: func(t *testing.T, hb hostileBase, _ string) []byte {
				put64(hb.b, hb.l1, oflagCopied|uint64(hb.l1))
				return hb.b
			}},
		{name: "data cluster past EOF", bad: [2]int64{0, 64 << 10},
			mutate: func(t *testing.T, hb hostileBase, _ string) []byte {
				put64(hb.b, hb.l2, oflagCopied|1<<40)
				return hb.b
			}},
		// L2 entries naming metadata as guest data: QEMU returns the
		// metadata's bytes; the oracle requires EIO. (Host offset 0
		// reads as unallocated, so the header is reached only by a
		// compressed cluster, below.)
		{name: "data cluster is its own L2 table", bad: [2]int64{64 << 10, 128 << 10},
			mutate: func(t *testing.T, hb hostileBase, _ string) []byte {
				put64(hb.b, hb.l2+8, oflagCopied|uint64(hb.l2))
				return hb.b
			}},
		{name: "data cluster is the L1 table", bad: [2]int64{128 << 10, 192 << 10},
			mutate: func(t *testing.T, hb hostileBase, _ string) []byte {
				put64(hb.b, hb.l2+2*8, oflagCopied|uint64(hb.l1))
				return hb.b
			}},
		{name: "data cluster is the refcount table", bad: [2]int64{192 << 10, 256 << 10},
			mutate: func(t *testing.T, hb hostileBase, _ string) []byte {
				put64(hb.b, hb.l2+3*8, oflagCopied|uint64(hb.rt))
				return hb.b
			}},
		{name: "data cluster is a refcount block", bad: [2]int64{256 << 10, 320 << 10},
			mutate: func(t *testing.T, hb hostileBase, _ string) []byte {
				rb := binary.BigEndian.Uint64(hb.b[hb.rt:]) & reftOffsetMask
				put64(hb.b, hb.l2+4*8, oflagCopied|rb)
				return hb.b
			}},
		{name: "compressed cluster in the header", bad: comp, stream: streamGarbage,
			mutate: func(t *testing.T, hb hostileBase, _ string) []byte {
				put64(hb.b, hb.cEntry, oflagCompressed|1<<(62-8)|0x200)
				return hb.b
			}},
		{name: "compressed cluster over the L1 table", bad: comp, stream: streamGarbage,
			mutate: func(t *testing.T, hb hostileBase, _ string) []byte {
				// A deflate stream that copies what follows it (a
				// stored block) would read the table as data.
				put64(hb.b, hb.cEntry, oflagCompressed|1<<(62-8)|uint64(hb.l1-256))
				return hb.b
			}},
		{name: "refcount table overlaps L1", bad: all,
			mutate: func(t *testing.T, hb hostileBase, _ string) []byte { put64(hb.b, 48, uint64(hb.l1)); return hb.b }},
		{name: "refcount table size absurd", openFails: true, msg: "too large|refcount",
			mutate: func(t *testing.T, hb hostileBase, _ string) []byte { put32(hb.b, 56, 0xffffffff); return hb.b }},
		{name: "snapshot count absurd", openFails: true, msg: "snapshot",
			mutate: func(t *testing.T, hb hostileBase, _ string) []byte {
				put32(hb.b, 60, 0xffffffff)
				put64(hb.b, 64, hostileCluster)
				return hb.b
			}},
		// QEMU reads the table's bytes past EOF as zeros and lists
		// empty snapshots; so does imgfuse. The active disk is intact.
		{name: "snapshot table past EOF",
			mutate: func(t *testing.T, hb hostileBase, _ string) []byte {
				put32(hb.b, 60, 1000)
				put64(hb.b, 64, 1<<40)
				return hb.b
			}},
		{name: "extension length absurd", openFails: true, msg: "extension",
			mutate: func(t *testing.T, hb hostileBase, _ string) []byte {
				hl := int64(binary.BigEndian.Uint32(hb.b[100:]))
				put32(hb.b, hl+4, 0xfffffff0)
				return hb.b
			}},
		{name: "backing name length absurd", openFails: true, msg: "backing",
			mutate: func(t *testing.T, hb hostileBase, _ string) []byte {
				put64(hb.b, 8, 0x1000)
				put32(hb.b, 16, 0xffffffff)
				return hb.b
			}},
		{name: "backing name past EOF", openFails: true, msg: "backing",
			mutate: func(t *testing.T, hb hostileBase, _ string) []byte {
				put64(hb.b, 8, 1<<40)
				put32(hb.b, 16, 100)
				return hb.b
			}},
		{name: "cluster_bits 8", openFails: true, msg: "cluster",
			mutate: func(t *testing.T, hb hostileBase, _ string) []byte { put32(hb.b, 20, 8); return hb.b }},
		{name: "cluster_bits 63", openFails: true, msg: "cluster",
			mutate: func(t *testing.T, hb hostileBase, _ string) []byte { put32(hb.b, 20, 63); return hb.b }},
		{name: "virtual size 2^63", openFails: true, msg: "size|L1",
			mutate: func(t *testing.T, hb hostileBase, _ string) []byte { put64(hb.b, 24, 1<<63); return hb.b }},
		{name: "compressed size two clusters", bad: comp,
			mutate: func(t *testing.T, hb hostileBase, _ string) []byte {
				x := uint64(62 - (16 - 8))
				e := binary.BigEndian.Uint64(hb.b[hb.cEntry:])
				put64(hb.b, hb.cEntry, e|(1<<(16-8)-1)<<x)
				return hb.b
			}},
		{name: "compressed stream past EOF", bad: comp,
			mutate: func(t *testing.T, hb hostileBase, _ string) []byte {
				put64(hb.b, hb.cEntry, oflagCompressed|1<<40)
				return hb.b
			}},
		{name: "compressed garbage", bad: comp, stream: streamGarbage,
			mutate: func(t *testing.T, hb hostileBase, _ string) []byte {
				return compressedAt(hb.b, hb, bytes.Repeat([]byte{0xff, 0x13}, 4096), 16)
			}},
		{name: "deflate bomb", bad: comp, stream: streamZeros,
			mutate: func(t *testing.T, hb hostileBase, _ string) []byte {
				s := bomb(t, false)
				s = s[:min(len(s), 2*hostileCluster)]
				return compressedAt(hb.b, hb, s, uint64(len(s)+511)/512)
			}},
		{name: "zstd bomb", bad: comp, stream: streamZeros,
			mutate: func(t *testing.T, hb hostileBase, _ string) []byte {
				b := hb.b
				b[104] = compressionZstd
				binary.BigEndian.PutUint64(b[72:], binary.BigEndian.Uint64(b[72:])|incompatCompression)
				s := bomb(t, true)
				s = s[:min(len(s), 2*hostileCluster)]
				return compressedAt(b, hb, s, uint64(len(s)+511)/512)
			}},
		{name: "backing loop to itself", openFails: true, msg: "loop",
			mutate: func(t *testing.T, hb hostileBase, dir string) []byte {
				return withBacking(t, hb, "img.qcow2", "qcow2")
			}},
		{name: "backing loop of two", openFails: true, msg: "loop",
			mutate: func(t *testing.T, hb hostileBase, dir string) []byte {
				other := withBacking(t, hostileBase{b: bytes.Clone(hb.b)}, "img.qcow2", "qcow2")
				if err := os.WriteFile(filepath.Join(dir, "other.qcow2"), other, 0o644); err != nil {
					t.Fatal(err)
				}
				return withBacking(t, hb, "other.qcow2", "qcow2")
			}},
		{name: "backing chain too deep", openFails: true, msg: "deeper",
			mutate: func(t *testing.T, hb hostileBase, dir string) []byte {
				// Empty layers: the chain's length is the point.
				lp := filepath.Join(dir, "empty.qcow2")
				driverstest.Cmd(t, "qemu-img", "create", "-q", "-f", "qcow2", lp, "4M")
				base, err := os.ReadFile(lp)
				if err != nil {
					t.Fatal(err)
				}
				for i := range maxChainDepth + 1 {
					l := withBacking(t, hostileBase{b: bytes.Clone(base)}, layerName(i+1), "qcow2")
					if err := os.WriteFile(filepath.Join(dir, layerName(i)), l, 0o644); err != nil {
						t.Fatal(err)
					}
				}
				return withBacking(t, hb, layerName(0), "qcow2")
			}},
		{name: "backing FIFO", openFails: true, msg: "FIFO",
			mutate: func(t *testing.T, hb hostileBase, dir string) []byte {
				if err := unix.Mkfifo(filepath.Join(dir, "fifo"), 0o644); err != nil {
					t.Fatal(err)
				}
				return withBacking(t, hb, "fifo", "")
			}},
		{name: "backing /dev/zero", openFails: true, msg: "character device",
			mutate: func(t *testing.T, hb hostileBase, dir string) []byte {
				return withBacking(t, hb, "/dev/zero", "raw")
			}},
		{name: "backing directory", openFails: true, msg: "directory",
			mutate: func(t *testing.T, hb hostileBase, dir string) []byte {
				return withBacking(t, hb, ".", "qcow2")
			}},
	}
}

func layerName(i int) string {
	return "layer" + string(rune('a'+i/26)) + string(rune('a'+i%26)) + ".qcow2"
}

// withBacking sets the backing file name (and format, if not "") of the
// base image: the name goes at 0x1000 (free space in cluster 0 after the
// extensions), the format replaces the extensions.
func withBacking(t *testing.T, hb hostileBase, name, format string) []byte {
	t.Helper()
	b := hb.b
	hl := int64(binary.BigEndian.Uint32(b[100:]))
	ext := b[hl:hl]
	if format != "" {
		ext = binary.BigEndian.AppendUint32(ext, extBackingFmt)
		ext = binary.BigEndian.AppendUint32(ext, uint32(len(format)))
		ext = append(ext, format...)
		ext = append(ext, make([]byte, (8-len(format)%8)%8)...)
	}
	ext = append(ext, make([]byte, 8)...) // end of extensions
	clear(b[hl+int64(len(ext)) : 0x1000])
	copy(b[0x1000:], name)
	put64(b, 8, 0x1000)
	put32(b, 16, uint32(len(name)))
	return b
}

// TestHostileImages opens each hostile image read-only, reads the whole
// disk cluster by cluster and walks its block status: the open fails with
// a one-line error wrapping a sentinel and naming the problem, or reads
// outside the damaged range return the base image's bytes and every read
// inside it is judged against driverstest.Qcow2Oracle (what the damaged
// mapping says, or ErrCorrupt; ErrCorrupt required where it names
// metadata or is invalid); nothing panics or hangs; the Go heap grows by less
// than 64 MiB for any case; no file is written.
//
// Not parallel: the heap bound is measured with runtime.ReadMemStats.
func TestHostileImages(t *testing.T) {
	hb0 := buildHostileBase(t)
	formats := []drivers.Format{Format{}, raw.Format{}}
	for _, c := range hostileCases() {
		t.Run(c.name, func(t *testing.T) {
			dir := t.TempDir()
			hb := hb0
			hb.b = bytes.Clone(hb0.b)
			img := filepath.Join(dir, "img.qcow2")
			damaged := c.mutate(t, hb, dir)
			if err := os.WriteFile(img, damaged, 0o644); err != nil {
				t.Fatal(err)
			}
			before := driverstest.DirState(t, dir)
			time.Sleep(10 * time.Millisecond) // an mtime change would show

			runtime.GC()
			var m0, m1, mOpen runtime.MemStats
			runtime.ReadMemStats(&m0)
			done := make(chan struct{})
			var openErr error
			var readErrs, wrong []string
			go func() {
				defer close(done)
				d, _, err := drivers.Open(img, "auto", drivers.OpenOptions{ReadOnly: true, Formats: formats})
				if err != nil {
					openErr = err
					return
				}
				defer d.Close()
				defer func() {
					runtime.GC()
					runtime.ReadMemStats(&mOpen)
				}()
				oracle, err := driverstest.Qcow2Oracle(damaged)
				if err != nil {
					readErrs = append(readErrs, "the image opened: "+err.Error())
					return
				}
				const chunk = hostileCluster
				buf := make([]byte, chunk)
				coroutine.Run(func(co *coroutine.Co) {
					for off := int64(0); off < d.Size(); off += chunk {
						inBad := off < c.bad[1] && off+chunk > c.bad[0]
						clear(buf)
						_, err := d.ReadAt(co, buf, off)
						if err != nil && !errors.Is(err, drivers.ErrCorrupt) {
							readErrs = append(readErrs, err.Error())
						}
						if msg := driverstest.CheckHostileRead(oracle[off/chunk], err != nil, buf, inBad, c.stream.decoded()); msg != "" {
							wrong = append(wrong, fmt.Sprintf("read at %s: %s (error: %v)", itoa(off), msg, err))
						}
						if err == nil && !inBad && !bytes.Equal(buf, hb.want[off:off+chunk]) {
							wrong = append(wrong, "wrong bytes at "+itoa(off))
						}
					}
					for off, steps := int64(0), 0; off < d.Size() && steps < 1000; steps++ {
						ext, err := d.BlockStatus(co, off)
						if err != nil {
							break
						}
						off += ext.Len
					}
				})
			}()
			select {
			case <-done:
			case <-time.After(20 * time.Second):
				t.Fatal("open and read did not finish in 20 s")
			}
			runtime.ReadMemStats(&m1)
			// The live heap with the image open, after its reads; a
			// refused open is measured once it has returned, which
			// also bounds what it held (the Go heap then shows the
			// peak in TotalAlloc only: bounded too, loosely).
			live := int64(mOpen.HeapAlloc) - int64(m0.HeapAlloc)
			if openErr != nil {
				live = int64(m1.HeapAlloc) - int64(m0.HeapAlloc)
			}
			if live > 64<<20 {
				t.Errorf("the open image holds %d MiB of heap", live>>20)
			}
			if churn := m1.TotalAlloc - m0.TotalAlloc; churn > 256<<20 {
				t.Errorf("open and read allocated %d MiB in all", churn>>20)
			}
			switch {
			case c.openFails && openErr == nil:
				t.Errorf("open succeeded; want an error matching %q", c.msg)
			case openErr != nil && !c.openFails && c.bad == [2]int64{}:
				t.Errorf("open failed: %v", openErr)
			case openErr != nil:
				msg := openErr.Error()
				if !errors.Is(openErr, drivers.ErrCorrupt) && !errors.Is(openErr, drivers.ErrUnsupported) &&
					!strings.Contains(msg, "not a regular file") {
					t.Errorf("open error wraps no sentinel: %v", openErr)
				}
				if strings.Contains(msg, "\n") || (c.msg != "" && !matchAny(msg, c.msg)) {
					t.Errorf("open error %q: want one line matching %q", msg, c.msg)
				}
			}
			for _, e := range append(readErrs, wrong...) {
				t.Error(e)
			}
			if after := driverstest.DirState(t, dir); !maps.Equal(before, after) {
				t.Error("a read-only open changed a file")
			}
			t.Logf("open: %v; live heap %d KiB, allocated %d KiB", openErr, live>>10, (m1.TotalAlloc-m0.TotalAlloc)>>10)
		})
	}
}

func matchAny(s, alts string) bool {
	for _, a := range strings.Split(alts, "|") {
		if strings.Contains(strings.ToLower(s), strings.ToLower(a)) {
			return true
		}
	}
	return false
}

func itoa(v int64) string { return "0x" + strconv.FormatInt(v, 16) }
