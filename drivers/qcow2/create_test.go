package qcow2

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"imgfuse/drivers"
)

// TestCreateMatchesQemu: Create writes the file qemu-img create writes.
func TestCreateMatchesQemu(t *testing.T) {
	requireQemu(t)
	dir := t.TempDir()
	for _, c := range []struct {
		opts string
		o    CreateOptions
	}{
		{"", CreateOptions{}},
		{"cluster_size=4096,refcount_bits=1,lazy_refcounts=on", CreateOptions{ClusterSize: 4096, RefcountBits: 1, LazyRefcounts: true}},
		{"extended_l2=on,compression_type=zstd", CreateOptions{ExtendedL2: true, CompressionType: "zstd"}},
		{"compat=0.10,cluster_size=2M", CreateOptions{Compat: "0.10", ClusterSize: 2 << 20}},
	} {
		theirs, ours := filepath.Join(dir, "q.qcow2"), filepath.Join(dir, "o.qcow2")
		args := []string{"create", "-q", "-f", "qcow2"}
		if c.opts != "" {
			args = append(args, "-o", c.opts)
		}
		qemuImg(t, append(args, theirs, "100M")...)
		c.o.Size = 100 << 20
		if err := Create(ours, c.o); err != nil {
			t.Fatalf("%s: %v", c.opts, err)
		}
		a, _ := os.ReadFile(theirs)
		b, _ := os.ReadFile(ours)
		if !bytes.Equal(a, b) {
			t.Errorf("%q: Create's file differs from qemu-img create's (%d and %d bytes)", c.opts, len(b), len(a))
		}
		d, err := Format{}.Open(ours, drivers.OpenOptions{})
		if err != nil {
			t.Fatalf("%s: open: %v", c.opts, err)
		}
		if d.Size() != 100<<20 {
			t.Errorf("%s: size %d", c.opts, d.Size())
		}
		d.Close()
	}
}

func TestCreateRefusesBadOptions(t *testing.T) {
	p := filepath.Join(t.TempDir(), "x.qcow2")
	for _, o := range []CreateOptions{
		{ClusterSize: 3000}, {ClusterSize: 4 << 20}, {RefcountBits: 3}, {RefcountBits: 128},
		{Compat: "0.10", LazyRefcounts: true}, {Compat: "0.10", RefcountBits: 8},
		{Compat: "0.10", ExtendedL2: true}, {Compat: "0.10", CompressionType: "zstd"},
		{Compat: "2.0"}, {CompressionType: "lz4"}, {ExtendedL2: true, ClusterSize: 4096},
		{BackingFormat: "raw"}, {Size: -1}, {Size: 1 << 62, ClusterSize: 512},
		{Compat: "0.10", DataFile: "d"}, {DataFileRaw: true},
	} {
		if err := Create(p, o); !errors.Is(err, drivers.ErrUnsupported) {
			t.Errorf("Create(%+v) = %v, want ErrUnsupported", o, err)
		}
	}
}

