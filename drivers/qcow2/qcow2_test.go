package qcow2

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"imgfuse/coroutine"
	"imgfuse/drivers"
	"imgfuse/drivers/driverstest"
	"imgfuse/drivers/raw"
)

// testFormats is what the tests hand to Open for backing files.
var testFormats = []drivers.Format{Format{}, raw.Format{}}

func requireQemu(t testing.TB) {
	t.Helper()
	driverstest.RequireTools(t, "qemu-img", "qemu-io")
}

func qemuImg(t testing.TB, args ...string) []byte {
	t.Helper()
	return driverstest.Cmd(t, "qemu-img", args...)
}

// openTest opens path as qcow2 and closes it at the end of the test.
// openTest opens path read-only: the read tests must not change their
// images (the write tests open their own).
func openTest(t testing.TB, path string, opts drivers.OpenOptions) *image {
	t.Helper()
	opts.ReadOnly = true
	if opts.Formats == nil {
		opts.Formats = testFormats
	}
	d, err := Format{}.Open(path, opts)
	if err != nil {
		t.Fatalf("open %s: %v", path, err)
	}
	t.Cleanup(func() {
		if err := d.Close(); err != nil {
			t.Errorf("close: %v", err)
		}
	})
	return d.(*image)
}

// reference returns `qemu-img convert -O raw` of path; extra selects a
// snapshot (e.g. "snapshot.id=1").
func reference(t testing.TB, path, extra string) []byte {
	t.Helper()
	out := filepath.Join(t.TempDir(), "ref.raw")
	args := []string{"convert", "-U", "-f", "qcow2"}
	if extra != "" {
		args = append(args, "-l", extra)
	}
	// qemu 7.2 resolves a relative data file name from its working
	// directory (we resolve it from the image's, like backing files).
	cmdIn(t, filepath.Dir(path), "qemu-img", append(args, "-O", "raw", path, out)...)
	b, err := os.ReadFile(out)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func readAt(d drivers.Driver, p []byte, off int64) (n int, err error) {
	coroutine.Run(func(co *coroutine.Co) { n, err = d.ReadAt(co, p, off) })
	return n, err
}

func blockStatus(d drivers.Driver, off int64) (e drivers.Extent, err error) {
	coroutine.Run(func(co *coroutine.Co) { e, err = d.BlockStatus(co, off) })
	return e, err
}

// checkRange reads [off, off+n) and compares it with ref.
func checkRange(t testing.TB, d drivers.Driver, ref []byte, off, n int64) {
	t.Helper()
	buf := make([]byte, n)
	got, err := readAt(d, buf, off)
	if err != nil || got != int(n) {
		t.Fatalf("ReadAt(%d, %d) = %d, %v", off, n, got, err)
	}
	if !bytes.Equal(buf, ref[off:off+n]) {
		i := 0
		for buf[i] == ref[off+int64(i)] {
			i++
		}
		t.Fatalf("ReadAt(%d, %d): byte at %d is %#x, want %#x", off, n, off+int64(i), buf[i], ref[off+int64(i)])
	}
}

// cmdIn runs a command in dir (so that relative names it stores resolve
// there) and fails t unless it succeeds.
func cmdIn(t testing.TB, dir, name string, args ...string) {
	t.Helper()
	c := exec.Command(name, args...)
	c.Dir = dir
	out, err := c.CombinedOutput()
	// qemu-io reports some failed commands with exit status 0.
	if err != nil || name == "qemu-io" && bytes.Contains(out, []byte("failed")) {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
}

// fileBE64 reads and writes big-endian fields of an image file, for crafting
// corrupt images.
func fileBE64(t testing.TB, path string, off int64) uint64 {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var b [8]byte
	if _, err := f.ReadAt(b[:], off); err != nil {
		t.Fatal(err)
	}
	return binary.BigEndian.Uint64(b[:])
}

func putFileBE64(t testing.TB, path string, off int64, v uint64) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var b [8]byte
	binary.BigEndian.PutUint64(b[:], v)
	if _, err := f.WriteAt(b[:], off); err != nil {
		t.Fatal(err)
	}
}

// firstL2 returns the offset of the L2 table of L1 entry 0 and the L1
// table offset, read straight from the file.
func firstL2(t testing.TB, path string) (l2, l1 int64) {
	t.Helper()
	l1 = int64(fileBE64(t, path, 40))
	l2 = int64(fileBE64(t, path, l1) & l1eOffsetMask)
	if l2 == 0 {
		t.Fatalf("%s: L1 entry 0 is unallocated", path)
	}
	return l2, l1
}

func TestSnapshots(t *testing.T) {
	requireQemu(t)
	dir := t.TempDir()
	img := filepath.Join(dir, "img.qcow2")
	qemuImg(t, "create", "-q", "-f", "qcow2", img, "4M")
	driverstest.QemuIO(t, img, "write -P 0x11 0 1M", "write -P 0x12 3000000 70000")
	qemuImg(t, "snapshot", "-c", "first", img)
	driverstest.QemuIO(t, img, "write -P 0x21 512 1M", "write -z 3M 64k")
	qemuImg(t, "snapshot", "-c", "second", img)
	driverstest.QemuIO(t, img, "write -P 0x31 100000 2M")
	// Grow the active disk: a snapshot keeps its own, smaller size.
	qemuImg(t, "resize", "-q", img, "6M")

	tests := []struct{ name, sel, ref string }{
		{"active", "", ""},
		{"first by name", "first", "snapshot.name=first"},
		{"first by id", "1", "snapshot.id=1"},
		{"second by name", "second", "snapshot.name=second"},
		{"second by id", "2", "snapshot.id=2"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			ref := reference(t, img, tc.ref)
			if tc.sel != "" {
				// qemu-img reads a snapshot at the active disk's
				// size; we expose the snapshot's own size (4M), and
				// the rest must be zeros in qemu's reading.
				if i := bytes.IndexFunc(ref[4<<20:], func(r rune) bool { return r != 0 }); i >= 0 {
					t.Fatalf("qemu-img reads non-zero data past the snapshot's size at %d", 4<<20+i)
				}
				ref = ref[:4<<20]
			}
			d := openTest(t, img, drivers.OpenOptions{Snapshot: tc.sel})
			if d.Size() != int64(len(ref)) {
				t.Fatalf("Size = %d, want %d", d.Size(), len(ref))
			}
			checkRange(t, d, ref, 0, int64(len(ref)))
			snaps := d.Snapshots()
			if len(snaps) != 2 || snaps[0].Name != "first" || snaps[1].Name != "second" {
				t.Fatalf("Snapshots = %+v", snaps)
			}
			if snaps[0].DiskSize != 4<<20 {
				t.Errorf("snapshot disk size %d, want %d", snaps[0].DiskSize, 4<<20)
			}
		})
	}
	if _, err := (Format{}).Open(img, drivers.OpenOptions{Snapshot: "third"}); err == nil {
		t.Fatal("opening a missing snapshot succeeded")
	}
}

