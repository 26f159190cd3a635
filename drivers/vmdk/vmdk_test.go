package vmdk_test

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"math/rand"
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

// vmdkImage is a qemu-img made VMDK image: its subformat (and other
// create options), size, and the qemu-io commands that fill it (data,
// written zeros, grains left unallocated). stream: made by converting the
// filled monolithicSparse image to streamOptimized.
type vmdkImage struct {
	name   string
	opts   []string
	size   string
	io     []string
	stream bool
}

var fill = []string{"write -P 0xaa 0 4k", "write -P 0xbb 3M 1M", "write -z 5M 64k", "write -P 0xcc 7340000 70000", "write -P 0xdd 8323072 65536"}

var images = []vmdkImage{
	{"sparse", nil, "8M", fill, false},
	{"zeroed", []string{"-o", "zeroed_grain=on"}, "8M", append([]string{"write -P 0x11 4M 1M"}, append(fill, "write -z 4M 128k")...), false},
	{"odd", nil, "5242887", []string{"write -P 0x33 0 512", "write -P 0x44 4M 1049088"}, false}, // rounded up to 5243392
	{"flat", []string{"-o", "subformat=monolithicFlat"}, "8M", fill, false},
	{"split-sparse", []string{"-o", "subformat=twoGbMaxExtentSparse"}, "8M", fill, false},
	{"split-flat", []string{"-o", "subformat=twoGbMaxExtentFlat"}, "8M", fill, false},
	{"empty", nil, "3M", nil, false},
	{"stream", nil, "8M", fill, true},
}

// build makes img in a new directory and returns its path and the raw
// reference qemu-img converts it to.
func build(t *testing.T, img vmdkImage) (string, []byte) {
	t.Helper()
	driverstest.RequireTools(t, "qemu-img", "qemu-io")
	dir := t.TempDir()
	path := filepath.Join(dir, img.name+".vmdk")
	src := path
	if img.stream {
		src = filepath.Join(dir, "src.vmdk")
	}
	driverstest.Cmd(t, "qemu-img", append(append([]string{"create", "-q", "-f", "vmdk"}, img.opts...), src, img.size)...)
	driverstest.QemuIOFormat(t, "vmdk", src, img.io...)
	if img.stream {
		driverstest.Cmd(t, "qemu-img", "convert", "-f", "vmdk", "-O", "vmdk", "-o", "subformat=streamOptimized", src, path)
	}
	ref, err := os.ReadFile(driverstest.ConvertRefFormat(t, "vmdk", path, "", dir))
	if err != nil {
		t.Fatal(err)
	}
	return path, ref
}

func opener(img vmdkImage, opts drivers.OpenOptions) driverstest.OpenFunc {
	return func(t *testing.T) (drivers.Driver, []byte) {
		path, ref := build(t, img)
		d, err := vmdk.Open(path, opts)
		if err != nil {
			t.Fatalf("open %s: %v", path, err)
		}
		return d, ref
	}
}

// TestConformance runs the driver suite on each image, read-only and
// (but streamOptimized) writable, with and without O_DIRECT: every read
// equals qemu-img convert's output, writes read back as a model says.
func TestConformance(t *testing.T) {
	for i, img := range images {
		for _, direct := range []bool{true, false} {
			if !direct && i > 0 {
				continue // the buffered engine once is enough
			}
			name := fmt.Sprintf("%s/direct=%v", img.name, direct)
			t.Run(name+"/read-only", func(t *testing.T) {
				t.Parallel()
				driverstest.Run(t, opener(img, drivers.OpenOptions{ReadOnly: true, NoDirectIO: !direct}))
				driverstest.RunReadOnly(t, opener(img, drivers.OpenOptions{ReadOnly: true, NoDirectIO: !direct}))
			})
			if img.stream {
				continue
			}
			t.Run(name+"/writable", func(t *testing.T) {
				t.Parallel()
				open := opener(img, drivers.OpenOptions{NoDirectIO: !direct})
				driverstest.Run(t, open)
				driverstest.RunWritable(t, open)
			})
		}
	}
}

func run(f func(co *coroutine.Co) error) (err error) {
	coroutine.Run(func(co *coroutine.Co) { err = f(co) })
	return err
}

