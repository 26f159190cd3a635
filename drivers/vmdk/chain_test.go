package vmdk_test

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"imgfuse/coroutine"
	"imgfuse/drivers"
	"imgfuse/drivers/driverstest"
	"imgfuse/drivers/vmdk"
)

// layer is one image of a chain: its name, qemu-img create options and
// the qemu-io commands that fill it once linked to the layer below.
type layer struct {
	name string
	opts []string
	io   []string
}

// makeChain makes layers[0] (8M plus an odd tail, filled) and each next
// layer a delta link on the one before it (qemu-img create -b -F vmdk),
// written through qemu-io, and returns the top's path and what qemu-img
// convert reads from it.
func makeChain(t *testing.T, dir string, layers []layer) (string, []byte) {
	t.Helper()
	driverstest.RequireTools(t, "qemu-img", "qemu-io")
	var below string
	for i, l := range layers {
		path := filepath.Join(dir, l.name)
		args := append([]string{"create", "-q", "-f", "vmdk"}, l.opts...)
		if i == 0 {
			args = append(args, path, "8392704")
		} else {
			args = append(args, "-b", filepath.Base(below), "-F", "vmdk", path)
		}
		driverstest.Cmd(t, "qemu-img", args...)
		driverstest.QemuIOFormat(t, "vmdk", path, l.io...)
		below = path
	}
	ref, err := os.ReadFile(driverstest.ConvertRefFormat(t, "vmdk", below, "", t.TempDir()))
	if err != nil {
		t.Fatal(err)
	}
	return below, ref
}

var (
	baseLayer = layer{"base.vmdk", nil, []string{"write -P 0x10 0 8M", "write -P 0x11 8M 1024", "write -z 2M 64k"}}
	midLayer  = layer{"mid.vmdk", nil, []string{"write -P 0x20 1M 100k", "write -P 0x21 3000 5000", "write -z 6M 70k"}}
	topLayer  = layer{"top.vmdk", []string{"-o", "zeroed_grain=on"}, []string{"write -P 0x30 1050k 3k", "write -P 0x31 4M 64k", "write -z 5M 128k"}}
	// A split (twoGbMaxExtentSparse) delta link: the hint is in a
	// descriptor file.
	splitLayer = layer{"split.vmdk", []string{"-o", "subformat=twoGbMaxExtentSparse"}, []string{"write -P 0x40 7M 5000"}}
	// A monolithicFlat base: opened read-only as a parent, it is served
	// as one file, and its CID must still be found.
	flatBaseLayer = layer{"flat.vmdk", []string{"-o", "subformat=monolithicFlat"}, baseLayer.io}
)

var chains = map[string][]layer{
	"2-deep":       {baseLayer, midLayer},
	"3-deep":       {baseLayer, midLayer, topLayer},
	"split-middle": {baseLayer, splitLayer, topLayer},
	"flat-base":    {flatBaseLayer, midLayer},
}

// TestChain: 2- and 3-deep chains read as qemu-img convert reads them,
// through the driver suite read-only and writable (every write to an
// unallocated grain copies the parent's bytes around it).
func TestChain(t *testing.T) {
	for name, layers := range chains {
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			open := func(ro bool) driverstest.OpenFunc {
				return func(t *testing.T) (drivers.Driver, []byte) {
					top, ref := makeChain(t, t.TempDir(), layers)
					d, err := vmdk.Open(top, drivers.OpenOptions{ReadOnly: ro})
					if err != nil {
						t.Fatal(err)
					}
					return d, ref
				}
			}
			driverstest.Run(t, open(true))
			driverstest.RunWritable(t, open(false))
		})
	}
}

