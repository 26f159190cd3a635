package qcow2

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"io"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"imgfuse/drivers"
	"imgfuse/drivers/driverstest"
)

// readImageHead returns what a caller of parseHeader passes: the first
// min(2 MiB, size) bytes of the file, and the file size.
func readImageHead(t testing.TB, path string) ([]byte, int64) {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	st, err := f.Stat()
	if err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, min(st.Size(), 2<<20))
	if _, err := io.ReadFull(f, buf); err != nil {
		t.Fatal(err)
	}
	return buf, st.Size()
}

// qemuInfo is the part of `qemu-img info --output=json` the tests compare.
type qemuInfo struct {
	VirtualSize    uint64 `json:"virtual-size"`
	ClusterSize    int64  `json:"cluster-size"`
	BackingFile    string `json:"backing-filename"`
	BackingFormat  string `json:"backing-filename-format"`
	Dirty          bool   `json:"dirty-flag"`
	Encrypted      bool   `json:"encrypted"`
	FormatSpecific struct {
		Data struct {
			Compat          string            `json:"compat"`
			CompressionType string            `json:"compression-type"`
			LazyRefcounts   bool              `json:"lazy-refcounts"`
			RefcountBits    int               `json:"refcount-bits"`
			Corrupt         bool              `json:"corrupt"`
			ExtendedL2      bool              `json:"extended-l2"`
			DataFile        string            `json:"data-file"`
			DataFileRaw     bool              `json:"data-file-raw"`
			Bitmaps         []json.RawMessage `json:"bitmaps"`
		} `json:"data"`
	} `json:"format-specific"`
	Snapshots []qemuSnapshot `json:"snapshots"`
}

type qemuSnapshot struct {
	ID          string `json:"id"`
	Name        string `json:"name"`
	VMStateSize uint64 `json:"vm-state-size"`
	DateSec     uint32 `json:"date-sec"`
	DateNsec    uint32 `json:"date-nsec"`
	VMClockSec  uint64 `json:"vm-clock-sec"`
	VMClockNsec uint64 `json:"vm-clock-nsec"`
	Icount      *int64 `json:"icount"`
}

func qemuImageInfo(t testing.TB, path string) qemuInfo {
	t.Helper()
	var qi qemuInfo
	out := driverstest.Cmd(t, "qemu-img", "info", "-U", "--output=json", path)
	if err := json.Unmarshal(out, &qi); err != nil {
		t.Fatalf("qemu-img info %s: %v\n%s", path, err, out)
	}
	return qi
}

// qemuCreateCases are the `qemu-img create` variants of qcow2.md §3, each
// run in a fresh directory holding a 1 MiB base.qcow2.
var qemuCreateCases = []struct {
	name string
	opts string // -o value; "" for none
	size string
	args []string // extra arguments before the image name
	// post runs after create: qemu-img subcommands, IMG standing for
	// the image.
	post [][]string
}{
	{name: "v2", opts: "compat=0.10"},
	{name: "v3"},
	{name: "v3-hl104"}, // header_length patched to 104 below
	{name: "c512", opts: "cluster_size=512"},
	{name: "c4k", opts: "cluster_size=4k"},
	{name: "c2M", opts: "cluster_size=2M"},
	{name: "refcount1", opts: "refcount_bits=1"},
	{name: "refcount64", opts: "refcount_bits=64"},
	{name: "refcount2", opts: "refcount_bits=2"},
	{name: "refcount8", opts: "refcount_bits=8"},
	{name: "refcount32", opts: "refcount_bits=32"},
	{name: "extl2", opts: "extended_l2=on,cluster_size=16k"},
	{name: "zstd", opts: "compression_type=zstd"},
	{name: "lazy", opts: "lazy_refcounts=on"},
	{name: "prealloc", opts: "preallocation=metadata"},
	{name: "prealloc-falloc", opts: "preallocation=falloc"},
	{name: "extl2-2M-prealloc", opts: "extended_l2=on,cluster_size=2M,preallocation=metadata", size: "5M"},
	{name: "zstd-lazy-c8k", opts: "compression_type=zstd,lazy_refcounts=on,cluster_size=8k"},
	{name: "datafile", opts: "data_file=ext.raw"},
	{name: "datafile-raw", opts: "data_file=ext.raw,data_file_raw=on"},
	{name: "backing", args: []string{"-b", "base.qcow2", "-F", "qcow2"}, size: "2M"},
	{name: "v2-backing", opts: "compat=0.10", args: []string{"-b", "base.qcow2", "-F", "qcow2"}},
	{name: "backing-raw", args: []string{"-b", "base.raw", "-F", "raw"}},
	{name: "big", size: "16T"},
	{name: "big-c512", size: "4G", opts: "cluster_size=512"},
	{name: "bitmap", post: [][]string{{"bitmap", "--add", "IMG", "bm0"}}},
	{name: "snapshots", post: [][]string{{"snapshot", "-c", "one", "IMG"}, {"snapshot", "-c", "two", "IMG"}}},
	{name: "resized", opts: "cluster_size=512", size: "1M", post: [][]string{{"resize", "IMG", "64M"}}},
	{name: "luks", args: []string{"--object", "secret,id=sec0,data=123456"}, opts: "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10"},
	{name: "aes", args: []string{"--object", "secret,id=sec0,data=123456"}, opts: "encrypt.format=aes,encrypt.key-secret=sec0"},
}

