package qcow2

import (
	"path/filepath"
	"testing"

	"imgfuse/drivers"
	"imgfuse/drivers/driverstest"
)

// TestCheckCapability: Check on a read-only image counts what qemu-img
// check counts, reports progress up to done == total, and refuses to
// repair; on a writable image -r leaks fixes a leak.
func TestCheckCapability(t *testing.T) {
	requireQemu(t)
	p := filepath.Join(t.TempDir(), "img.qcow2")
	qemuImg(t, "create", "-q", "-f", "qcow2", p, "8M")
	driverstest.QemuIO(t, p, "write -P 0x11 0 256k")
	driverstest.QemuIO(t, p, "write -c -P 0x12 1M 64k")

	d, err := Format{}.Open(p, drivers.OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	var last, calls int64
	res, err := d.(drivers.Checker).Check(drivers.CheckOnly, func(done, total int64) {
		if done > total || done < last {
			t.Errorf("progress %d/%d after %d", done, total, last)
		}
		last = done
		calls++
	})
	if err != nil {
		t.Fatal(err)
	}
	// 8M of 64k clusters: 128; four data clusters (one compressed).
	if res.Corruptions != 0 || res.Leaks != 0 || res.TotalClusters != 128 || res.AllocatedClusters != 5 ||
		res.CompressedClusters != 1 || res.FragmentedClusters != 1 || calls == 0 || last == 0 {
		t.Errorf("check: %+v, %d progress calls", res, calls)
	}
	if _, err := d.(drivers.Checker).Check(drivers.RepairLeaks, nil); err == nil {
		t.Error("a repair of a read-only image succeeded")
	}
	d.Close()

	off, _ := refblockEntry(t, p, 0)
	putFileBE16(t, p, off, 2) // the header cluster leaks
	d, err = Format{}.Open(p, drivers.OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	res, err = d.(drivers.Checker).Check(drivers.RepairLeaks, nil)
	if err != nil || res.LeaksFixed != 1 || res.Leaks != 0 || res.Corruptions != 0 {
		t.Errorf("repair: %+v, %v", res, err)
	}
}