func TestInfo(t *testing.T) {
	requireQemu(t)
	dir := t.TempDir()
	base := filepath.Join(dir, "base.raw")
	if err := os.WriteFile(base, bytes.Repeat([]byte{7}, 1<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	img := filepath.Join(dir, "img.qcow2")
	qemuImg(t, "create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", img, "2M")
	qemuImg(t, "snapshot", "-c", "s", img)
	d := openTest(t, img, drivers.OpenOptions{})
	info := d.Info()
	st, err := os.Stat(img)
	if err != nil {
		t.Fatal(err)
	}
	if info.Filename != img || info.Format != "qcow2" || info.VirtualSize != 2<<20 || info.FileSize != st.Size() {
		t.Errorf("Info = %+v", info)
	}
	if len(info.Snapshots) != 1 || info.Snapshots[0].Name != "s" {
		t.Errorf("Info snapshots = %+v", info.Snapshots)
	}
	if info.Backing == nil || info.Backing.Format != "raw" || info.Backing.VirtualSize != 1<<20 {
		t.Errorf("Info backing = %+v", info.Backing)
	}
	js, err := json.Marshal(info)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Contains(js, []byte(`"format-specific":{`)) {
		t.Errorf("format-specific is not a JSON object: %s", js)
	}
}

func TestReadOnly(t *testing.T) {
	requireQemu(t)
	img := filepath.Join(t.TempDir(), "img.qcow2")
	qemuImg(t, "create", "-q", "-f", "qcow2", img, "1M")
	d := openTest(t, img, drivers.OpenOptions{})
	coroutine.Run(func(co *coroutine.Co) {
		if _, err := d.WriteAt(co, make([]byte, 512), 0); !errors.Is(err, drivers.ErrReadOnly) {
			t.Errorf("WriteAt: %v", err)
		}
		if err := d.Discard(co, 0, 512); !errors.Is(err, drivers.ErrReadOnly) {
			t.Errorf("Discard: %v", err)
		}
		if err := d.WriteZeroes(co, 0, 512, true); !errors.Is(err, drivers.ErrReadOnly) {
			t.Errorf("WriteZeroes: %v", err)
		}
		if err := d.Truncate(co, 2<<20); !errors.Is(err, drivers.ErrReadOnly) {
			t.Errorf("Truncate: %v", err)
		}
		if err := d.Flush(co); err != nil {
			t.Errorf("Flush: %v", err)
		}
		if _, err := d.ReadAt(co, make([]byte, 2), 1<<20-1); err == nil {
			t.Errorf("ReadAt past the end succeeded")
		}
	})
}

// patchBackingName overwrites the backing file name stored in img's header
// with name, which must have the same length.
func patchBackingName(t testing.TB, img, name string) {
	t.Helper()
	b, err := os.ReadFile(img)
	if err != nil {
		t.Fatal(err)
	}
	off := binary.BigEndian.Uint64(b[8:])
	n := binary.BigEndian.Uint32(b[16:])
	if int(n) != len(name) {
		t.Fatalf("backing name is %d bytes, not %d", n, len(name))
	}
	copy(b[off:], name)
	if err := os.WriteFile(img, b, 0o644); err != nil {
		t.Fatal(err)
	}
}

func TestBackingLoop(t *testing.T) {
	requireQemu(t)
	dir := t.TempDir()
	a := filepath.Join(dir, "a.qcow2")
	b := filepath.Join(dir, "b.qcow2")
	c := filepath.Join(dir, "c.qcow2")
	qemuImg(t, "create", "-q", "-f", "qcow2", a, "1M")
	qemuImg(t, "create", "-q", "-f", "qcow2", "-b", "a.qcow2", "-F", "qcow2", b, "1M")
	qemuImg(t, "create", "-q", "-f", "qcow2", "-b", "b.qcow2", "-F", "qcow2", c, "1M")
	// c → b → c, and (through a symlink, so the names differ) b → b.
	patchBackingName(t, b, "c.qcow2")
	for _, img := range []string{c, b} {
		_, err := Format{}.Open(img, drivers.OpenOptions{Formats: testFormats})
		if !errors.Is(err, drivers.ErrCorrupt) || !strings.Contains(err.Error(), "loop") {
			t.Errorf("open %s: %v, want a backing loop error", filepath.Base(img), err)
		}
	}
	if err := os.Symlink("b.qcow2", filepath.Join(dir, "l.qcow2")); err != nil {
		t.Fatal(err)
	}
	patchBackingName(t, b, "l.qcow2")
	if _, err := (Format{}).Open(b, drivers.OpenOptions{Formats: testFormats}); !errors.Is(err, drivers.ErrCorrupt) {
		t.Errorf("open a self loop through a symlink: %v", err)
	}
}

func TestBackingChainDepth(t *testing.T) {
	requireQemu(t)
	dir := t.TempDir()
	name := func(i int) string { return fmt.Sprintf("l%03d.qcow2", i) }
	qemuImg(t, "create", "-q", "-f", "qcow2", filepath.Join(dir, name(0)), "1M")
	driverstest.QemuIO(t, filepath.Join(dir, name(0)), "write -P 0x42 0 4096")
	// Build one overlay with qemu-img, then clone it with a patched
	// backing name: 66 qemu-img runs would be slow.
	proto := filepath.Join(dir, "proto.qcow2")
	qemuImg(t, "create", "-q", "-f", "qcow2", "-u", "-b", name(0), "-F", "qcow2", proto, "1M")
	tmpl, err := os.ReadFile(proto)
	if err != nil {
		t.Fatal(err)
	}
	for i := 1; i <= maxChainDepth; i++ {
		p := filepath.Join(dir, name(i))
		if err := os.WriteFile(p, tmpl, 0o644); err != nil {
			t.Fatal(err)
		}
		patchBackingName(t, p, name(i-1))
	}
	// maxChainDepth images in all: fine, and the bottom's data shows.
	d := openTest(t, filepath.Join(dir, name(maxChainDepth-1)), drivers.OpenOptions{})
	buf := make([]byte, 4097)
	if _, err := readAt(d, buf, 0); err != nil || buf[0] != 0x42 || buf[4095] != 0x42 || buf[4096] != 0 {
		t.Fatalf("read through %d layers: %v %x", maxChainDepth, err, buf[4094:])
	}
	// One more is refused.
	if _, err := (Format{}).Open(filepath.Join(dir, name(maxChainDepth)), drivers.OpenOptions{ReadOnly: true, Formats: testFormats}); !errors.Is(err, drivers.ErrCorrupt) {
		t.Fatalf("open a chain of %d: %v", maxChainDepth+1, err)
	}
}

func TestDataFileMissing(t *testing.T) {
	requireQemu(t)
	dir := t.TempDir()
	img := filepath.Join(dir, "img.qcow2")
	cmdIn(t, dir, "qemu-img", "create", "-q", "-f", "qcow2", "-o", "data_file=img.data", "img.qcow2", "1M")
	if err := os.Remove(filepath.Join(dir, "img.data")); err != nil {
		t.Fatal(err)
	}
	if _, err := (Format{}).Open(img, drivers.OpenOptions{Formats: testFormats}); err == nil || !strings.Contains(err.Error(), "data file") {
		t.Fatalf("open without its data file: %v", err)
	}
}

// TestCorruptL2 crafts damaged L1 and L2 entries: each read that needs the
// damaged entry fails with ErrCorrupt (EIO at the mount), and reads
// elsewhere go on working.
func TestCorruptL2(t *testing.T) {
	requireQemu(t)
	type patch struct {
		// at is "l1" (L1 entry 0), "l2" (L2 entry 0) or "bitmap"
		// (extended L2 entry 0's bitmap).
		at  string
		fix func(old uint64, fileSize int64) uint64
	}
	tests := []struct {
		name  string
		opts  string
		patch patch
	}{
		{"L2 table past EOF", "", patch{"l1", func(old uint64, fs int64) uint64 { return uint64(fs+1<<20)&^0xffff | oflagCopied }}},
		{"L2 table unaligned", "", patch{"l1", func(old uint64, fs int64) uint64 { return old + 512 }}},
		{"L1 reserved bits", "", patch{"l1", func(old uint64, fs int64) uint64 { return old | 1<<60 }}},
		{"data past EOF", "", patch{"l2", func(old uint64, fs int64) uint64 { return uint64(fs+1<<20)&^0xffff | oflagCopied }}},
		{"data unaligned", "", patch{"l2", func(old uint64, fs int64) uint64 { return old + 512 }}},
		{"L2 reserved bits", "", patch{"l2", func(old uint64, fs int64) uint64 { return old | 1<<57 }}},
		{"zero flag in v2", "compat=0.10", patch{"l2", func(old uint64, fs int64) uint64 { return old | oflagZero }}},
		{"compressed past EOF", "", patch{"l2", func(old uint64, fs int64) uint64 { return oflagCompressed | uint64(fs+4096) }}},
		{"alloc and zero", "extended_l2=on", patch{"bitmap", func(old uint64, fs int64) uint64 { return old | old<<32 }}},
		{"alloc on unallocated", "extended_l2=on", patch{"l2", func(old uint64, fs int64) uint64 { return 0 }}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			img := filepath.Join(t.TempDir(), "img.qcow2")
			args := []string{"create", "-q", "-f", "qcow2"}
			if tc.opts != "" {
				args = append(args, "-o", tc.opts)
			}
			qemuImg(t, append(args, img, "4M")...)
			// Cluster 0 is damaged; cluster 1 lives in the same L2
			// table; 3M lives in it too but is never allocated.
			driverstest.QemuIO(t, img, "write -P 0x11 0 64k", "write -P 0x22 64k 64k")
			l2, l1 := firstL2(t, img)
			st, err := os.Stat(img)
			if err != nil {
				t.Fatal(err)
			}
			switch tc.patch.at {
			case "l1":
				putFileBE64(t, img, l1, tc.patch.fix(fileBE64(t, img, l1), st.Size()))
			case "l2":
				putFileBE64(t, img, l2, tc.patch.fix(fileBE64(t, img, l2), st.Size()))
			case "bitmap":
				putFileBE64(t, img, l2+8, tc.patch.fix(fileBE64(t, img, l2+8), st.Size()))
			}
			d := openTest(t, img, drivers.OpenOptions{})
			buf := make([]byte, 4096)
			if _, err := readAt(d, buf, 100); !errors.Is(err, drivers.ErrCorrupt) {
				t.Fatalf("read of the damaged cluster: %v, want ErrCorrupt", err)
			}
			if _, err := blockStatus(d, 0); !errors.Is(err, drivers.ErrCorrupt) {
				t.Errorf("BlockStatus of the damaged cluster: %v, want ErrCorrupt", err)
			}
			// A read that starts in a good cluster and runs into the
			// damaged one returns the good part's length with the error.
			if tc.patch.at != "l1" {
				big := make([]byte, 2<<20)
				if n, err := readAt(d, big, 64<<10); err != nil || big[0] != 0x22 || big[1<<20] != 0 {
					t.Errorf("read of the next clusters: n=%d err=%v", n, err)
				}
			} else {
				if _, err := readAt(d, buf, 3<<20); !errors.Is(err, drivers.ErrCorrupt) {
					t.Errorf("read under a damaged L1 entry: %v", err)
				}
			}
		})
	}
}

// qemuMapEntry is one element of `qemu-img map --output=json`.
type qemuMapEntry struct {
	Start, Length int64
	Data, Zero    bool
}

// TestBlockStatusMatchesQemuMap compares, byte range by byte range, the
// data flag of BlockStatus with `qemu-img map --output=json` on sparse
// images mixing data, zero clusters, compressed clusters and a backing file.
func TestBlockStatusMatchesQemuMap(t *testing.T) {
	requireQemu(t)
	tests := []struct {
		name, opts string
		backing    bool
	}{
		{"plain", "", false},
		{"overlay", "", true},
		{"extended-l2-overlay", "extended_l2=on", true},
		{"cluster4k", "cluster_size=4096", false},
	}
	const size = 8 << 20
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			img := filepath.Join(dir, "img.qcow2")
			args := []string{"create", "-q", "-f", "qcow2"}
			if tc.opts != "" {
				args = append(args, "-o", tc.opts)
			}
			if tc.backing {
				b := filepath.Join(dir, "base.qcow2")
				// The backing file is shorter than the overlay.
				qemuImg(t, "create", "-q", "-f", "qcow2", b, "6M")
				driverstest.QemuIO(t, b, "write -P 0x11 1M 1M", "write -P 0x12 5M 1M", "write -z 4M 64k")
				args = append(args, "-b", b, "-F", "qcow2")
			}
			qemuImg(t, append(args, img, fmt.Sprint(size))...)
			driverstest.QemuIO(t, img,
				"write -P 0x21 0 100k",
				"write -c -P 0x22 2M 64k",
				"write -z 1536k 128k",
				"write -z -u 5M 128k",
				"discard 5248k 64k",
				"write -P 0x23 7M 4k",
				"write -P 0x24 8000k 192k",
			)
			d := openTest(t, img, drivers.OpenOptions{})
			out := qemuImg(t, "map", "--output=json", "-U", "-f", "qcow2", img)
			var qm []qemuMapEntry
			if err := json.Unmarshal(out, &qm); err != nil {
				t.Fatalf("qemu-img map: %v\n%s", err, out)
			}
			exts := driverstest.Extents(t, d)
			// Walk both lists in 512-byte steps.
			at := func(off int64, find func(int) (int64, int64), n int) int {
				lo, hi := 0, n
				for lo < hi {
					m := (lo + hi) / 2
					s, l := find(m)
					switch {
					case off < s:
						hi = m
					case off >= s+l:
						lo = m + 1
					default:
						return m
					}
				}
				return -1
			}
			for off := int64(0); off < size; off += 512 {
				qi := at(off, func(i int) (int64, int64) { return qm[i].Start, qm[i].Length }, len(qm))
				ei := at(off, func(i int) (int64, int64) { return exts[i].Off, exts[i].Len }, len(exts))
				if qi < 0 || ei < 0 {
					t.Fatalf("offset %d not covered: qemu %d, ours %d", off, qi, ei)
				}
				q, e := qm[qi], exts[ei]
				if q.Data != (e.Flags&drivers.ExtentData != 0) {
					t.Fatalf("offset %d: qemu-img map %+v, BlockStatus %+v", off, q, e)
				}
				if !q.Data && q.Zero != (e.Flags&drivers.ExtentZero != 0) {
					t.Fatalf("offset %d: zero flag: qemu-img map %+v, BlockStatus %+v", off, q, e)
				}
			}
			t.Logf("%d qemu-img map entries, %d extents", len(qm), len(exts))
		})
	}
}

