package qcow2

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"imgfuse/drivers"
	"imgfuse/drivers/driverstest"
)

// damagedLayout locates the metadata of a qemu-img-made test image.
type damagedLayout struct {
	cs                         int64
	l1, reftable, refblock, l2 int64
	l2b                        int64 // L2 table of L1 entry 2, if any
}

func readLayout(t *testing.T, img string) damagedLayout {
	t.Helper()
	var m damagedLayout
	m.cs = int64(1) << (fileBE64(t, img, 16) & 0xffffffff)
	m.l2, m.l1 = firstL2(t, img)
	m.reftable = int64(fileBE64(t, img, 48))
	m.refblock = int64(fileBE64(t, img, m.reftable))
	if fileBE64(t, img, 32)&0xffffffff > 2 {
		m.l2b = int64(fileBE64(t, img, m.l1+16) & l1eOffsetMask)
	}
	return m
}

// putRefcount16 sets the 16-bit refcount of the cluster at off in the
// refcount block at block.
func putRefcount16(t *testing.T, img string, m damagedLayout, off int64) {
	t.Helper()
	f, err := os.OpenFile(img, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteAt([]byte{0, 0}, m.refblock+2*(off/m.cs)); err != nil {
		t.Fatal(err)
	}
}

// damagedCase is one way to damage a qemu-img-made image (issue 7,
// defect 1): a write to guest offset at must be refused with ErrCorrupt
// because it would land on metadata named by want.
type damagedCase struct {
	name    string
	cluster int64 // 0: 64 KiB
	damage  func(t *testing.T, img string, m damagedLayout)
	at      int64
	want    string
}

func damagedCases() []damagedCase {
	return []damagedCase{
		{name: "refcount-0-for-l1", at: 8 << 20, want: "the active L1 table",
			damage: func(t *testing.T, img string, m damagedLayout) { putRefcount16(t, img, m, m.l1) }},
		{name: "refcount-0-for-reftable", at: 8 << 20, want: "the refcount table",
			damage: func(t *testing.T, img string, m damagedLayout) { putRefcount16(t, img, m, m.reftable) }},
		{name: "refcount-0-for-l2", at: 8 << 20, want: "an active L2 table",
			damage: func(t *testing.T, img string, m damagedLayout) { putRefcount16(t, img, m, m.l2) }},
		{name: "refblock-at-l1", at: 8 << 20, want: "preventing invalid write",
			damage: func(t *testing.T, img string, m damagedLayout) { putFileBE64(t, img, m.reftable, uint64(m.l1)) }},
		{name: "refblock-at-reftable", at: 8 << 20, want: "preventing invalid write",
			damage: func(t *testing.T, img string, m damagedLayout) { putFileBE64(t, img, m.reftable, uint64(m.reftable)) }},
		{name: "refblock-missing", at: 8 << 20, want: "preventing invalid write",
			damage: func(t *testing.T, img string, m damagedLayout) { putFileBE64(t, img, m.reftable, 0) }},
		{name: "l2-entry-into-refblock", at: 8 << 20, want: "a refcount block",
			damage: func(t *testing.T, img string, m damagedLayout) {
				putFileBE64(t, img, m.l2+8*((8<<20)/m.cs), uint64(m.refblock)|oflagCopied)
			}},
		{name: "l2-entry-into-other-l2", cluster: 4096, at: 1 << 20, want: "an active L2 table",
			damage: func(t *testing.T, img string, m damagedLayout) {
				if m.l2b == 0 {
					t.Fatal("no second L2 table")
				}
				putFileBE64(t, img, m.l2+8*((1<<20)/m.cs), uint64(m.l2b)|oflagCopied)
			}},
	}
}

// buildDamaged makes a 32 MiB image with 1 MiB of 0x5a at 0 (and, with
// small clusters, 64 KiB of 0x5b at 4 MiB, so that two L2 tables exist),
// then damages it.
func buildDamaged(t *testing.T, dir string, c damagedCase) string {
	t.Helper()
	img := filepath.Join(dir, c.name+".qcow2")
	args := []string{"create", "-q", "-f", "qcow2"}
	if c.cluster != 0 {
		args = append(args, "-o", "cluster_size="+strconv.FormatInt(c.cluster, 10))
	}
	qemuImg(t, append(args, img, "32M")...)
	driverstest.QemuIO(t, img, "write -P 0x5a 0 1M", "write -P 0x5b 4M 64k")
	c.damage(t, img, readLayout(t, img))
	return img
}

// TestWriteOnDamagedMetadata: each damaged image of issue 7 makes the
// write fail with ErrCorrupt naming the metadata it would have hit, sets
// the corrupt bit, refuses every later write, leaves every other byte of
// the file as it was, and keeps serving reads.
func TestWriteOnDamagedMetadata(t *testing.T) {
	requireQemu(t)
	for _, c := range damagedCases() {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			img := buildDamaged(t, t.TempDir(), c)
			before, err := os.ReadFile(img)
			if err != nil {
				t.Fatal(err)
			}
			d := openRW(t, img, drivers.OpenOptions{})
			_, err = writeAt(d, bytes.Repeat([]byte{0xc3}, 64<<10), c.at)
			if !errors.Is(err, drivers.ErrCorrupt) || !strings.Contains(err.Error(), c.want) {
				d.Close()
				t.Fatalf("write at %#x: %v, want ErrCorrupt naming %q", c.at, err, c.want)
			}
			if _, err := writeAt(d, []byte("x"), 16<<20); !errors.Is(err, drivers.ErrCorrupt) {
				t.Errorf("later write: %v, want ErrCorrupt", err)
			}
			if err := flush(d); err == nil {
				t.Errorf("flush of a corrupt image succeeded")
			}
			got := make([]byte, 1<<20)
			if _, err := readAt(d, got, 0); err != nil || !bytes.Equal(got, bytes.Repeat([]byte{0x5a}, 1<<20)) {
				t.Errorf("read of the data written before the damage: %v", err)
			}
			if err := d.Close(); err == nil {
				t.Errorf("clean close of a corrupt image succeeded")
			}
			after, err := os.ReadFile(img)
			if err != nil {
				t.Fatal(err)
			}
			if v := fileBE64(t, img, 72); v&incompatCorrupt == 0 {
				t.Errorf("corrupt bit not set: %#x", v)
			}
			copy(after[72:80], before[72:80])
			if len(after) < len(before) || !bytes.Equal(after[:len(before)], before) {
				t.Errorf("the file changed (other than the corrupt bit): %d -> %d bytes, first difference at %#x",
					len(before), len(after), firstDifference(before, after))
			}
		})
	}
}