// buildQemuImage creates the image of case c in dir and returns its path.
func buildQemuImage(t testing.TB, dir string, i int) string {
	t.Helper()
	c := qemuCreateCases[i]
	driverstest.Cmd(t, "qemu-img", "create", "-q", "-f", "qcow2", filepath.Join(dir, "base.qcow2"), "1M")
	if err := os.WriteFile(filepath.Join(dir, "base.raw"), make([]byte, 4096), 0o644); err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(dir, c.name+".qcow2")
	args := []string{"create", "-q", "-f", "qcow2"}
	args = append(args, c.args...)
	if c.opts != "" {
		args = append(args, "-o", c.opts)
	}
	size := c.size
	if size == "" {
		size = "1M"
	}
	// In dir, so that relative names (data_file=ext.raw) land there.
	qemuImgIn(t, dir, append(args, path, size)...)
	for _, p := range c.post {
		p = append([]string(nil), p...)
		for k := range p {
			if p[k] == "IMG" {
				p[k] = path
			}
		}
		driverstest.Cmd(t, "qemu-img", p...)
	}
	if c.name == "v3-hl104" {
		// QEMU writes 112 but accepts 104 (no compression_type byte):
		// move the extensions down to where a 104-byte header has them.
		buf, _ := readImageHead(t, path)
		c0 := buf[:1<<16]
		copy(c0[104:], c0[112:])
		copy(c0[100:], be32(104))
		patchFile(t, path, 0, c0)
	}
	return path
}

// qemuImgIn runs qemu-img in dir and fails t unless it exits 0.
func qemuImgIn(t testing.TB, dir string, args ...string) {
	t.Helper()
	// LUKS creation times its key derivation and fails now and then on a
	// loaded machine ("Unable to get accurate CPU usage"): try again.
	for try := 1; ; try++ {
		c := exec.Command("qemu-img", args...)
		c.Dir = dir
		out, err := c.CombinedOutput()
		if err == nil {
			return
		}
		if try < 5 && strings.Contains(string(out), "accurate CPU usage") {
			continue
		}
		t.Fatalf("qemu-img %s: %v\n%s", strings.Join(args, " "), err, out)
	}
}

func be32(v uint32) []byte { return binary.BigEndian.AppendUint32(nil, v) }
func be64(v uint64) []byte { return binary.BigEndian.AppendUint64(nil, v) }

func patchFile(t testing.TB, path string, off int64, b []byte) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteAt(b, off); err != nil {
		t.Fatal(err)
	}
}