// TestChainWritesAgainstQemu: writes through the top of a chain (partial
// grains over the parent's data, whole grains, zero writes), then QEMU
// judges: qemu-img check clean, qemu-img compare equal to a raw model.
// The parents are left as they were.
func TestChainWritesAgainstQemu(t *testing.T) {
	for name, layers := range chains {
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			dir := t.TempDir()
			top, ref := makeChain(t, dir, layers)
			parents := driverstest.DirState(t, dir)
			d, err := vmdk.Open(top, drivers.OpenOptions{})
			if err != nil {
				t.Fatal(err)
			}
			model := bytes.Clone(ref)
			for _, w := range []struct {
				off, n int64
				zero   bool
			}{{100, 1000, false}, {1<<20 + 5, 70000, false}, {3 << 20, 64 << 10, false}, {2<<20 + 512, 4096, true}, {6<<20 + 4096, 200 << 10, true}, {8<<20 + 10, 900, false}} {
				p := bytes.Repeat([]byte{0xe5}, int(w.n))
				if w.zero {
					clear(p)
				}
				copy(model[w.off:], p)
				err := run(func(co *coroutine.Co) error {
					if w.zero {
						return d.WriteZeroes(co, w.off, w.n, true)
					}
					_, err := d.WriteAt(co, p, w.off)
					return err
				})
				if err != nil {
					t.Fatal(err)
				}
			}
			driverstest.ConcurrentWrites(t, d, model, 6, 6)
			if err := run(d.Flush); err != nil {
				t.Fatal(err)
			}
			d.Close()
			raw := filepath.Join(t.TempDir(), "model.raw")
			if err := os.WriteFile(raw, model, 0o644); err != nil {
				t.Fatal(err)
			}
			if out := driverstest.Cmd(t, "qemu-img", "check", "-f", "vmdk", top); !strings.Contains(string(out), "No errors") {
				t.Errorf("qemu-img check:\n%s", out)
			}
			driverstest.Cmd(t, "qemu-img", "compare", "-f", "vmdk", "-F", "raw", top, raw)
			after := driverstest.DirState(t, dir)
			for f, sum := range parents {
				if f != filepath.Base(top) && after[f] != sum {
					t.Errorf("parent %s changed", f)
				}
			}
		})
	}
}

