package vhdx

import (
	"testing"

	"imgfuse/drivers"
	"imgfuse/drivers/driverstest"
)

// TestAllocated: a fresh image reports next to nothing allocated, and
// data written by qemu-io (whole 1 MiB blocks) counts in full: the
// headers, log and regions are subtracted for what they occupy of the
// file, not for their lengths.
func TestAllocated(t *testing.T) {
	for _, c := range []struct {
		name string
		opts []string
		io   []string
		lo   int64
	}{
		{"fresh", []string{"-o", "block_size=1M"}, nil, 0},
		{"written", []string{"-o", "block_size=1M"}, []string{"write -P 0x11 1M 1M", "write -P 0x22 5M 2M"}, 3 << 20},
		{"fixed", []string{"-o", "subformat=fixed"}, []string{"write -P 0x33 2M 1M"}, 1 << 20},
	} {
		t.Run(c.name, func(t *testing.T) {
			path, _ := driverstest.QemuImage(t, "vhdx", t.TempDir(), c.name+".vhdx", c.opts, "16M", c.io...)
			d, err := Open(path, drivers.OpenOptions{ReadOnly: true})
			if err != nil {
				t.Fatal(err)
			}
			defer d.Close()
			if a := d.Allocated(); a < c.lo || a > c.lo+256<<10 {
				t.Errorf("Allocated: %d bytes, want [%d, %d]", a, c.lo, c.lo+256<<10)
			}
		})
	}
}