// TestParseQemuImages parses every qemu-img create variant and compares the
// result with `qemu-img info`, and checks that marshalHeaderCluster
// reproduces QEMU's cluster 0 byte for byte.
func TestParseQemuImages(t *testing.T) {
	driverstest.RequireTools(t, "qemu-img")
	for i, c := range qemuCreateCases {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			path := buildQemuImage(t, t.TempDir(), i)
			buf, size := readImageHead(t, path)
			qi := qemuImageInfo(t, path)
			h, err := parseHeader(buf, size)
			if qi.Encrypted {
				if !errors.Is(err, drivers.ErrUnsupported) || !strings.Contains(err.Error(), "encrypted qcow2 images are not supported") {
					t.Fatalf("encrypted image: err = %v, want ErrUnsupported naming encryption", err)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			d := qi.FormatSpecific.Data
			fi := h.formatInfo()
			got := []any{h.Size, h.clusterSize(), h.BackingFile, h.BackingFormat, fi.Dirty,
				fi.Compat, fi.CompressionType, fi.RefcountBits, fi.LazyRefcounts, fi.Corrupt,
				fi.ExtendedL2, fi.DataFile, fi.DataFileRaw, h.HasBitmaps, int(h.NbSnapshots)}
			want := []any{qi.VirtualSize, qi.ClusterSize, qi.BackingFile, qi.BackingFormat, qi.Dirty,
				d.Compat, d.CompressionType, d.RefcountBits, d.LazyRefcounts, d.Corrupt,
				d.ExtendedL2, d.DataFile, d.DataFileRaw, len(d.Bitmaps) > 0, len(qi.Snapshots)}
			names := []string{"size", "cluster size", "backing file", "backing format", "dirty",
				"compat", "compression type", "refcount bits", "lazy refcounts", "corrupt",
				"extended L2", "data file", "data file raw", "bitmaps", "snapshots"}
			for k := range got {
				if got[k] != want[k] {
					t.Errorf("%s = %v, qemu-img info says %v", names[k], got[k], want[k])
				}
			}
			if h.L1Size == 0 && h.Size != 0 {
				t.Errorf("L1 size 0 for a %d-byte disk", h.Size)
			}

			// QEMU rewrites the whole first cluster on every header
			// update; ours must be the same bytes.
			out, err := marshalHeaderCluster(h)
			if err != nil {
				t.Fatal(err)
			}
			cs := int(h.clusterSize())
			orig := make([]byte, cs)
			copy(orig, buf)
			if !bytes.Equal(out, orig) {
				i := 0
				for i < cs && out[i] == orig[i] {
					i++
				}
				t.Errorf("marshalHeaderCluster differs from QEMU's cluster 0 at byte %d:\nours %x\nqemu %x",
					i, out[i&^15:min(cs, i&^15+32)], orig[i&^15:min(cs, i&^15+32)])
			}
			h2, err := parseHeader(out, int64(len(out)))
			if err != nil {
				t.Fatalf("reparse: %v", err)
			}
			if !reflect.DeepEqual(h, h2) {
				t.Errorf("parse→marshal→parse changed the header:\n%+v\n%+v", h, h2)
			}
		})
	}
}

// baseHeader is a valid v3 header like the one of a fresh 64 MiB image.
func baseHeader() *header {
	return &header{
		Version: 3, ClusterBits: 16, Size: 64 << 20,
		L1Size: 1, L1Offset: 3 << 16,
		ReftableOffset: 1 << 16, ReftableClusters: 1,
		RefcountOrder: 4, HeaderLength: 112,
		FeatureNames: qemuFeatureNames(),
	}
}

// put returns a mutation that writes b at off.
func put(off int, b []byte) func([]byte) { return func(c []byte) { copy(c[off:], b) } }

// appendExt returns a mutation that adds an extension at the start of the
// extension area (header_length 112), moving the others down.
func appendExt(typ uint32, data []byte) func([]byte) {
	return func(c []byte) {
		ext := append(be32(typ), be32(uint32(len(data)))...)
		ext = append(ext, data...)
		for len(ext)%8 != 0 {
			ext = append(ext, 0)
		}
		rest := append([]byte(nil), c[112:len(c)-len(ext)]...)
		copy(c[112:], ext)
		copy(c[112+len(ext):], rest)
	}
}

func featureEntry(typ, bit byte, name string) []byte {
	e := make([]byte, featureEntryLen)
	e[0], e[1] = typ, bit
	copy(e[2:], name)
	return e
}

