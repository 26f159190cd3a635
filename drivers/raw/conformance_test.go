package raw_test

import (
	"fmt"
	"math/rand"
	"os"
	"path/filepath"
	"testing"

	"imgfuse/drivers"
	"imgfuse/drivers/driverstest"
	"imgfuse/drivers/raw"
)

// rawImage is a raw test image: its content and how much of it is holes.
type rawImage struct {
	name  string
	size  int64
	holes bool // leave holes in the file (sparse), so BlockStatus sees both kinds
}

var rawImages = []rawImage{
	{name: "odd-4194704", size: 4194704},
	{name: "1MiB", size: 1 << 20},
	{name: "512B", size: 512},
	{name: "sparse-8MiB", size: 8 << 20, holes: true},
}

// content returns seeded random content for img: all random, or random
// islands in zeros for a sparse image.
func content(img rawImage) []byte {
	rng := rand.New(rand.NewSource(img.size))
	ref := make([]byte, img.size)
	if !img.holes {
		rng.Read(ref)
		return ref
	}
	for k := int64(0); k < 6; k++ {
		off := img.size * k / 6
		rng.Read(ref[off+4096*k : off+4096*k+100000])
	}
	return ref
}

// write creates the image file in a fresh directory, writing only the
// non-zero 4 KiB blocks so that a sparse image keeps its holes.
func write(t *testing.T, ref []byte) string {
	path := filepath.Join(t.TempDir(), "disk.raw")
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(int64(len(ref))); err != nil {
		t.Fatal(err)
	}
	for off := 0; off < len(ref); off += 4096 {
		b := ref[off:min(off+4096, len(ref))]
		for _, c := range b {
			if c != 0 {
				if _, err := f.WriteAt(b, int64(off)); err != nil {
					t.Fatal(err)
				}
				break
			}
		}
	}
	return path
}

func opener(img rawImage, opts drivers.OpenOptions) driverstest.OpenFunc {
	ref := content(img)
	return func(t *testing.T) (drivers.Driver, []byte) {
		path := write(t, ref)
		d, err := raw.Format{}.Open(path, opts)
		if err != nil {
			t.Fatalf("open %s (%+v): %v", path, opts, err)
		}
		return d, ref
	}
}

func TestConformance(t *testing.T) {
	for _, img := range rawImages {
		for _, direct := range []bool{true, false} {
			name := fmt.Sprintf("%s/direct=%v", img.name, direct)
			t.Run(name+"/read-only", func(t *testing.T) {
				t.Parallel()
				driverstest.Run(t, opener(img, drivers.OpenOptions{ReadOnly: true, NoDirectIO: !direct}))
			})
			t.Run(name+"/writable", func(t *testing.T) {
				t.Parallel()
				open := opener(img, drivers.OpenOptions{NoDirectIO: !direct})
				driverstest.Run(t, open)
				driverstest.RunWritable(t, open)
			})
			t.Run(name+"/refuses-writes", func(t *testing.T) {
				t.Parallel()
				driverstest.RunReadOnly(t, opener(img, drivers.OpenOptions{ReadOnly: true, NoDirectIO: !direct}))
			})
		}
	}
}

// TestProbe checks that raw claims anything, as a last resort only.
func TestProbe(t *testing.T) {
	for _, hdr := range [][]byte{nil, {0}, []byte("QFI\xfb\x00\x00\x00\x03")} {
		if s := (raw.Format{}).Probe(drivers.ProbeInput{Head: hdr, Tail: hdr, Name: "x.dmg"}); s != 1 {
			t.Errorf("Probe(%q) = %d, want 1", hdr, s)
		}
	}
	if n := (raw.Format{}).Name(); n != "raw" {
		t.Errorf("Name() = %q", n)
	}
}
