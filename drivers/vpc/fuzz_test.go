package vpc_test

import (
	"errors"
	"os"
	"path/filepath"
	"testing"

	"imgfuse/coroutine"
	"imgfuse/drivers"
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
		buf := make([]byte, 64<<10)
		coroutine.Run(func(co *coroutine.Co) {
			for _, off := range []int64{0, d.Size() / 2, d.Size() - int64(len(buf))} {
				if off < 0 {
					continue
				}
				n := min(int64(len(buf)), d.Size()-off)
				if got, err := d.ReadAt(co, buf[:n], off); err == nil && got != int(n) {
					t.Fatalf("short read %d of %d without an error", got, n)
				}
			}
			for off, k := int64(0), 0; off < d.Size() && k < 16; k++ {
				st, err := d.BlockStatus(co, off)
				if err != nil {
					break
				}
				if st.Off != off || st.Len <= 0 {
					t.Fatalf("block status at %d: %+v", off, st)
				}
				off += st.Len
			}
		})
	})
}