// TestBackingProbed opens overlays whose backing-format extension is gone
// (retyped to an extension nobody knows): the backing format is probed.
func TestBackingProbed(t *testing.T) {
	requireQemu(t)
	for _, bfmt := range []string{"qcow2", "raw"} {
		t.Run(bfmt, func(t *testing.T) {
			dir := t.TempDir()
			base := filepath.Join(dir, "base."+bfmt)
			qemuImg(t, "create", "-q", "-f", bfmt, base, "1M")
			driverstest.Cmd(t, "qemu-io", "-f", bfmt, "-c", "write -P 0x61 4096 8192", base)
			img := filepath.Join(dir, "img.qcow2")
			qemuImg(t, "create", "-q", "-f", "qcow2", "-b", "base."+bfmt, "-F", bfmt, img, "1M")
			driverstest.QemuIO(t, img, "write -P 0x62 8192 512")
			b, err := os.ReadFile(img)
			if err != nil {
				t.Fatal(err)
			}
			i := bytes.Index(b[:4096], []byte{0xe2, 0x79, 0x2a, 0xca})
			if i < 0 {
				t.Fatal("no backing-format extension")
			}
			copy(b[i:], []byte{0x7e, 0x57, 0x00, 0x01})
			if err := os.WriteFile(img, b, 0o644); err != nil {
				t.Fatal(err)
			}
			d := openTest(t, img, drivers.OpenOptions{})
			if d.h.BackingFormat != "" {
				t.Fatalf("backing format %q still set", d.h.BackingFormat)
			}
			want := make([]byte, 1<<20)
			copy(want[4096:], bytes.Repeat([]byte{0x61}, 8192))
			copy(want[8192:], bytes.Repeat([]byte{0x62}, 512))
			checkRange(t, d, want, 0, 1<<20)
			if got := d.Info().Backing; got == nil || got.Format != bfmt {
				t.Errorf("backing info %+v, want format %s", got, bfmt)
			}
		})
	}
}

// TestDirtyAndCorruptBits: an image with the dirty or the corrupt bit set
// still opens (read-only) and reads.
func TestDirtyAndCorruptBits(t *testing.T) {
	requireQemu(t)
	for _, bit := range []uint64{incompatDirty, incompatCorrupt} {
		t.Run(fmt.Sprint(bit), func(t *testing.T) {
			img := filepath.Join(t.TempDir(), "img.qcow2")
			qemuImg(t, "create", "-q", "-f", "qcow2", img, "1M")
			driverstest.QemuIO(t, img, "write -P 0x44 0 1000")
			putFileBE64(t, img, 72, fileBE64(t, img, 72)|bit)
			d := openTest(t, img, drivers.OpenOptions{})
			buf := make([]byte, 1001)
			if _, err := readAt(d, buf, 0); err != nil || buf[999] != 0x44 || buf[1000] != 0 {
				t.Fatalf("read: %v %x", err, buf[998:])
			}
		})
	}
}
