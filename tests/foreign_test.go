package tests

import (
	"bytes"
	"encoding/binary"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"imgfuse/drivers/driverstest"
)

// foreignImages makes, in dir, one small image of each format qemu-img
// creates that imgfuse recognises but cannot read, and returns its path
// with the format's name in the refusal.
func foreignImages(t *testing.T, dir string) map[string]string {
	t.Helper()
	_, create := driverstest.ForeignSource(t, dir)
	return map[string]string{
		create("d.qed", "qed"):       "a QED image",
		create("d.qcow", "qcow"):     "a qcow (version 1) image",
		create("d.hds", "parallels"): "a Parallels image",
	}
}

// TestForeignRefused: for each format qemu-img creates and imgfuse cannot
// read, mount (read-write and --read-only), info (human and JSON), check
// and map exit 5 with the one-line refusal naming the format, leave
// nothing mounted, and leave the file byte for byte as it was; --format
// raw mounts it and the disk is the file's own bytes.
func TestForeignRefused(t *testing.T) {
	requireE2E(t)
	t.Parallel()
	dir := t.TempDir()
	for img, what := range foreignImages(t, dir) {
		t.Run(filepath.Base(img), func(t *testing.T) {
			t.Parallel()
			before, err := os.ReadFile(img)
			if err != nil {
				t.Fatal(err)
			}
			want := "imgfuse: " + img + " is " + what + "; imgfuse reads qcow2, raw, vdi, vhdx, vmdk and vpc (-f raw exposes the file's own bytes)\n"
			mp := newMountpoint(t, false)
			for _, args := range [][]string{
				{"mount", img, mp},
				{"mount", "--read-only", img, mp},
				{"info", img},
				{"info", "--output=json", img},
				{"info", "--backing-chain", "--output=json", img},
				{"check", img},
				{"check", "--output=json", img},
				{"map", img},
				{"map", "--output=json", img},
			} {
				r := imgfuse(t, nil, args...)
				if r.code != 5 || r.stderr != want || r.stdout != "" {
					t.Errorf("imgfuse %s: want exit 5, no output and\n%s%v", strings.Join(args, " "), want, r)
				}
				if mounted(t, mp) {
					t.Fatalf("imgfuse %s left a mount", strings.Join(args, " "))
				}
			}
			if after, _ := os.ReadFile(img); !bytes.Equal(before, after) {
				t.Error("the refused commands changed the image")
			}

			// -f raw: the container's bytes, as asked.
			_, disk := mount(t, img, false, "--format", "raw", "--read-only")
			got, err := os.ReadFile(disk)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, before) {
				t.Errorf("the disk of %s mounted --format raw is not the file's bytes", img)
			}
			if r := imgfuse(t, nil, "info", "-f", "raw", "--output=json", img); r.code != 0 || !strings.Contains(r.stdout, `"format": "raw"`) {
				t.Errorf("info -f raw: %v", r)
			}
		})
	}
}

// TestForeignVictim is the scenario: a QED file is not mounted
// as a writable raw disk, so mkfs cannot destroy it; a writable --format
// raw mount, which the user asks for, still works.
func TestForeignVictim(t *testing.T) {
	requireE2E(t, "mkfs.ext4")
	t.Parallel()
	dir := t.TempDir()
	img := filepath.Join(dir, "victim.qed")
	driverstest.Cmd(t, "qemu-img", "create", "-q", "-f", "qed", img, "64M")
	sum := fileSum(t, img)
	mp := newMountpoint(t, false)
	r := imgfuse(t, nil, "mount", img, mp)
	if r.code != 5 || !strings.Contains(r.stderr, "is a QED image") || mounted(t, mp) {
		t.Fatalf("mount of a QED file: %v", r)
	}
	if out, err := exec.Command("mkfs.ext4", "-q", filepath.Join(mp, "disk")).CombinedOutput(); err == nil {
		t.Errorf("mkfs.ext4 on the refused mount's disk succeeded: %s", out)
	}
	if fileSum(t, img) != sum {
		t.Fatal("the QED file changed")
	}
	driverstest.Cmd(t, "qemu-img", "check", "-q", "-f", "qed", img)
}

