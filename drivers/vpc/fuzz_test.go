package vpc_test

import (
	"errors"
	"os"
	"path/filepath"
	"testing"

	"imgfuse/drivers"
	"imgfuse/drivers/driverstest"
	"imgfuse/drivers/vpc"
	"imgfuse/internal/testenv"
)

// FuzzOpen: no file makes the driver panic, allocate without bound, or
// read short without an error; a refused open says why with a sentinel
// (or names the missing parent).
func FuzzOpen(f *testing.F) {
	dir := f.TempDir()
	for _, opts := range [][]string{nil, {"-o", "subformat=fixed"}} {
		p := filepath.Join(dir, "seed.vhd")
		if err := runQemuImg(append(append([]string{"create", "-q", "-f", "vpc"}, opts...), p, "3M")...); err != nil {
			testenv.Skip(f, "qemu-img create for the seeds: %v", err)
		}
		b, _ := os.ReadFile(p)
		f.Add(b)
	}
	if d, err := os.MkdirTemp("/dev/shm", "vpcfuzz"); err == nil {
		dir = d
		f.Cleanup(func() { os.RemoveAll(d) })
	}
	path := filepath.Join(dir, "f.vhd")
	f.Fuzz(func(t *testing.T, data []byte) {
		if err := os.WriteFile(path, data, 0o644); err != nil {
			t.Fatal(err)
		}
		d, err := vpc.Open(path, drivers.OpenOptions{ReadOnly: true, NoDirectIO: true})
		if err != nil {
			if !errors.Is(err, drivers.ErrCorrupt) && !errors.Is(err, drivers.ErrUnsupported) && !errors.Is(err, os.ErrNotExist) {
				t.Fatalf("open failed without a sentinel: %v", err)
			}
			return
		}
		defer d.Close()
		_ = d.Info()
		driverstest.Poke(t, d)
	})
}
