package qcow2

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
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