// TestCreatePreallocation: each preallocation mode maps every guest
// cluster as qemu-img's does (qemu-img map: one run, all data, in the
// file), qemu-img check finds the image clean with every cluster
// allocated, the file is as long as qemu-img's, and its blocks are where
// qemu-img's are: holes for metadata, allocated for falloc and full. A
// small metadata image is byte for byte qemu-img's; a 3 GiB one needs two
// refcount blocks and several L2 tables.
func TestCreatePreallocation(t *testing.T) {
	requireQemu(t)
	dir := t.TempDir()
	for _, c := range []struct {
		mode, opts string
		o          CreateOptions
		size       int64
	}{
		{"metadata", "", CreateOptions{}, 10 << 20},
		{"falloc", "", CreateOptions{}, 10 << 20},
		{"full", "", CreateOptions{}, 10 << 20},
		{"metadata", "cluster_size=4096,refcount_bits=8", CreateOptions{ClusterSize: 4096, RefcountBits: 8}, 10 << 20},
		{"metadata", "extended_l2=on", CreateOptions{ExtendedL2: true}, 3 << 30},
		{"falloc", "", CreateOptions{}, 3<<30 + 512},
	} {
		name := c.mode + "," + c.opts
		theirs, ours := filepath.Join(dir, "q.qcow2"), filepath.Join(dir, "o.qcow2")
		opts := "preallocation=" + c.mode
		if c.opts != "" {
			opts += "," + c.opts
		}
		qemuImg(t, "create", "-q", "-f", "qcow2", "-o", opts, theirs, strconv.FormatInt(c.size, 10))
		o := c.o
		o.Size, o.Preallocation = c.size, c.mode
		if err := Create(ours, o); err != nil {
			t.Fatalf("%s: %v", name, err)
		}
		if c.mode == "metadata" && c.size == 10<<20 && c.opts == "" {
			a, _ := os.ReadFile(theirs)
			b, _ := os.ReadFile(ours)
			if !bytes.Equal(a, b) {
				t.Errorf("%s: Create's file differs from qemu-img create's (%d and %d bytes)", name, len(b), len(a))
			}
		}
		qa, qb := fileFacts(t, theirs), fileFacts(t, ours)
		if qa.size != qb.size {
			t.Errorf("%s: file size %d, qemu-img's %d", name, qb.size, qa.size)
		}
		// Blocks: within the metadata's few clusters of qemu-img's.
		if d := qb.blocks - qa.blocks; d > 64<<10 || d < -(64<<10) {
			t.Errorf("%s: %d bytes allocated, qemu-img's image %d", name, qb.blocks, qa.blocks)
		}
		check := string(qemuImg(t, "check", ours))
		n := (c.size + o.clusterSizeOr() - 1) / o.clusterSizeOr()
		want := fmt.Sprintf("%d/%d = 100.00%% allocated", n, n)
		if !strings.Contains(check, "No errors were found") || !strings.Contains(check, want) {
			t.Errorf("%s: qemu-img check:\n%s\nwant no errors and %q", name, check, want)
		}
		if a, b := mapFlags(t, theirs), mapFlags(t, ours); a != b {
			t.Errorf("%s: qemu-img map of ours:\n%s\nof qemu-img's:\n%s", name, b, a)
		}
	}
}

// mapFlags is qemu-img map --output=json of img without the offsets,
// adjacent runs of the same kind merged: where the tables sit aside, what
// the image maps.
func mapFlags(t *testing.T, img string) string {
	t.Helper()
	var runs []struct {
		Start, Length       int64
		Present, Zero, Data bool
	}
	if err := json.Unmarshal(qemuImg(t, "map", "--output=json", img), &runs); err != nil {
		t.Fatal(err)
	}
	var out []string
	var start, end int64
	kind := ""
	for _, r := range runs {
		k := fmt.Sprintf("present=%v zero=%v data=%v", r.Present, r.Zero, r.Data)
		if k != kind || r.Start != end {
			if kind != "" {
				out = append(out, fmt.Sprintf("[%d, %d) %s", start, end, kind))
			}
			start, kind = r.Start, k
		}
		end = r.Start + r.Length
	}
	out = append(out, fmt.Sprintf("[%d, %d) %s", start, end, kind))
	return strings.Join(out, "\n")
}

// clusterSizeOr is the cluster size o asks for.
func (o CreateOptions) clusterSizeOr() int64 {
	if o.ClusterSize == 0 {
		return 64 << 10
	}
	return o.ClusterSize
}

type facts struct{ size, blocks int64 }

// fileFacts is a file's length and the bytes its blocks take.
func fileFacts(t *testing.T, p string) facts {
	t.Helper()
	var st syscall.Stat_t
	if err := syscall.Stat(p, &st); err != nil {
		t.Fatal(err)
	}
	return facts{st.Size, st.Blocks * 512}
}