// TestOverlapAtWriteBack: an L1 entry naming the refcount block as its L2
// table lets a write into a zero entry of that "table" through (its data
// goes to a fresh cluster), but writing the table back would overwrite the
// refcount block (itself an active L2 table now): the flush fails with
// ErrCorrupt and the block is intact.
func TestOverlapAtWriteBack(t *testing.T) {
	requireQemu(t)
	img := filepath.Join(t.TempDir(), "img.qcow2")
	qemuImg(t, "create", "-q", "-f", "qcow2", img, "32M")
	driverstest.QemuIO(t, img, "write -P 0x5a 0 1M")
	m := readLayout(t, img)
	putFileBE64(t, img, m.l1, uint64(m.refblock)|oflagCopied)
	block := make([]byte, m.cs)
	f, err := os.Open(img)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.ReadAt(block, m.refblock); err != nil {
		t.Fatal(err)
	}
	f.Close()
	d := openRW(t, img, drivers.OpenOptions{})
	at := 100 * m.cs // entry 100 of the "table": a zero refcount
	_, err = writeAt(d, bytes.Repeat([]byte{0xc3}, 4096), at)
	if err == nil {
		err = flush(d)
	}
	d.Close()
	if !errors.Is(err, drivers.ErrCorrupt) || !strings.Contains(err.Error(), "preventing invalid write") {
		t.Fatalf("write and flush: %v, want ErrCorrupt preventing the write-back", err)
	}
	f, err = os.Open(img)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	got := make([]byte, m.cs)
	if _, err := f.ReadAt(got, m.refblock); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, block) {
		t.Errorf("refcount block changed at %#x", firstDifference(block, got))
	}
}

func firstDifference(a, b []byte) int {
	for i := range min(len(a), len(b)) {
		if a[i] != b[i] {
			return i
		}
	}
	return min(len(a), len(b))
}

// BenchmarkOverlapCheck measures the check an in-place write pays, on an
// image with 16384 active L2 tables and 256 refcount blocks (a 1 TiB disk
// with 64 KiB clusters, fully mapped) and a write that hits nothing.
func BenchmarkOverlapCheck(b *testing.B) {
	const cs = 65536
	h := &header{ClusterBits: 16, L1Offset: 3 * cs, L1Size: 16384, ReftableOffset: cs, ReftableClusters: 1}
	img := &image{h: h, l2Format: newL2Format(h), rc: &refcounts{}}
	for i := range int64(16384) {
		img.l2Set = append(img.l2Set, (100+2*i)*cs)
	}
	for i := range int64(256) {
		img.rc.blocks = append(img.rc.blocks, (101+2*i)*cs)
	}
	b.ReportAllocs()
	for i := 0; b.Loop(); i++ {
		off := int64(100000+i%1000) * cs
		if k, _ := img.overlapping(off, 4096, 0); k != 0 {
			b.Fatalf("hit %v", k)
		}
	}
}
