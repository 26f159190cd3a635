package tests

import (
	"bytes"
	"encoding/json"
	"math/rand"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"imgfuse/drivers/driverstest"
)

// blockImage is a VDI, VHD, VHDX or VMDK image made by qemu-img and filled by
// qemu-io: data, written zeros, and blocks never written. stream: the
// filled image is converted to a streamOptimized VMDK, read-only.
// parents: a VMDK delta link, made with qemu-img create -b on the last
// of them, each a delta link on the one before it (bottom first).
type blockImage struct {
	name, format string
	opts         []string
	size         string
	io           []string
	stream       bool
	parents      []blockImage
}

var vmdkFill = []string{"write -P 0xaa 0 4k", "write -P 0xbb 3M 1M", "write -z 5M 64k", "write -P 0xcc 7340000 70000"}

var blockImages = []blockImage{
	{"dynamic.vdi", "vdi", nil, "9M", []string{"write -P 0xaa 0 4k", "write -P 0xbb 3M 1M", "write -z 5M 64k", "write -P 0xcc 7340000 70000"}, false, nil},
	{"static.vdi", "vdi", []string{"-o", "static=on"}, "5242887", []string{"write -P 0x11 100k 3000", "write -z 2M 1M"}, false, nil},
	{"dynamic.vhd", "vpc", nil, "9M", []string{"write -P 0xaa 0 4k", "write -P 0xbb 3M 1M", "write -z 5M 64k", "write -P 0xcc 7340000 70000"}, false, nil},
	{"fixed.vhd", "vpc", []string{"-o", "subformat=fixed"}, "5242887", []string{"write -P 0x11 100k 3000", "write -z 2M 1M"}, false, nil},
	{"forced.vhd", "vpc", []string{"-o", "force_size=on"}, "6M", []string{"write -P 0x22 1M 2M"}, false, nil},
	{"dynamic.vhdx", "vhdx", nil, "9M", []string{"write -P 0xaa 0 4k", "write -P 0xbb 3M 1M", "write -z 5M 64k", "write -P 0xcc 7340000 70000"}, false, nil},
	{"small-blocks.vhdx", "vhdx", []string{"-o", "block_size=1M,block_state_zero=off"}, "5242887", []string{"write -P 0x11 100k 3000", "write -z 2M 1M", "discard 4M 1M"}, false, nil},
	{"fixed.vhdx", "vhdx", []string{"-o", "subformat=fixed,block_state_zero=off"}, "6M", []string{"write -P 0x22 1M 2M"}, false, nil},
	{"sparse.vmdk", "vmdk", nil, "9M", vmdkFill, false, nil},
	{"zeroed.vmdk", "vmdk", []string{"-o", "zeroed_grain=on"}, "5242887", []string{"write -P 0x11 100k 3000", "write -z 2M 1M"}, false, nil},
	{"flat.vmdk", "vmdk", []string{"-o", "subformat=monolithicFlat"}, "9M", vmdkFill, false, nil},
	{"split-sparse.vmdk", "vmdk", []string{"-o", "subformat=twoGbMaxExtentSparse"}, "9M", vmdkFill, false, nil},
	{"split-flat.vmdk", "vmdk", []string{"-o", "subformat=twoGbMaxExtentFlat"}, "5242887", []string{"write -P 0x11 100k 3000"}, false, nil},
	{"stream.vmdk", "vmdk", nil, "9M", vmdkFill, true, nil},
	{"child.vmdk", "vmdk", nil, "", []string{"write -P 0x21 3000 5000", "write -P 0x22 3M 100k", "write -z 7M 70k"}, false, vmdkParents[:1]},
	{"top.vmdk", "vmdk", []string{"-o", "zeroed_grain=on"}, "", []string{"write -P 0x31 1050k 3k", "write -z 3M 128k", "write -P 0x32 8M 10000"}, false, vmdkParents},
}

// vmdkParents: a base (9 MiB plus an odd tail) and a split delta link on
// it, the parents of the chain rows of blockImages.
var vmdkParents = []blockImage{
	{"base.vmdk", "vmdk", nil, "9438720", append([]string{"write -P 0x10 0 9438720"}, vmdkFill...), false, nil},
	{"mid.vmdk", "vmdk", []string{"-o", "subformat=twoGbMaxExtentSparse"}, "", []string{"write -P 0x20 1M 100k", "write -z 5M 64k"}, false, nil},
}