// TestChainCIDMismatch: once the parent is written after the child was
// made (its CID changes), reads that fall through to it fail, as in QEMU,
// while the child's own grains still read; the child still opens.
func TestChainCIDMismatch(t *testing.T) {
	dir := t.TempDir()
	top, ref := makeChain(t, dir, chains["2-deep"])
	driverstest.QemuIOFormat(t, "vmdk", filepath.Join(dir, "base.vmdk"), "write -P 0x77 7M 512")
	// The oracle agrees: an unallocated read fails, an allocated one not.
	if out, err := exec.Command("qemu-io", "-f", "vmdk", "-r", "-c", "read 4M 512", top).CombinedOutput(); err == nil && !strings.Contains(string(out), "error") {
		t.Fatalf("qemu-io read through a changed parent:\n%s", out)
	}
	d, err := vmdk.Open(top, drivers.OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	p := make([]byte, 512)
	if _, err := driverstest.ReadAt(d, p, 4<<20); !errors.Is(err, drivers.ErrCorrupt) || !strings.Contains(err.Error(), "parentCID") {
		t.Errorf("read through a changed parent: %v", err)
	}
	if _, err := driverstest.ReadAt(d, p, 1<<20); err != nil || !bytes.Equal(p, ref[1<<20:1<<20+512]) {
		t.Errorf("read of an allocated grain: %v", err)
	}
}

// setHint rewrites the parentFileNameHint of a monolithicSparse image in
// place: the embedded descriptor's text moves within its NUL padding.
func setHint(t *testing.T, path, old, hint string) {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	from := `parentFileNameHint="` + old + `"`
	i := bytes.Index(b[:64<<10], []byte(from))
	if i < 0 {
		t.Fatalf("%s: no hint %q", path, old)
	}
	end := i + bytes.IndexByte(b[i:], 0) // the text's end
	text := `parentFileNameHint="` + hint + `"` + string(b[i+len(from):end])
	if i+len(text) > end+100 || bytes.IndexByte(b[end:end+100], 1) >= 0 {
		t.Fatalf("%s: no room for hint %q", path, hint)
	}
	copy(b[i:], text)
	clear(b[i+len(text) : max(end, i+len(text))])
	if err := os.WriteFile(path, b, 0o644); err != nil {
		t.Fatal(err)
	}
}

// TestChainLoop: a child whose parent names the child (a -> b -> a), and
// one naming itself, are refused at open with an error that says so,
// never recursing.
func TestChainLoop(t *testing.T) {
	dir := t.TempDir()
	makeChain(t, dir, []layer{{"a.vmdk", nil, nil}, {"b.vmdk", nil, nil}})
	// Made before the loop: qemu-img itself has no loop check (it opens
	// a -> b -> a ... until it runs out of file descriptors).
	self := filepath.Join(dir, "self.vmdk")
	driverstest.Cmd(t, "qemu-img", "create", "-q", "-f", "vmdk", "-b", "b.vmdk", "-F", "vmdk", self)
	setHint(t, self, "b.vmdk", "self.vmdk")
	// a was made without a parent: make it b's child by hand.
	driverstest.Cmd(t, "qemu-img", "create", "-q", "-f", "vmdk", "-b", "b.vmdk", "-F", "vmdk", filepath.Join(dir, "c.vmdk"))
	os.Rename(filepath.Join(dir, "c.vmdk"), filepath.Join(dir, "a.vmdk"))
	for _, top := range []string{"a.vmdk", "b.vmdk"} {
		_, err := vmdk.Open(filepath.Join(dir, top), drivers.OpenOptions{ReadOnly: true})
		if !errors.Is(err, drivers.ErrCorrupt) || !strings.Contains(err.Error(), "loops") {
			t.Errorf("open of %s in a loop: %v", top, err)
		}
	}
	if _, err := vmdk.Open(self, drivers.OpenOptions{}); !errors.Is(err, drivers.ErrCorrupt) || !strings.Contains(err.Error(), "loops") {
		t.Errorf("open of an image that is its own parent: %v", err)
	}
}

// TestChainRefusals: a missing parent, a parent that is not a VMDK
// (QEMU opens the parent as vmdk and fails), a hint QEMU takes for a
// protocol.
func TestChainRefusals(t *testing.T) {
	dir := t.TempDir()
	top, ref := makeChain(t, dir, chains["2-deep"])
	if err := os.WriteFile(filepath.Join(dir, "rawx.vmdk"), make([]byte, 1<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	for hint, want := range map[string]error{"gone.vmdk": os.ErrNotExist, "rawx.vmdk": drivers.ErrCorrupt, "C:\\x.vmdk": drivers.ErrUnsupported} {
		setHint(t, top, "base.vmdk", hint)
		_, err := vmdk.Open(top, drivers.OpenOptions{ReadOnly: true})
		if !errors.Is(err, want) || !strings.Contains(err.Error(), fmt.Sprintf("%q", hint)) {
			t.Errorf("hint %q: %v, want %v", hint, err, want)
		}
		if exec.Command("qemu-img", "convert", "-f", "vmdk", "-O", "raw", top, filepath.Join(t.TempDir(), "x")).Run() == nil {
			t.Errorf("hint %q: qemu-img converts it", hint)
		}
		setHint(t, top, hint, "base.vmdk")
	}
	// Beyond QEMU: an absolute Windows hint (VMware on Windows) finds
	// the parent by its last element beside the image.
	setHint(t, top, "base.vmdk", `C:\VMs\base.vmdk`)
	if d, err := vmdk.Open(top, drivers.OpenOptions{ReadOnly: true}); err != nil {
		t.Errorf("a Windows hint: %v", err)
	} else {
		got := make([]byte, len(ref))
		if _, err := driverstest.ReadAt(d, got, 0); err != nil || !bytes.Equal(got, ref) {
			t.Errorf("read through a Windows hint: %v", err)
		}
		d.Close()
	}
	setHint(t, top, `C:\VMs\base.vmdk`, "base.vmdk")
	// Described without its parent (info), it opens.
	d, err := vmdk.Open(top, drivers.OpenOptions{ReadOnly: true, NoBacking: true})
	if err != nil {
		t.Fatal(err)
	}
	d.Close()
}

// TestChainRelativeHint: a relative hint is appended to the child's path
// as given, as QEMU's path_combine does, so ".." goes up from the
// directory the child was reached through (here a symbolic link), not
// from a lexically cleaned path.
func TestChainRelativeHint(t *testing.T) {
	dir := t.TempDir()
	deep := filepath.Join(dir, "a", "b")
	os.MkdirAll(deep, 0o755)
	base, _ := driverstest.QemuImage(t, "vmdk", filepath.Join(dir, "a"), "base.vmdk", nil, "4M", "write -P 0x61 0 4M")
	_ = base
	child := filepath.Join(deep, "child.vmdk")
	driverstest.Cmd(t, "qemu-img", "create", "-q", "-f", "vmdk", "-b", "../base.vmdk", "-F", "vmdk", child)
	if err := os.Symlink(deep, filepath.Join(dir, "link")); err != nil {
		t.Fatal(err)
	}
	via := filepath.Join(dir, "link", "child.vmdk") // dir/link/../base.vmdk is dir/a/base.vmdk
	ref, err := os.ReadFile(driverstest.ConvertRefFormat(t, "vmdk", via, "", t.TempDir()))
	if err != nil {
		t.Fatal(err)
	}
	d, err := vmdk.Open(via, drivers.OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	got := make([]byte, len(ref))
	if _, err := driverstest.ReadAt(d, got, 0); err != nil || !bytes.Equal(got, ref) || got[0] != 0x61 {
		t.Errorf("read through a relative hint: %v", err)
	}
}

// TestChainInfoMap: the backing names as qemu-img info gives them, and
// the map of the chain, depth by depth, as qemu-img map gives it.
func TestChainInfoMap(t *testing.T) {
	dir := t.TempDir()
	top, _ := makeChain(t, dir, chains["3-deep"])
	d, err := vmdk.Open(top, drivers.OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	var want struct {
		BackingFilename string `json:"backing-filename"`
		BackingFormat   string `json:"backing-filename-format"`
	}
	if err := json.Unmarshal(driverstest.Cmd(t, "qemu-img", "info", "--output=json", top), &want); err != nil {
		t.Fatal(err)
	}
	info := d.Info()
	if info.BackingFilename != want.BackingFilename || info.BackingFormat != want.BackingFormat || info.Backing == nil || info.Backing.BackingFilename != "base.vmdk" {
		t.Errorf("info: backing %q %q, want %q %q", info.BackingFilename, info.BackingFormat, want.BackingFilename, want.BackingFormat)
	}
	type entry struct {
		Start, Length int64
		Depth         int
		Present, Zero bool
		Data          bool
	}
	var qmap []entry
	if err := json.Unmarshal(driverstest.Cmd(t, "qemu-img", "map", "--output=json", "-f", "vmdk", top), &qmap); err != nil {
		t.Fatal(err)
	}
	var got []entry
	for off := int64(0); off < d.Size(); {
		var e drivers.MapEntry
		if err := run(func(co *coroutine.Co) (err error) { e, err = drivers.MapAt(co, d, off); return }); err != nil {
			t.Fatal(err)
		}
		g := entry{e.Start, e.Length, e.Depth, e.Present, e.Zero, e.Data}
		if n := len(got); n > 0 && got[n-1].Depth == g.Depth && got[n-1].Present == g.Present && got[n-1].Zero == g.Zero && got[n-1].Data == g.Data && got[n-1].Start+got[n-1].Length == g.Start {
			got[n-1].Length += g.Length
		} else {
			got = append(got, g)
		}
		off += e.Length
	}
	// qemu-img map merges runs with consecutive offsets only; compare
	// per byte range by depth and kind instead.
	flatten := func(es []entry) []entry {
		var out []entry
		for _, g := range es {
			if n := len(out); n > 0 && out[n-1].Depth == g.Depth && out[n-1].Present == g.Present && out[n-1].Zero == g.Zero && out[n-1].Data == g.Data && out[n-1].Start+out[n-1].Length == g.Start {
				out[n-1].Length += g.Length
				continue
			}
			out = append(out, g)
		}
		return out
	}
	if w, g := flatten(qmap), flatten(got); !equalEntries(w, g) {
		t.Errorf("map:\n got  %+v\n want %+v", g, w)
	}
}

func equalEntries[T comparable](a, b []T) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}
