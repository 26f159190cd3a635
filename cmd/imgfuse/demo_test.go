package main

import (
	"bytes"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"imgfuse/drivers"
	"imgfuse/imgtool"
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
	if _, err := writeSample(dir); err != nil {
		t.Fatal(err)
	}
	overlay := filepath.Join(dir, "overlay.qcow2")
	f, err := drivers.ProbeFile(imgtool.Formats(), overlay)
	if err != nil || f.Name() != "qcow2" {
		t.Fatalf("overlay probes as %v, %v", f, err)
	}
	links, err := imgtool.ImageChain(overlay, "auto", true)
	if err != nil {
		t.Fatal(err)
	}
	if len(links) != 2 || links[1].Info.Format != "qcow2" {
		t.Fatalf("overlay chain: %+v", links)
	}
	backing := links[1].Info.Filename
	if _, err := os.Stat(backing); err != nil {
		t.Errorf("backing file: %v", err)
	}
	if filepath.Dir(backing) != dir && !filepath.IsAbs(backing) {
		t.Errorf("backing file %s not next to the overlay", backing)
	}

	// The chain must read as an ext4 filesystem: superblock magic 0xEF53 at
	// byte 1024+56, and layer.txt's text from the overlay, not the backing.
	d, _, err := drivers.Open(overlay, "auto", drivers.OpenOptions{ReadOnly: true, Formats: imgtool.Formats()})
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

// TestDemoRefusesToOverwrite: demo --dir never replaces a user's file nor
// mounts over a non-empty mnt; the refusal leaves the directory as it was.
func TestDemoRefusesToOverwrite(t *testing.T) {
	for _, tc := range []struct{ name, file, want string }{
		{"overlay", "overlay.qcow2", "exists; refusing to overwrite"},
		{"backing", "backing.qcow2", "exists; refusing to overwrite"},
		{"mnt file", "mnt", "is not a directory"},
		{"mnt not empty", "mnt/notes.txt", "is not empty"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			p := filepath.Join(dir, tc.file)
			if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(p, []byte("mine"), 0o600); err != nil {
				t.Fatal(err)
			}
			code, _, stderr := runCLI(t, "demo", "--dir", dir)
			if code == imgtool.ExitOK || !strings.Contains(stderr, tc.want) {
				t.Errorf("demo --dir over %s: exit %d, %q; want a refusal with %q", tc.file, code, stderr, tc.want)
			}
			if b, err := os.ReadFile(p); err != nil || string(b) != "mine" {
				t.Errorf("%s after the refusal: %q, %v", tc.file, b, err)
			}
			var names []string
			filepath.WalkDir(dir, func(p string, d os.DirEntry, err error) error {
				if p != dir {
					names = append(names, strings.TrimPrefix(p, dir+"/"))
				}
				return nil
			})
			want := []string{tc.file}
			if strings.Contains(tc.file, "/") {
				want = []string{filepath.Dir(tc.file), tc.file}
			}
			if strings.Join(names, " ") != strings.Join(want, " ") {
				t.Errorf("dir holds %v after the refusal, want %v", names, want)
			}
		})
	}
}

func TestChooseDemoCommand(t *testing.T) {
	const goRun = "/tmp/go-build123/b001/exe/imgfuse"
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct{ exe, wd, onPath, root, want string }{
		{goRun, "/src/imgfuse", "", "/src/imgfuse", "go run ./cmd/imgfuse"},
		{goRun, "/src/imgfuse/cmd", "", "/src/imgfuse", "go run -C /src/imgfuse ./cmd/imgfuse"},
		{goRun, "/src/my dir/cmd", "", "/src/my dir", "go run -C '/src/my dir' ./cmd/imgfuse"},
		{goRun, "/elsewhere", "", "", "imgfuse"},
		{"/root/.cache/go-build/6f/6f55ddac18d6ee7d74907140cc209534ba6e72ab5a5a3c373e57992ba07785fd-d/imgfuse",
			"/src/imgfuse", "", "/src/imgfuse", "go run ./cmd/imgfuse"},
		{self, "/", self, "", "imgfuse"},
		{self, "/", "", "", self},
		{self, "/", "/bin/sh", "", self},
		{"/opt/my tools/imgfuse", "/", "", "", "'/opt/my tools/imgfuse'"},
	} {
		if got := chooseDemoCommand(tc.exe, tc.wd, tc.onPath, tc.root); got != tc.want {
			t.Errorf("chooseDemoCommand(%q, %q, %q, %q) = %q, want %q", tc.exe, tc.wd, tc.onPath, tc.root, got, tc.want)
		}
	}
	wd, _ := os.Getwd()
	if root := moduleRoot(wd); root == "" || filepath.Base(wd) != "imgfuse" || root != filepath.Dir(filepath.Dir(wd)) {
		t.Errorf("moduleRoot(%s) = %q", wd, root)
	}
}
