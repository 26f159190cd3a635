package qcow2

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
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

// readCluster returns the cluster of path at off.
func readCluster(t testing.TB, path string, off, cs int64) []byte {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	b := make([]byte, cs)
	if _, err := f.ReadAt(b, off); err != nil {
		t.Fatal(err)
	}
	return b
}

// TestRepairWriteOverlapRefused: the repairs of check -r all write
// metadata through the overlap check like every other metadata write. On
// an image whose active L1 table names another piece of metadata as an L2
// table, the COPIED repair that would write over that metadata is refused:
// the check fails with ErrCorrupt, the image is marked corrupt, and the
// metadata is left as it was. The repairs that hit nothing (refcounts) go
// through.
func TestRepairWriteOverlapRefused(t *testing.T) {
	requireQemu(t)
	const cs = 65536
	for _, tc := range []struct {
		name string
		// damage makes L1 entry 1 name metadata as an L2 table and
		// returns that metadata's offset.
		damage func(t *testing.T, p string, l1 int64) int64
		// hit is the metadata the refused write overlaps.
		hit string
	}{
		{
			// A snapshot's L1 table used as an active L2 table: its
			// entry 0 (COPIED, as QEMU copied it) reads as a data
			// cluster with refcount 3, so the repair clears COPIED
			// in the "L2 table", a write into the snapshot's L1.
			"l2-table-over-snapshot-l1", func(t *testing.T, p string, l1 int64) int64 {
				qemuImg(t, "snapshot", "-c", "s1", p)
				snapTable := int64(fileBE64(t, p, 64))
				snapL1 := int64(fileBE64(t, p, snapTable))
				putFileBE64(t, p, snapL1, fileBE64(t, p, snapL1)|oflagCopied)
				putFileBE64(t, p, l1+8, uint64(snapL1)) // refcount 2: no COPIED
				return snapL1
			}, "an inactive L1 table",
		},
		{
			// The active L1 table used as its own L2 table: L1
			// entry 0's L2 table now has refcount 2, so the repair
			// clears COPIED in L1 entry 0, a write into what is
			// also an active L2 table.
			"l1-entry-over-l2-table", func(t *testing.T, p string, l1 int64) int64 {
				putFileBE64(t, p, l1+8, uint64(l1)|oflagCopied)
				return l1
			}, "an active L2 table",
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := filepath.Join(t.TempDir(), "img.qcow2")
			// 2 GiB: an L1 table of four entries, one cluster.
			qemuImg(t, "create", "-q", "-f", "qcow2", p, "2G")
			driverstest.QemuIO(t, p, "write -P 0x11 0 128k")
			_, l1 := firstL2(t, p)
			meta := tc.damage(t, p, l1)
			if code, _, _, out := qemuCheck(t, p); code != 2 {
				t.Fatalf("qemu-img check of the damaged image: exit %d, want 2\n%s", code, out)
			}
			before := readCluster(t, p, meta, cs)

			d, err := Format{}.Open(p, drivers.OpenOptions{Formats: testFormats})
			if err != nil {
				t.Fatal(err)
			}
			res, err := d.(drivers.Checker).Check(drivers.RepairAll, nil)
			d.Close()
			if !errors.Is(err, drivers.ErrCorrupt) || !strings.Contains(fmt.Sprint(err), "preventing invalid write") ||
				!strings.Contains(fmt.Sprint(err), tc.hit) {
				t.Fatalf("check -r all = %+v, %v; want a refused write overlapping %s", res, err, tc.hit)
			}
			if msg := err.Error(); strings.Count(" "+msg, " qcow2: ") != 1 || strings.Count(msg, p) != 1 {
				t.Errorf("the error does not name the image once: %s", msg)
			}
			if res.CheckErrors == 0 {
				t.Errorf("check -r all: no check error counted: %+v", res)
			}
			if after := readCluster(t, p, meta, cs); !bytes.Equal(before, after) {
				t.Errorf("the metadata at %#x was written over", meta)
			}
			if fileBE64(t, p, 72)&incompatCorrupt == 0 {
				t.Error("the image is not marked corrupt")
			}
		})
	}
}