func (b blockImage) build(t *testing.T, dir string) (img string, ref []byte) {
	t.Helper()
	img = filepath.Join(dir, b.name)
	src := img
	if b.stream {
		src = filepath.Join(dir, "src-"+b.name)
	}
	for i, p := range b.parents {
		p.parents = b.parents[:i]
		p.create(t, filepath.Join(dir, p.name))
	}
	b.create(t, src)
	if b.stream {
		driverstest.Cmd(t, "qemu-img", "convert", "-f", b.format, "-O", "vmdk", "-o", "subformat=streamOptimized", src, img)
	}
	ref, err := os.ReadFile(driverstest.ConvertRefFormat(t, b.format, img, "", t.TempDir()))
	if err != nil {
		t.Fatal(err)
	}
	return img, ref
}

// create makes b at path (a delta link on its last parent, already made
// in dir, if it has parents) and fills it.
func (b blockImage) create(t *testing.T, path string) {
	t.Helper()
	args := append([]string{"create", "-q", "-f", b.format}, b.opts...)
	if n := len(b.parents); n > 0 {
		args = append(args, "-b", b.parents[n-1].name, "-F", b.format, path)
	} else {
		args = append(args, path, b.size)
	}
	driverstest.Cmd(t, "qemu-img", args...)
	driverstest.QemuIOFormat(t, b.format, path, b.io...)
}

// parentFiles lists the files of b's parents once built in dir (a split
// parent's extents too).
func (b blockImage) parentFiles(dir string) []string {
	var out []string
	for _, p := range b.parents {
		m, _ := filepath.Glob(filepath.Join(dir, strings.TrimSuffix(p.name, ".vmdk")+"*"))
		out = append(out, m...)
	}
	return out
}

// TestBlockFormatsRead: each image, probed (the fixed VHD by its footer)
// and mounted read-only, reads as qemu-img convert says, byte for byte;
// info names the format (and a delta link's backing file) as qemu-img
// does; check checks VDI and VHDX as qemu-img does and says VHD has no
// check (exit 63, as qemu-img); map is qemu-img's: blocks and grains with
// their offsets, zeroed grains, unallocated grains not present,
// compressed grains without an offset, and under a static VDI, a fixed
// VHD and a flat VMDK extent the holes of the image file as zeros. (Not
// for VHDX: QEMU's vhdx has no block status, so qemu-img map calls the
// whole disk data, without offsets; imgfuse maps its blocks.) The text
// map too, naming the extent file of each run of a VMDK.
func TestBlockFormatsRead(t *testing.T) {
	requireE2E(t)
	t.Parallel()
	for _, b := range blockImages {
		t.Run(b.name, func(t *testing.T) {
			t.Parallel()
			img, ref := b.build(t, t.TempDir())
			mp, disk := mount(t, img, false, "--read-only")
			got, err := os.ReadFile(disk)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, ref) {
				t.Errorf("the mounted disk (%d bytes) differs from qemu-img convert's (%d)", len(got), len(ref))
			}
			unmount(t, mp)

			r := imgfuse(t, nil, "info", "--output=json", img)
			type backing struct {
				Name     string `json:"backing-filename"`
				FullName string `json:"full-backing-filename"`
				Format   string `json:"backing-filename-format"`
			}
			var info struct {
				Format string `json:"format"`
				Size   int64  `json:"virtual-size"`
				backing
			}
			if err := json.Unmarshal([]byte(r.stdout), &info); r.code != 0 || err != nil || info.Format != b.format || info.Size != int64(len(ref)) {
				t.Errorf("info: %+v (%v)\n%v", info, err, r)
			}
			var qinfo backing
			if err := json.Unmarshal(driverstest.Cmd(t, "qemu-img", "info", "--output=json", "-f", b.format, img), &qinfo); err != nil || info.backing != qinfo || (len(b.parents) > 0) != (qinfo.Name != "") {
				t.Errorf("info names the backing file %+v, qemu-img %+v (%v)", info.backing, qinfo, err)
			}
			qcode, _ := exitCode(t, "qemu-img", "check", "-f", b.format, img)
			if r := imgfuse(t, nil, "check", img); r.code != qcode {
				t.Errorf("check: exit %d, qemu-img check %d\n%v", r.code, qcode, r)
			}
			// qemu-img check -r exits 63 for the formats it cannot
			// repair (VDI, VHD, VMDK) and 0 for a clean VHDX: so must we.
			qcode, _ = exitCode(t, "qemu-img", "check", "-r", "all", "-f", b.format, img)
			if r := imgfuse(t, nil, "check", "-r", "all", img); r.code != qcode {
				t.Errorf("check -r all: exit %d, qemu-img check -r all %d\n%v", r.code, qcode, r)
			}
			r = imgfuse(t, nil, "map", "--output=json", img)
			if r.code != 0 {
				t.Fatalf("map: %v", r)
			}
			if b.format != "vhdx" {
				want := driverstest.Cmd(t, "qemu-img", "map", "-f", b.format, "--output=json", img)
				var g, w []map[string]any
				if json.Unmarshal([]byte(r.stdout), &g) != nil || json.Unmarshal(want, &w) != nil || !jsonEqual(g, w) {
					t.Errorf("map differs from qemu-img's:\n%s\nwant\n%s", r.stdout, want)
				}
				if b.name != "fixed.vhd" { // which qemu-img probes as raw
					compareHumanMap(t, b.name, img) // a VMDK's runs named by extent file
				}
			}
		})
	}
}