func TestParseHeaderErrors(t *testing.T) {
	h := baseHeader()
	h.BackingFile, h.BackingFormat = "base.qcow2", "qcow2"
	base, err := marshalHeaderCluster(h)
	if err != nil {
		t.Fatal(err)
	}
	backingOff := int(binary.BigEndian.Uint64(base[8:]))
	extBitmapsOK := append(append(be32(1), be32(0)...), append(be64(100), be64(4<<16)...)...)

	tests := []struct {
		name   string
		mut    func([]byte)
		len    int   // truncate the file to this many bytes when > 0
		want   error // nil: accepted
		substr string
	}{
		{name: "valid", want: nil},
		{name: "truncated 50", len: 50, want: drivers.ErrCorrupt, substr: "too short"},
		{name: "truncated v3 90", len: 90, want: drivers.ErrCorrupt, substr: "too short"},
		{name: "truncated inside header_length", mut: put(100, be32(4096)), len: 1000, want: drivers.ErrCorrupt, substr: "past the end"},
		{name: "bad magic", mut: put(0, []byte("QFI\x00")), want: drivers.ErrCorrupt, substr: "magic"},
		{name: "version 1", mut: put(4, be32(1)), want: drivers.ErrUnsupported, substr: "version 1"},
		{name: "version 4", mut: put(4, be32(4)), want: drivers.ErrUnsupported, substr: "version 4"},
		{name: "cluster_bits 8", mut: put(20, be32(8)), want: drivers.ErrCorrupt, substr: "cluster_bits 8"},
		{name: "cluster_bits 22", mut: put(20, be32(22)), want: drivers.ErrUnsupported, substr: "2^22"},
		{name: "cluster_bits 63", mut: put(20, be32(63)), want: drivers.ErrCorrupt, substr: "cluster_bits 63"},
		{name: "cluster_bits 2^32-1", mut: put(20, be32(math.MaxUint32)), want: drivers.ErrCorrupt},
		{name: "header_length 100", mut: put(100, be32(100)), want: drivers.ErrCorrupt, substr: "header_length"},
		{name: "header_length 108", mut: put(100, be32(108)), want: drivers.ErrCorrupt, substr: "multiple of 8"},
		{name: "header_length over cluster", mut: put(100, be32(1<<16+8)), want: drivers.ErrCorrupt, substr: "exceeds the cluster"},
		{name: "header_length 104", mut: func(c []byte) {
			// Move the extensions down by 8 bytes as a 104-byte header
			// would have them, and fix the backing offset.
			copy(c[104:], c[112:])
			copy(c[100:], be32(104))
			copy(c[8:], be64(uint64(backingOff-8)))
		}, want: nil},
		{name: "unknown incompatible bit 20", mut: put(72, be64(1<<20)), want: drivers.ErrUnsupported, substr: "bit 20"},
		{name: "unknown incompatible bits 20 and 63", mut: put(72, be64(1<<20|1<<63)), want: drivers.ErrUnsupported, substr: "bit 63"},
		{name: "named incompatible bit", mut: func(c []byte) {
			appendExt(extFeatureTable, featureEntry(0, 20, "frobnicated clusters"))(c)
			copy(c[8:], be64(uint64(backingOff+56)))
			copy(c[72:], be64(1<<20))
		}, want: drivers.ErrUnsupported, substr: "frobnicated clusters"},
		{name: "unknown incompatible bit with broken extensions", mut: func(c []byte) {
			copy(c[72:], be64(1<<20))
			copy(c[116:], be32(math.MaxUint32)) // the feature table's length
		}, want: drivers.ErrUnsupported, substr: "bit 20"},
		{name: "unknown compatible and autoclear bits", mut: func(c []byte) {
			copy(c[80:], be64(1<<40))
			copy(c[88:], be64(1<<40))
		}, want: nil},
		{name: "dirty and corrupt accepted", mut: put(72, be64(incompatDirty|incompatCorrupt)), want: nil},
		{name: "AES encryption", mut: put(32, be32(1)), want: drivers.ErrUnsupported, substr: "AES-encrypted qcow2 images are not supported"},
		{name: "unknown encryption", mut: put(32, be32(3)), want: drivers.ErrUnsupported, substr: "encrypted qcow2 images are not supported (crypt_method 3)"},
		{name: "LUKS encryption", mut: func(c []byte) {
			copy(c[32:], be32(2))
			appendExt(extCrypto, append(be64(1<<16), be64(4096)...))(c)
			copy(c[8:], be64(uint64(backingOff+24)))
		}, want: drivers.ErrUnsupported, substr: "LUKS-encrypted qcow2 images are not supported"},
		{name: "crypto extension without LUKS", mut: func(c []byte) {
			appendExt(extCrypto, append(be64(1<<16), be64(4096)...))(c)
			copy(c[8:], be64(uint64(backingOff+24)))
		}, want: drivers.ErrCorrupt, substr: "crypto"},
		{name: "crypto extension of 8 bytes", mut: func(c []byte) {
			copy(c[32:], be32(2))
			appendExt(extCrypto, be64(1<<16))(c)
			copy(c[8:], be64(uint64(backingOff+16)))
		}, want: drivers.ErrCorrupt, substr: "crypto"},
		{name: "extension overrunning the cluster", mut: put(116, be32(1<<20)), want: drivers.ErrCorrupt, substr: "runs past"},
		{name: "extension overrunning the backing name", mut: put(116, be32(uint32(backingOff))), want: drivers.ErrCorrupt, substr: "runs past"},
		{name: "extension header crossing the bound", mut: put(8, be64(116)), want: drivers.ErrCorrupt, substr: "crosses"},
		{name: "duplicate backing format", mut: func(c []byte) {
			appendExt(extBackingFmt, []byte("raw"))(c)
			copy(c[8:], be64(uint64(backingOff+16)))
		}, want: drivers.ErrCorrupt, substr: "duplicate"},
		{name: "backing format of 16 bytes", mut: func(c []byte) {
			copy(c[116:], be32(16))
		}, want: drivers.ErrCorrupt, substr: "backing format"},
		{name: "bitmaps extension of 16 bytes", mut: func(c []byte) {
			copy(c[88:], be64(autoclearBitmaps))
			appendExt(extBitmaps, extBitmapsOK[:16])(c)
			copy(c[8:], be64(uint64(backingOff+24)))
		}, want: drivers.ErrCorrupt, substr: "bitmaps"},
		{name: "bitmaps extension with 0 bitmaps", mut: func(c []byte) {
			copy(c[88:], be64(autoclearBitmaps))
			appendExt(extBitmaps, append(be32(0), extBitmapsOK[4:]...))(c)
			copy(c[8:], be64(uint64(backingOff+32)))
		}, want: drivers.ErrCorrupt, substr: "bitmaps"},
		{name: "bitmaps extension valid", mut: func(c []byte) {
			copy(c[88:], be64(autoclearBitmaps))
			appendExt(extBitmaps, extBitmapsOK)(c)
			copy(c[8:], be64(uint64(backingOff+32)))
		}, want: nil},
		{name: "data-file-raw without data file", mut: put(88, be64(autoclearDataFileRaw)), want: drivers.ErrCorrupt, substr: "data-file-raw"},
		{name: "backing offset past cluster 0", mut: put(8, be64(1<<16+8)), want: drivers.ErrCorrupt, substr: "backing file offset"},
		{name: "backing name out of cluster 0", mut: func(c []byte) {
			copy(c[8:], be64(1<<16-4))
			copy(c[16:], be32(10))
		}, want: drivers.ErrCorrupt, substr: "backing file name"},
		{name: "backing name of 1024 bytes", mut: put(16, be32(1024)), want: drivers.ErrCorrupt, substr: "backing file name"},
		{name: "L1 too small for size", mut: put(24, be64(1<<40)), want: drivers.ErrCorrupt, substr: "too small"},
		{name: "L1 too small by one", mut: put(24, be64(512<<20+1)), want: drivers.ErrCorrupt, substr: "too small"},
		{name: "L1 exactly enough", mut: put(24, be64(512<<20)), want: nil},
		{name: "huge l1_size", mut: put(36, be32(math.MaxUint32)), want: drivers.ErrCorrupt, substr: "L1 table too large"},
		{name: "L1 offset unaligned", mut: put(40, be64(3<<16+512)), want: drivers.ErrCorrupt, substr: "L1"},
		{name: "L1 offset overflows", mut: func(c []byte) {
			copy(c[36:], be32(10000))
			copy(c[40:], be64(math.MaxInt64&^0xffff))
		}, want: drivers.ErrCorrupt, substr: "overflow"},
		{name: "no refcount table", mut: put(56, be32(0)), want: drivers.ErrCorrupt, substr: "refcount"},
		{name: "refcount table too large", mut: put(56, be32(129)), want: drivers.ErrCorrupt, substr: "refcount table too large"},
		{name: "refcount table unaligned", mut: put(48, be64(1<<16+8)), want: drivers.ErrCorrupt, substr: "refcount table"},
		{name: "refcount_order 7", mut: put(96, be32(7)), want: drivers.ErrCorrupt, substr: "refcount_order"},
		{name: "65537 snapshots", mut: put(60, be32(65537)), want: drivers.ErrCorrupt, substr: "snapshots"},
		{name: "snapshot table unaligned", mut: put(64, be64(100)), want: drivers.ErrCorrupt, substr: "snapshot table"},
		{name: "zstd without bit", mut: put(104, []byte{1}), want: drivers.ErrCorrupt, substr: "compression"},
		{name: "compression bit with zlib", mut: put(72, be64(incompatCompression)), want: drivers.ErrCorrupt, substr: "compression"},
		{name: "compression type 2", mut: func(c []byte) {
			c[104] = 2
			copy(c[72:], be64(incompatCompression))
		}, want: drivers.ErrUnsupported, substr: "compression type 2"},
		{name: "zstd with bit", mut: func(c []byte) {
			c[104] = 1
			copy(c[72:], be64(incompatCompression))
		}, want: nil},
		{name: "extended L2 with 8k clusters", mut: func(c []byte) {
			copy(c[20:], be32(13))
			copy(c[72:], be64(incompatExtendedL2))
			copy(c[8:], be64(0)) // the old backing offset is past 8k
		}, want: drivers.ErrCorrupt, substr: "extended L2"},
		{name: "nonzero padding preserved", mut: put(105, []byte{1, 2, 3}), want: nil},
		{name: "short file, zero-padded cluster 0", len: backingOff + len("base.qcow2"), want: nil},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			c := bytes.Clone(base)
			if tc.mut != nil {
				tc.mut(c)
			}
			if tc.len > 0 {
				c = c[:tc.len]
			}
			h, err := parseHeader(c, int64(len(c)))
			if tc.want == nil {
				if err != nil {
					t.Fatalf("rejected a valid header: %v", err)
				}
				checkRoundTrip(t, h)
				return
			}
			if !errors.Is(err, tc.want) {
				t.Fatalf("err = %v, want one wrapping %v", err, tc.want)
			}
			if !strings.Contains(err.Error(), tc.substr) {
				t.Errorf("err = %q, want it to mention %q", err, tc.substr)
			}
		})
	}
}