// TestCheckExtendedL2: the checker reads extended L2 tables (16-byte
// entries: the entry, then the subcluster bitmap) through l2Slice as the
// driver does. On a clean image with subcluster writes, zero
// subclusters, a compressed cluster and a snapshot it counts what
// qemu-img check counts (no error, the same image end and block
// statistics); each damaged bitmap is found, in the entry where it is,
// with qemu-img check's verdict.
func TestCheckExtendedL2(t *testing.T) {
	requireQemu(t)
	dir := t.TempDir()
	mk := func(name string) string {
		p := filepath.Join(dir, name+".qcow2")
		qemuImg(t, "create", "-q", "-f", "qcow2", "-o", "extended_l2=on,cluster_size=64k", p, "8M")
		driverstest.QemuIO(t, p,
			"write -P 0x41 2k 2k",     // cluster 0: subcluster 1
			"write -P 0x42 1M 100k",   // clusters 16-17, the last one in part
			"write -z 3M 8k",          // cluster 48: zero subclusters 0-3
			"write -c -P 0x43 4M 64k", // cluster 64: compressed
		)
		qemuImg(t, "snapshot", "-c", "s1", p)
		driverstest.QemuIO(t, p, "write -P 0x44 6M 4k") // cluster 96, after the snapshot
		return p
	}
	type stats struct {
		Corruptions        int   `json:"corruptions"`
		Leaks              int   `json:"leaks"`
		ImageEnd           int64 `json:"image-end-offset"`
		TotalClusters      int64 `json:"total-clusters"`
		AllocatedClusters  int64 `json:"allocated-clusters"`
		FragmentedClusters int64 `json:"fragmented-clusters"`
		CompressedClusters int64 `json:"compressed-clusters"`
	}
	qemu := func(p string) (int, stats) {
		out, err := exec.Command("qemu-img", "check", "-U", "--output=json", p).Output()
		code := 0
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			code = ee.ExitCode()
		} else if err != nil {
			t.Fatal(err)
		}
		var s stats
		if err := json.Unmarshal(out, &s); err != nil {
			t.Fatalf("qemu-img check output %q: %v", out, err)
		}
		return code, s
	}
	ours := func(p string) (drivers.CheckResult, stats) {
		d, err := Format{}.Open(p, drivers.OpenOptions{ReadOnly: true, Formats: testFormats})
		if err != nil {
			t.Fatal(err)
		}
		defer d.Close()
		res, err := d.(drivers.Checker).Check(drivers.CheckOnly, nil)
		if err != nil {
			t.Fatal(err)
		}
		return res, stats{res.Corruptions, res.Leaks, res.ImageEndOffset, res.TotalClusters,
			res.AllocatedClusters, res.FragmentedClusters, res.CompressedClusters}
	}

	t.Run("clean", func(t *testing.T) {
		p := mk("clean")
		code, want := qemu(p)
		res, got := ours(p)
		if code != 0 || got != want {
			t.Fatalf("check: %+v, qemu-img check (exit %d): %+v\n%q", got, code, want, res.Messages)
		}
		if want.AllocatedClusters != 5 || want.CompressedClusters != 1 {
			t.Fatalf("the test image is not what the test expects: %+v", want)
		}
	})

	bm := func(alloc, zero uint32) uint64 { return uint64(zero)<<32 | uint64(alloc) }
	for _, tc := range []struct {
		name    string
		cluster int64 // guest cluster whose bitmap is damaged
		bitmap  uint64
		msg     string
	}{
		{"allocated-and-zero", 17, bm(0xff, 0x1), "Allocated cluster has corrupted subcluster allocation bitmap"},
		{"unallocated-with-alloc-bits", 5, bm(0x10, 0), "Unallocated cluster has non-zero subcluster allocation map"},
		{"compressed-with-bitmap", 64, bm(0, 0x2), "compressed cluster with non-zero subcluster allocation bitmap"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := mk(tc.name)
			l2, _ := firstL2(t, p)
			// Word 1 of the 16-byte entry: an 8-byte stride would
			// read it as the entry of cluster 2*tc.cluster+1.
			putFileBE64(t, p, l2+tc.cluster*16+8, tc.bitmap)
			code, want := qemu(p)
			res, got := ours(p)
			if code != 2 || got.Corruptions != want.Corruptions || got.Leaks != want.Leaks {
				t.Fatalf("check: %+v, qemu-img check (exit %d): %+v\n%q", got, code, want, res.Messages)
			}
			if n := len(slices.DeleteFunc(slices.Clone(res.Messages), func(m string) bool { return !strings.Contains(m, tc.msg) })); n != 1 {
				t.Errorf("%d messages say %q, want 1: %q", n, tc.msg, res.Messages)
			}
		})
	}
}
