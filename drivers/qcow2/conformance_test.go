package qcow2_test

import (
	"errors"
	"os"
	"testing"

	"imgfuse/drivers"
	"imgfuse/drivers/driverstest"
	"imgfuse/drivers/qcow2"
	"imgfuse/drivers/raw"
)

// conformanceSize is the virtual size of the catalogue images: large enough
// for 3 MiB random reads and four 2 MiB clusters, small enough to build and
// convert quickly.
const conformanceSize = 8 << 20

var formats = []drivers.Format{qcow2.Format{}, raw.Format{}}

// TestConformance builds every catalogue image with qemu-img/qemu-io and
// runs the driver suite on it, with `qemu-img convert -O raw` as the
// reference.
func TestConformance(t *testing.T) {
	driverstest.RequireTools(t, "qemu-img", "qemu-io")
	for _, img := range driverstest.Catalogue(conformanceSize) {
		t.Run(img.Name, func(t *testing.T) {
			t.Parallel()
			dir := t.TempDir()
			path := img.Build(t, dir, conformanceSize)
			ref, err := os.ReadFile(driverstest.ConvertRef(t, path, img.Snapshot, dir))
			if err != nil {
				t.Fatal(err)
			}
			for _, z := range img.Zeros {
				for i, c := range ref[z[0] : z[0]+z[1]] {
					if c != 0 {
						t.Fatalf("reference is not zero at %d: the recipe is wrong", z[0]+int64(i))
					}
				}
			}
			open := func(t *testing.T) (drivers.Driver, []byte) {
				d, f, err := drivers.Open(path, "auto", drivers.OpenOptions{
					ReadOnly: true, Formats: formats, Snapshot: img.Snapshot,
				})
				if err != nil {
					t.Fatalf("open %s: %v", path, err)
				}
				if f.Name() != "qcow2" {
					t.Errorf("probed format %q, want qcow2", f.Name())
				}
				return d, ref
			}
			driverstest.Run(t, open)
			t.Run("RefusesWrites", func(t *testing.T) { driverstest.RunReadOnly(t, open) })
		})
	}
}

// TestDamaged opens every damaged image of the catalogue: the open fails
// with a matching error, or reads of the damaged range fail with an error
// wrapping drivers.ErrCorrupt. Never other data, never a panic.
func TestDamaged(t *testing.T) {
	driverstest.RequireTools(t, "qemu-img", "qemu-io")
	for _, c := range driverstest.Damaged() {
		t.Run(c.Name, func(t *testing.T) {
			t.Parallel()
			path := driverstest.BuildDamaged(t, c)
			format := c.Format
			if format == "" {
				format = "auto"
			}
			d, _, err := drivers.Open(path, format, drivers.OpenOptions{ReadOnly: true, Formats: formats})
			if err != nil {
				if !c.Msg.MatchString(err.Error()) {
					t.Errorf("open: %v; want an error matching %v", err, c.Msg)
				}
				if !errors.Is(err, drivers.ErrCorrupt) && !errors.Is(err, drivers.ErrUnsupported) {
					t.Errorf("open: %v wraps neither ErrCorrupt nor ErrUnsupported", err)
				}
				return
			}
			defer d.Close()
			if c.MustFail {
				t.Fatalf("open of a damaged image succeeded")
			}
			buf := make([]byte, 64<<10)
			n, err := driverstest.ReadAt(d, buf, c.ReadOff)
			if err == nil {
				t.Fatalf("read of the damaged range [%d, +64k) returned %d bytes starting % x and no error; the image holds 0x5c there",
					c.ReadOff, n, buf[:16])
			}
			if !errors.Is(err, drivers.ErrCorrupt) {
				t.Errorf("read of the damaged range: %v, want an error wrapping ErrCorrupt", err)
			}
		})
	}
}