func jsonEqual(a, b any) bool {
	x, _ := json.Marshal(a)
	y, _ := json.Marshal(b)
	return bytes.Equal(x, y)
}

// TestBlockFormatsWrite: a random workload written through a writable
// mount (-f named) and mirrored into a raw model; after the unmount
// qemu-img compare finds the image equal to the model and, for VDI, VHDX
// and VMDK, qemu-img check finds it clean; a VMDK delta link's parents are
// left unchanged. A streamOptimized VMDK is read-only:
// a writable mount is refused naming it, and the image is left alone.
func TestBlockFormatsWrite(t *testing.T) {
	requireE2E(t)
	t.Parallel()
	for _, b := range blockImages {
		t.Run(b.name, func(t *testing.T) {
			t.Parallel()
			dir := t.TempDir()
			img, ref := b.build(t, dir)
			parents := freeze(t, b.parentFiles(dir)...)
			if b.stream {
				sum := fileSum(t, img)
				r := imgfuse(t, nil, "mount", "--format", b.format, img, newMountpoint(t, false))
				if r.code != 5 || !strings.Contains(r.stderr, "streamOptimized") || !strings.Contains(r.stderr, "read-only") {
					t.Errorf("writable mount of a streamOptimized image: want exit 5 naming it\n%v", r)
				}
				if fileSum(t, img) != sum {
					t.Error("the refused mount changed the image")
				}
				return
			}
			mp, disk := mount(t, img, false, "--format", b.format)
			f, err := os.OpenFile(disk, os.O_RDWR, 0)
			if err != nil {
				t.Fatal(err)
			}
			model := bytes.Clone(ref)
			rng := rand.New(rand.NewSource(writeSeed(t)))
			for i := 0; i < 60; i++ {
				off := rng.Int63n(int64(len(model)))
				n := min(1+rng.Int63n(200<<10), int64(len(model))-off)
				p := make([]byte, n)
				rng.Read(p)
				if i%7 == 0 {
					clear(p)
				}
				copy(model[off:], p)
				if _, err := f.WriteAt(p, off); err != nil {
					t.Fatal(err)
				}
			}
			if err := f.Sync(); err != nil {
				t.Fatal(err)
			}
			f.Close()
			unmount(t, mp)
			raw := filepath.Join(t.TempDir(), "model.raw")
			if err := os.WriteFile(raw, model, 0o644); err != nil {
				t.Fatal(err)
			}
			if code, out := exitCode(t, "qemu-img", "compare", "-f", b.format, "-F", "raw", img, raw); code != 0 {
				t.Errorf("qemu-img compare: exit %d\n%s", code, out)
			}
			if b.format == "vdi" || b.format == "vmdk" || b.format == "vhdx" {
				if code, out := exitCode(t, "qemu-img", "check", "-f", b.format, img); code != 0 || !strings.Contains(out, "No errors") {
					t.Errorf("qemu-img check: exit %d\n%s", code, out)
				}
			}
			parents.check(t) // a delta link's parents are opened read-only
		})
	}
}