// TestWritesAgainstQemu writes a random workload through the driver,
// concurrently, then hands the image to QEMU: qemu-img check finds no
// error, and qemu-img compare finds it equal to a raw model written in
// lockstep.
func TestWritesAgainstQemu(t *testing.T) {
	for _, img := range images {
		if img.stream {
			continue
		}
		t.Run(img.name, func(t *testing.T) {
			t.Parallel()
			path, ref := build(t, img)
			d, err := vmdk.Open(path, drivers.OpenOptions{})
			if err != nil {
				t.Fatal(err)
			}
			model := bytes.Clone(ref)
			rng := rand.New(rand.NewSource(driverstest.Seed(t)))
			size := int64(len(model))
			for round := 0; round < 20; round++ {
				done := make(chan error, 8)
				base := rng.Int63n(size)
				for k := 0; k < 8; k++ {
					off := (base + int64(k)*(size/8)) % size
					n := min(1+rng.Int63n(300<<10), size/8, size-off)
					if rng.Intn(4) == 0 { // whole grains: zeroed-grain entries
						off = off &^ 0xffff
						n = min(size-off, 128<<10)
					}
					p := bytes.Repeat([]byte{byte(rng.Intn(255) + 1)}, int(n))
					if rng.Intn(4) == 0 {
						clear(p)
					}
					copy(model[off:], p)
					zero := p[0] == 0 && rng.Intn(2) == 0
					go func() {
						done <- run(func(co *coroutine.Co) error {
							if zero {
								return d.WriteZeroes(co, off, n, true)
							}
							_, err := d.WriteAt(co, p, off)
							return err
						})
					}()
				}
				for k := 0; k < 8; k++ {
					if err := <-done; err != nil {
						t.Fatal(err)
					}
				}
			}
			if err := run(d.Flush); err != nil {
				t.Fatal(err)
			}
			d.Close()
			raw := filepath.Join(t.TempDir(), "model.raw")
			if err := os.WriteFile(raw, model, 0o644); err != nil {
				t.Fatal(err)
			}
			if out := driverstest.Cmd(t, "qemu-img", "check", "-f", "vmdk", path); !strings.Contains(string(out), "No errors") {
				t.Errorf("qemu-img check:\n%s", out)
			}
			driverstest.Cmd(t, "qemu-img", "compare", "-f", "vmdk", "-F", "raw", path, raw)
		})
	}
}

var le = binary.LittleEndian