// removeBackingFormat turns the backing-format header extension of a
// qcow2 image into one of an unknown type, which readers skip, so that
// its backing file's format is probed.
func removeBackingFormat(t *testing.T, img string) {
	t.Helper()
	b, err := os.ReadFile(img)
	if err != nil {
		t.Fatal(err)
	}
	magic := binary.BigEndian.AppendUint32(nil, 0xe2792aca)
	i := bytes.Index(b[:4096], magic)
	if i < 0 {
		t.Fatalf("%s has no backing-format extension", img)
	}
	copy(b[i:], "\x7a\x7a\x7a\x7a")
	if err := os.WriteFile(img, b, 0o644); err != nil {
		t.Fatal(err)
	}
}

// TestForeignBacking: a qcow2 image whose backing file is a QED image,
// named by the backing format (-F qed) or probed, is refused with exit 5
// naming QED, by mount (read-write and --read-only) and map; info
// describes the overlay and says why the backing file cannot be opened,
// and with --backing-chain, where every image must open, exits 5.
func TestForeignBacking(t *testing.T) {
	requireE2E(t)
	t.Parallel()
	dir := t.TempDir()
	base := filepath.Join(dir, "base.qed")
	driverstest.Cmd(t, "qemu-img", "create", "-q", "-f", "qed", base, "4M")
	named := filepath.Join(dir, "named.qcow2")
	driverstest.Cmd(t, "qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qed", "-F", "qed", named)
	probed := filepath.Join(dir, "probed.qcow2")
	driverstest.Cmd(t, "cp", named, probed)
	removeBackingFormat(t, probed)
	if out := driverstest.Cmd(t, "qemu-img", "info", "-U", probed); bytes.Contains(out, []byte("backing file format")) {
		t.Fatalf("the backing format is still there:\n%s", out)
	}
	sums := map[string]string{base: fileSum(t, base), named: fileSum(t, named), probed: fileSum(t, probed)}
	for _, img := range []string{named, probed} {
		mp := newMountpoint(t, false)
		for _, args := range [][]string{
			{"mount", img, mp},
			{"mount", "--read-only", img, mp},
			{"map", img},
		} {
			r := imgfuse(t, nil, args...)
			// The driver names the image it was opening: "qcow2: IMG: ...".
			want := "imgfuse: qcow2: " + img + `: backing file "base.qed": is a QED image: not supported` + "\n"
			if r.code != 5 || r.stderr != want {
				t.Errorf("imgfuse %s: want exit 5 and\n%s%v", strings.Join(args, " "), want, r)
			}
			if mounted(t, mp) {
				t.Fatalf("imgfuse %s left a mount", strings.Join(args, " "))
			}
		}
		r := imgfuse(t, nil, "info", img)
		if r.code != 0 || !strings.Contains(r.stdout, "file format: qcow2") || !strings.Contains(r.stdout, base+" is a QED image") {
			t.Errorf("info %s: want the overlay described and the backing file refused by name\n%v", img, r)
		}
		r = imgfuse(t, nil, "info", "--backing-chain", "--output=json", img)
		if r.code != 5 || !strings.Contains(r.stderr, base+" is a QED image") || strings.Count(r.stderr, "\n") != 1 {
			t.Errorf("info --backing-chain %s: want exit 5 naming QED in one line\n%v", img, r)
		}
		// --format reaches the top image only: no hint for the backing file.
		if strings.Contains(r.stderr, "-f raw") {
			t.Errorf("info --backing-chain %s: the refusal of the backing file offers -f raw: %s", img, r.stderr)
		}
		// check opens no backing file: the overlay itself is clean.
		if r := imgfuse(t, nil, "check", img); r.code != 0 {
			t.Errorf("check %s: %v", img, r)
		}
	}
	for p, sum := range sums {
		if fileSum(t, p) != sum {
			t.Errorf("%s changed", p)
		}
	}
}