// checkRoundTrip asserts that marshal→parse gives h back (layout fields
// aside) and that a second marshal gives the same bytes.
func checkRoundTrip(t testing.TB, h *header) {
	t.Helper()
	b1, err := marshalHeaderCluster(h)
	if err != nil {
		if strings.Contains(err.Error(), "fit") {
			return // a bound-hugging original can need the end marker's 8 bytes more
		}
		t.Fatalf("marshal of a parsed header: %v", err)
	}
	h2, err := parseHeader(b1, int64(len(b1)))
	if err != nil {
		t.Fatalf("parse of a marshalled header: %v\n%+v", err, h)
	}
	want := *h
	want.BackingOffset, want.BackingSize = h2.BackingOffset, h2.BackingSize
	if !reflect.DeepEqual(&want, h2) {
		t.Fatalf("round trip changed the header:\n%+v\n%+v", &want, h2)
	}
	b2, err := marshalHeaderCluster(h2)
	if err != nil || !bytes.Equal(b1, b2) {
		t.Fatalf("second marshal differs (err %v)", err)
	}
}

func TestParseHeaderPreserves(t *testing.T) {
	h := baseHeader()
	h.BackingFile = "dir/base image.qcow2"
	h.BackingFormat = "qcow2"
	h.Incompatible = incompatDataFile | incompatCompression | incompatExtendedL2
	h.CompressionType = compressionZstd
	h.DataFile = "data.raw"
	h.Autoclear = autoclearDataFileRaw | autoclearBitmaps
	h.HasBitmaps, h.NbBitmaps, h.BitmapDirSize, h.BitmapDirOffset = true, 2, 200, 5<<16
	h.UnknownExts = []extension{{Type: 0x12345678, Data: []byte("abc")}, {Type: 0x9, Data: []byte{}}, {Type: 0x12345678, Data: []byte("second")}}
	h.HeaderLength = 120
	h.ExtraHeader = []byte{0, 0, 0, 0, 0, 0, 0, 0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0xff, 0x11, 0x22}
	c, err := marshalHeaderCluster(h)
	if err != nil {
		t.Fatal(err)
	}
	got, err := parseHeader(c, int64(len(c)))
	if err != nil {
		t.Fatal(err)
	}
	h.BackingOffset, h.BackingSize = got.BackingOffset, got.BackingSize
	if !reflect.DeepEqual(h, got) {
		t.Fatalf("round trip:\nwant %+v\ngot  %+v", h, got)
	}
	// QEMU's order: backing format, data file, feature table, bitmaps,
	// unknown extensions, end, backing name.
	var order []uint32
	for off := 120; ; {
		typ := binary.BigEndian.Uint32(c[off:])
		n := int(binary.BigEndian.Uint32(c[off+4:]))
		order = append(order, typ)
		if typ == extEnd {
			if off+8 != int(got.BackingOffset) {
				t.Errorf("backing name at %d, want right after the end marker at %d", got.BackingOffset, off+8)
			}
			break
		}
		off += 8 + (n+7)&^7
	}
	want := []uint32{extBackingFmt, extDataFile, extFeatureTable, extBitmaps, 0x12345678, 0x9, 0x12345678, extEnd}
	if !reflect.DeepEqual(order, want) {
		t.Errorf("extension order %x, want %x", order, want)
	}

	// A bitmaps extension without the autoclear bit is stale: ignored,
	// and dropped by the next rewrite, as QEMU does.
	h.Autoclear &^= autoclearBitmaps
	c2 := bytes.Clone(c)
	copy(c2[88:], be64(h.Autoclear))
	got, err = parseHeader(c2, int64(len(c2)))
	if err != nil {
		t.Fatal(err)
	}
	if got.HasBitmaps {
		t.Error("stale bitmaps extension reported as present")
	}
}