// TestAllocationOrder: a new grain goes at the end of the file, rounded
// up to a grain, as QEMU places it (128, then 256: docs/formats.md §2.7),
// and both grain tables name it.
func TestAllocationOrder(t *testing.T) {
	path, _ := build(t, vmdkImage{name: "order", size: "64M"})
	d, err := vmdk.Open(path, drivers.OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	for _, off := range []int64{5 << 20, 0} {
		if _, err := driverstest.WriteAt(d, []byte("x"), off+7); err != nil {
			t.Fatal(err)
		}
	}
	d.Close()
	b, _ := os.ReadFile(path)
	gd, rgd := int(le.Uint64(b[56:]))*512, int(le.Uint64(b[48:]))*512
	for _, dir := range []int{gd, rgd} {
		gt := int(le.Uint32(b[dir:])) * 512
		if g5, g0 := le.Uint32(b[gt+80*4:]), le.Uint32(b[gt:]); g5 != 128 || g0 != 256 {
			t.Errorf("grain table at %#x: grain 80 at sector %d, grain 0 at %d; want 128 and 256", gt, g5, g0)
		}
	}
	if len(b) != 384*512 {
		t.Errorf("file is %d bytes, want two whole grains after the metadata", len(b))
	}
	if b[128*512+7] != 'x' || b[256*512+7] != 'x' {
		t.Error("the data is not in its grains")
	}
}

// TestZeroedGrain: a whole-grain zero write on an image with zeroed-grain
// entries records GTE 1 (as QEMU does), and reads back zeros.
func TestZeroedGrain(t *testing.T) {
	path, _ := build(t, vmdkImage{name: "zg", opts: []string{"-o", "zeroed_grain=on"}, size: "4M", io: []string{"write -P 0x5a 0 128k"}})
	d, err := vmdk.Open(path, drivers.OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if err := run(func(co *coroutine.Co) error { return d.WriteZeroes(co, 64<<10, 64<<10, true) }); err != nil {
		t.Fatal(err)
	}
	d.Close()
	b, _ := os.ReadFile(path)
	gt := int(le.Uint32(b[int(le.Uint64(b[56:]))*512:])) * 512
	if g := le.Uint32(b[gt+4:]); g != 1 {
		t.Errorf("grain 1's entry is %d, want 1 (zeroed)", g)
	}
	out := driverstest.Cmd(t, "qemu-io", "-f", "vmdk", "-r", "-c", "read -P 0 64k 64k", "-c", "read -P 0x5a 0 64k", path)
	if strings.Contains(string(out), "Pattern verification failed") {
		t.Errorf("qemu-io:\n%s", out)
	}
}

// TestRefusals: what is not supported is refused by name, never served
// wrongly: a streamOptimized image opened writable, a write into a grain
// whose grain table does not exist (parent chains: chain_test.go).
func TestRefusals(t *testing.T) {
	dir := t.TempDir()
	path, _ := build(t, images[len(images)-1])
	if _, err := vmdk.Open(path, drivers.OpenOptions{}); !errors.Is(err, drivers.ErrUnsupported) || !strings.Contains(err.Error(), "read-only") {
		t.Errorf("writable open of streamOptimized: %v", err)
	}

	// Grain directory entry 0 clears grain table 0 (QEMU would write the
	// grain over the header).
	noGT := filepath.Join(dir, "nogt.vmdk")
	driverstest.Cmd(t, "qemu-img", "create", "-q", "-f", "vmdk", noGT, "4M")
	b, _ := os.ReadFile(noGT)
	copy(b[int(le.Uint64(b[56:]))*512:], []byte{0, 0, 0, 0})
	os.WriteFile(noGT, b, 0o644)
	d, err := vmdk.Open(noGT, drivers.OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := driverstest.WriteAt(d, []byte{1}, 0); !errors.Is(err, drivers.ErrUnsupported) {
		t.Errorf("write without a grain table: %v", err)
	}
	got := make([]byte, 4096)
	if _, err := driverstest.ReadAt(d, got, 0); err != nil || !bytes.Equal(got, make([]byte, 4096)) {
		t.Errorf("read without a grain table: %v", err)
	}
	d.Close()
	// Only the CID (in the descriptor, sectors 1-20) may have changed.
	if after, _ := os.ReadFile(noGT); !bytes.Equal(after[:512], b[:512]) || !bytes.Equal(after[21*512:], b[21*512:]) {
		t.Error("the refused write changed the file")
	}
}

// TestCheck: a grain past the end of the file is a corruption, as
// qemu-img check counts it; no block statistics are counted (qemu-img
// prints none for VMDK); repair is refused; reading it fails.
func TestCheck(t *testing.T) {
	path, _ := build(t, vmdkImage{name: "chk", size: "4M", io: []string{"write -P 1 0 1"}})
	b, _ := os.ReadFile(path)
	gt := int(le.Uint32(b[int(le.Uint64(b[56:]))*512:])) * 512
	le.PutUint32(b[gt+4:], 100000)
	os.WriteFile(path, b, 0o644)
	d, err := vmdk.Open(path, drivers.OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	res, err := d.Check(drivers.CheckOnly, nil)
	if err != nil || res.Corruptions != 1 || res.TotalClusters != 0 || res.AllocatedClusters != 0 {
		t.Errorf("Check: %+v, %v; want one corruption and no block statistics", res, err)
	}
	if _, err := d.Check(drivers.RepairAll, nil); !errors.Is(err, drivers.ErrUnsupported) {
		t.Errorf("repair: %v", err)
	}
	if _, err := driverstest.ReadAt(d, make([]byte, 10), 64<<10); !errors.Is(err, drivers.ErrCorrupt) {
		t.Errorf("read of a grain past the end: %v", err)
	}
	out, err := exec.Command("qemu-img", "check", "-f", "vmdk", path).CombinedOutput()
	if err == nil || !strings.Contains(string(out), "points after EOF") {
		t.Errorf("qemu-img check of the damaged image: %v\n%s", err, out)
	}
}

// TestInfo: the format-specific block as qemu-img info prints it.
func TestInfo(t *testing.T) {
	for _, img := range []vmdkImage{images[0], images[3], images[4], images[len(images)-1]} {
		path, _ := build(t, img)
		d, err := vmdk.Open(path, drivers.OpenOptions{ReadOnly: true})
		if err != nil {
			t.Fatal(err)
		}
		got := d.Info()
		d.Close()
		var want struct {
			VirtualSize    int64          `json:"virtual-size"`
			ClusterSize    int64          `json:"cluster-size"`
			FormatSpecific map[string]any `json:"format-specific"`
		}
		// qemu-img names the extents as it was given the path.
		cmd := exec.Command("qemu-img", "info", "-f", "vmdk", "--output=json", filepath.Base(path))
		cmd.Dir = filepath.Dir(path)
		out, err := cmd.Output()
		if err != nil || json.Unmarshal(out, &want) != nil {
			t.Fatalf("qemu-img info: %v\n%s", err, out)
		}
		if got.VirtualSize != want.VirtualSize || got.ClusterSize != want.ClusterSize {
			t.Errorf("%s: size %d cluster %d, qemu-img %d %d", img.name, got.VirtualSize, got.ClusterSize, want.VirtualSize, want.ClusterSize)
		}
		g, _ := json.Marshal(got.FormatSpecific)
		var gm map[string]any
		json.Unmarshal(g, &gm)
		// The CID changes with every writing open; compare the rest.
		for _, m := range []map[string]any{gm, want.FormatSpecific} {
			data := m["data"].(map[string]any)
			delete(data, "cid")
			for _, e := range data["extents"].([]any) {
				x := e.(map[string]any)
				x["filename"] = filepath.Base(x["filename"].(string))
			}
		}
		if g, w := fmt.Sprint(gm), fmt.Sprint(want.FormatSpecific); g != w {
			t.Errorf("%s: format-specific\n%s\nqemu-img\n%s", img.name, g, w)
		}
	}
}

// TestStreamFooter: VMware's streamOptimized layout, the grain directory
// named only by a footer (a header copy) near the end of the file behind
// a footer marker and before the end-of-stream marker, reads as QEMU's
// front-loaded one does. Made from qemu-img's output: the header's
// gdOffset set to GD_AT_END, the three sectors appended.
func TestStreamFooter(t *testing.T) {
	path, ref := build(t, images[len(images)-1])
	b, _ := os.ReadFile(path)
	footer := bytes.Clone(b[:512])
	le.PutUint64(b[56:], ^uint64(0))
	marker := make([]byte, 512)
	le.PutUint64(marker, 1)
	le.PutUint32(marker[12:], 3)                                              // footer
	b = append(append(append(b, marker...), footer...), make([]byte, 512)...) // EOS: type 0
	vmware := filepath.Join(t.TempDir(), "vmware.vmdk")
	os.WriteFile(vmware, b, 0o644)
	d, err := vmdk.Open(vmware, drivers.OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	got := make([]byte, len(ref))
	if _, err := driverstest.ReadAt(d, got, 0); err != nil || !bytes.Equal(got, ref) {
		t.Errorf("read: %v, equal %v", err, bytes.Equal(got, ref))
	}
	d.Close()
	if qemu, _ := os.ReadFile(driverstest.ConvertRefFormat(t, "vmdk", vmware, "", t.TempDir())); !bytes.Equal(qemu, ref) {
		t.Error("qemu-img reads the crafted image differently: the test image is wrong")
	}

	// Without the end-of-stream marker: refused as corrupt.
	copy(b[len(b)-512:], marker)
	os.WriteFile(vmware, b, 0o644)
	if _, err := vmdk.Open(vmware, drivers.OpenOptions{ReadOnly: true}); !errors.Is(err, drivers.ErrCorrupt) {
		t.Errorf("open without the end-of-stream marker: %v", err)
	}
}