// firstSector returns the first 512 bytes of a fresh image of format,
// made by qemu-img with opts.
func firstSector(t *testing.T, dir, format string, opts ...string) []byte {
	t.Helper()
	img := filepath.Join(dir, "hdr."+format)
	args := append([]string{"create", "-q", "-f", format}, opts...)
	driverstest.Cmd(t, "qemu-img", append(args, img, "4M")...)
	b, err := os.ReadFile(img)
	if err != nil {
		t.Fatal(err)
	}
	return b[:512]
}

// TestForeignProbeGuard: through a writable mount of a probed raw image,
// writing the first sector of a VHDX, VMDK or VDI image over the disk's
// first sector, or a fixed VHD's footer over its last, fails with EPERM
// and leaves the image raw and unchanged; with --format raw each write
// goes through and the image then probes as that format and is opened by
// its driver (VHDX, VMDK, VDI, VHD: no longer exit 5).
func TestForeignProbeGuard(t *testing.T) {
	requireE2E(t)
	t.Parallel()
	dir := t.TempDir()
	fixed := filepath.Join(dir, "fixed.vhd")
	driverstest.Cmd(t, "qemu-img", "create", "-q", "-f", "vpc", "-o", "subformat=fixed", fixed, "4M")
	fb, err := os.ReadFile(fixed)
	if err != nil {
		t.Fatal(err)
	}
	const size = 4 << 20
	for _, c := range []struct {
		name string
		data []byte
		off  int64
		what string
	}{
		{"vhdx", firstSector(t, t.TempDir(), "vhdx"), 0, "vhdx"},
		{"vmdk", firstSector(t, t.TempDir(), "vmdk"), 0, "vmdk"},
		{"vdi", firstSector(t, t.TempDir(), "vdi"), 0, "vdi"},
		{"fixed vhd footer", fb[len(fb)-512:], size - 512, "vpc"},
	} {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			dir := t.TempDir()
			sector := filepath.Join(dir, "sector.bin")
			if err := os.WriteFile(sector, c.data, 0o644); err != nil {
				t.Fatal(err)
			}
			img := filepath.Join(dir, "disk.raw")
			if err := os.WriteFile(img, bytes.Repeat([]byte("raw disk"), size/8), 0o644); err != nil {
				t.Fatal(err)
			}
			sum := fileSum(t, img)
			dd := func(disk string) ([]byte, error) {
				return exec.Command("dd", "if="+sector, "of="+disk, "bs=512", "seek="+itoa(c.off/512),
					"conv=notrunc,fsync", "oflag=direct", "status=none").CombinedOutput()
			}
			mp, disk := mount(t, img, false)
			if out, err := dd(disk); err == nil || !strings.Contains(string(out), "not permitted") {
				t.Errorf("dd of %s onto a probed raw image: want EPERM, got %v: %s", c.name, err, out)
			}
			unmount(t, mp)
			if fileSum(t, img) != sum {
				t.Error("a refused write changed the image")
			}
			if f := imageFormat(t, img); f != "raw" {
				t.Fatalf("after the refused write the image probes as %s", f)
			}

			mp, disk = mount(t, img, false, "--format", "raw")
			if out, err := dd(disk); err != nil {
				t.Errorf("--format raw: dd of %s: %v: %s", c.name, err, out)
			}
			unmount(t, mp)
			r := imgfuse(t, nil, "info", img)
			switch {
			case !strings.HasPrefix(c.what, "a "):
				// A header on raw bytes: the driver opens it or
				// finds it damaged, by name either way.
				if r.code == 5 || !strings.Contains(r.stdout+r.stderr, c.what) {
					t.Errorf("after writing %s with --format raw: want it taken for %s\n%v", c.name, c.what, r)
				}
			case r.code != 5 || !strings.Contains(r.stderr, " is "+c.what+";"):
				t.Errorf("after writing %s with --format raw: want it refused as %s\n%v", c.name, c.what, r)
			}
		})
	}
}

func itoa(n int64) string { return fmtSize(n) }