func TestMarshalHeaderErrors(t *testing.T) {
	tests := []struct {
		name string
		mut  func(h *header)
	}{
		{"cluster bits", func(h *header) { h.ClusterBits = 8 }},
		{"version", func(h *header) { h.Version = 4 }},
		{"v2 with features", func(h *header) { h.Version = 2; h.FeatureNames = nil }},
		{"long backing name", func(h *header) { h.BackingFile = strings.Repeat("x", 1024) }},
		{"long backing format", func(h *header) { h.BackingFormat = strings.Repeat("x", 16) }},
		{"known type as unknown", func(h *header) { h.UnknownExts = []extension{{Type: extBackingFmt}} }},
		{"does not fit", func(h *header) {
			h.ClusterBits = 9
			h.UnknownExts = []extension{{Type: 7, Data: make([]byte, 400)}}
		}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			h := baseHeader()
			h.Incompatible = incompatDirty
			tc.mut(h)
			if _, err := marshalHeaderCluster(h); err == nil {
				t.Fatal("marshal succeeded")
			}
		})
	}
}

func TestFormatInfo(t *testing.T) {
	h := baseHeader()
	h.Incompatible = incompatDirty | incompatCompression
	h.CompressionType = compressionZstd
	h.Compatible = compatLazyRefcounts | 1<<5
	h.FeatureNames[featCompat<<8|5] = "shiny"
	h.Autoclear = 1 << 7
	fi := h.formatInfo()
	b, err := json.Marshal(fi)
	if err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{`"compat":"1.1"`, `"compression-type":"zstd"`, `"dirty":true`, `"lazy-refcounts":true`,
		`"refcount-bits":16`, `"cluster-size":65536`, `"names":["dirty bit","compression type"]`,
		`"names":["lazy refcounts","shiny"]`, `"autoclear-features":{"bits":128,"names":["bit 7"]}`} {
		if !bytes.Contains(b, []byte(want)) {
			t.Errorf("formatInfo JSON %s lacks %s", b, want)
		}
	}
	h.Version = 2
	if got := h.formatInfo().Compat; got != "0.10" {
		t.Errorf("v2 compat %q", got)
	}
}
