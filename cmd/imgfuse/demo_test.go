package main

import (
	"bytes"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"imgfuse/drivers"
)

func TestDemoSampleValid(t *testing.T) {
	total := 0
	for _, name := range sampleFiles {
		b, err := sampleFS.ReadFile("sample/" + name)
		if err != nil {
			t.Fatal(err)
		}
		total += len(b)
	}
	if total > 1<<20 {
		t.Errorf("embedded sample is %d bytes, over 1 MiB", total)
	}
	dir := t.TempDir()
	if err := writeSample(dir); err != nil {
		t.Fatal(err)
	}
	overlay := filepath.Join(dir, "overlay.qcow2")
	f, err := drivers.ProbeFile(imageFormats(), overlay)
	if err != nil || f.Name() != "qcow2" {
		t.Fatalf("overlay probes as %v, %v", f, err)
	}
	links, err := imageChain(overlay, "auto", true)
	if err != nil {
		t.Fatal(err)
	}
	if len(links) != 2 || links[1].info.Format != "qcow2" {
		t.Fatalf("overlay chain: %+v", links)
	}
	backing := links[1].info.Filename
	if _, err := os.Stat(backing); err != nil {
		t.Errorf("backing file: %v", err)
	}
	if filepath.Dir(backing) != dir && !filepath.IsAbs(backing) {
		t.Errorf("backing file %s not next to the overlay", backing)
	}

	// The chain must read as an ext4 filesystem: superblock magic 0xEF53 at
	// byte 1024+56, and layer.txt's text from the overlay, not the backing.
	d, _, err := drivers.Open(overlay, "auto", drivers.OpenOptions{ReadOnly: true, Formats: imageFormats()})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	disk, err := io.ReadAll(io.NewSectionReader(drivers.ReaderAt(d), 0, d.Size()))
	if err != nil {
		t.Fatal(err)
	}
	if disk[1024+56] != 0x53 || disk[1024+57] != 0xef {
		t.Errorf("no ext4 superblock magic: % x", disk[1024+56:1024+58])
	}
	if !bytes.Contains(disk, []byte("this text comes from the overlay")) ||
		bytes.Contains(disk, []byte("this text comes from the backing")) {
		t.Error("layer.txt does not read from the overlay")
	}
	if bytes.Contains(disk, []byte("backing junk")) {
		t.Error("backing junk shows through the overlay's zero clusters")
	}

	// qemu-img, the reference, must read the same bytes.
	if _, err := exec.LookPath("qemu-img"); err == nil {
		ref := filepath.Join(dir, "ref.raw")
		if out, err := exec.Command("qemu-img", "convert", "-O", "raw", overlay, ref).CombinedOutput(); err != nil {
			t.Fatalf("qemu-img convert: %v\n%s", err, out)
		}
		want, err := os.ReadFile(ref)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(disk, want) {
			t.Error("the driver and qemu-img read the sample differently")
		}
		if out, err := exec.Command("qemu-img", "check", overlay).CombinedOutput(); err != nil {
			t.Errorf("qemu-img check: %v\n%s", err, out)
		}
	}
}
