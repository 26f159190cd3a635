package tests

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"

	"imgfuse/drivers/driverstest"
)

// TestOtherFormatBases: a qcow2 overlay whose backing file is a VMDK, VDI,
// VHD or VHDX image (named with -F, and probed without it) reads as qemu-img
// reads it, takes writes that qemu-img check and compare accept, and
// leaves the base unchanged; --overlay on such an image does too.
func TestOtherFormatBases(t *testing.T) {
	requireE2E(t)
	for _, f := range []string{"vmdk", "vdi", "vpc", "vhdx"} {
		for _, named := range []bool{true, false} {
			name := f + "/probed"
			if named {
				name = f + "/-F"
			}
			t.Run(name, func(t *testing.T) {
				t.Parallel()
				dir := t.TempDir()
				base := filepath.Join(dir, "base."+f)
				driverstest.Cmd(t, "qemu-img", "create", "-q", "-f", f, base, "64M")
				driverstest.Cmd(t, "qemu-io", "-f", f, "-c", "write -P 0x5a 1M 2M", "-c", "write -P 0x6b 40M 64k", base)
				top := filepath.Join(dir, "top.qcow2")
				driverstest.Cmd(t, "qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", f, top, "64M")
				if !named {
					removeBackingFormat(t, top) // the base's format is then probed
				}
				driverstest.Cmd(t, "qemu-io", "-f", "qcow2", "-c", "write -P 0x33 2M 64k", top)
				ref := filepath.Join(dir, "ref.raw")
				driverstest.Cmd(t, "qemu-img", "convert", "-O", "raw", top, ref)
				baseSum := sha256File(t, base)

				mp, disk := mount(t, top, false)
				got, err := os.ReadFile(disk)
				if err != nil {
					t.Fatal(err)
				}
				want, err := os.ReadFile(ref)
				if err != nil {
					t.Fatal(err)
				}
				if !bytes.Equal(got, want) {
					t.Fatalf("the overlay reads differently from qemu-img convert")
				}
				fd, err := os.OpenFile(disk, os.O_RDWR, 0)
				if err != nil {
					t.Fatal(err)
				}
				data := bytes.Repeat([]byte{0xc4}, 300000)
				if _, err := fd.WriteAt(data, 1<<20+12345); err != nil {
					t.Fatal(err)
				}
				copy(want[1<<20+12345:], data)
				if err := fd.Close(); err != nil {
					t.Fatal(err)
				}
				unmount(t, mp)
				model := filepath.Join(dir, "model.raw")
				if err := os.WriteFile(model, want, 0o644); err != nil {
					t.Fatal(err)
				}
				if code, out := qemuCheck(t, top); code != 0 {
					t.Fatalf("qemu-img check: exit %d\n%s", code, out)
				}
				driverstest.Cmd(t, "qemu-img", "compare", "-q", "-f", "raw", model, top)
				if sha256File(t, base) != baseSum {
					t.Errorf("writing through the overlay changed the %s base", f)
				}

				// --overlay on the base itself.
				mp, disk = mount(t, base, false, "--overlay")
				fd, err = os.OpenFile(disk, os.O_WRONLY, 0)
				if err != nil {
					t.Fatal(err)
				}
				if _, err := fd.WriteAt(data, 0); err != nil {
					t.Fatal(err)
				}
				if err := fd.Close(); err != nil {
					t.Fatal(err)
				}
				unmount(t, mp)
				if sha256File(t, base) != baseSum {
					t.Errorf("--overlay changed the %s image", f)
				}
			})
		}
	}
}
