package tests

import (
	"bufio"
	"compress/gzip"
	"crypto/sha256"
	"encoding/hex"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"imgfuse/drivers"
	"imgfuse/imgtool"
)

// TestQemuVersions: images made by qemu-img 10.0 and 11
// (tests/testdata/qemu-versions, made by make.sh there) read as that
// qemu-img's own convert -O raw read them: the sha256 of the whole disk,
// read through the driver, is the one SUMS records. Every format listed
// must be one imgfuse reads: a row of a format it does not know (yet)
// fails, it is not skipped.
func TestQemuVersions(t *testing.T) {
	t.Parallel()
	root := filepath.Join("testdata", "qemu-versions")
	versions, err := filepath.Glob(filepath.Join(root, "*", "SUMS"))
	if err != nil || len(versions) < 2 {
		t.Fatalf("want the SUMS of two qemu-img versions in %s, found %v (%v)", root, versions, err)
	}
	readable := imgtool.ReadableFormats()
	for _, sums := range versions {
		dir := filepath.Dir(sums)
		f, err := os.Open(sums)
		if err != nil {
			t.Fatal(err)
		}
		sc := bufio.NewScanner(f)
		for sc.Scan() {
			fields := strings.Fields(sc.Text())
			if len(fields) != 3 {
				t.Fatalf("%s: line %q: want NAME FORMAT SHA256", sums, sc.Text())
			}
			name, format, want := fields[0], fields[1], fields[2]
			t.Run(filepath.Base(dir)+"/"+name, func(t *testing.T) {
				t.Parallel()
				if !slices.Contains(readable, format) {
					t.Fatalf("imgfuse does not read %s images (it reads %v)", format, readable)
				}
				img := unpackImage(t, dir, name)
				d, _, err := drivers.Open(img, format, drivers.OpenOptions{ReadOnly: true, NoDirectIO: true, Formats: imgtool.Formats()})
				if err != nil {
					t.Fatal(err)
				}
				defer d.Close()
				h := sha256.New()
				if _, err := io.Copy(h, io.NewSectionReader(drivers.ReaderAt(d), 0, d.Size())); err != nil {
					t.Fatal(err)
				}
				if got := hex.EncodeToString(h.Sum(nil)); got != want {
					t.Errorf("the disk (%d bytes) has sha256 %s; qemu-img's convert -O raw %s", d.Size(), got, want)
				}
			})
		}
		f.Close()
		if err := sc.Err(); err != nil {
			t.Fatal(err)
		}
	}
}

// unpackImage gunzips name.gz, and the other files of its image (a split
// VMDK's extents: NAME-*.gz), from dir into a new directory, and returns
// the image's path there.
func unpackImage(t *testing.T, dir, name string) string {
	t.Helper()
	out := t.TempDir()
	base := strings.TrimSuffix(name, filepath.Ext(name))
	files, _ := filepath.Glob(filepath.Join(dir, base+"-*.gz"))
	for _, gz := range append(files, filepath.Join(dir, name+".gz")) {
		in, err := os.Open(gz)
		if err != nil {
			t.Fatal(err)
		}
		zr, err := gzip.NewReader(in)
		if err != nil {
			t.Fatal(err)
		}
		dst, err := os.Create(filepath.Join(out, strings.TrimSuffix(filepath.Base(gz), ".gz")))
		if err != nil {
			t.Fatal(err)
		}
		if _, err := io.Copy(dst, zr); err != nil {
			t.Fatal(err)
		}
		dst.Close()
		in.Close()
	}
	return filepath.Join(out, name)
}
