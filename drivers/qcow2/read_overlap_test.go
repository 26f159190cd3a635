package qcow2

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"imgfuse/drivers"
	"imgfuse/drivers/driverstest"
)

// snapshotImage makes a 4 MiB image (64 KiB clusters) with 0x11 in
// [0, 1M) and a snapshot, then 0x12 in [0, 64k) (so the active L2 table
// is a copy), and returns it with the offsets of its snapshot table and of
// the snapshot's L1 table.
func snapshotImage(t *testing.T, dir string) (img string, snapTable, snapL1 int64) {
	t.Helper()
	img = filepath.Join(dir, "snap.qcow2")
	qemuImg(t, "create", "-q", "-f", "qcow2", img, "4M")
	driverstest.QemuIO(t, img, "write -P 0x11 0 1M")
	qemuImg(t, "snapshot", "-c", "s1", img)
	driverstest.QemuIO(t, img, "write -P 0x12 0 64k")
	snapTable = int64(fileBE64(t, img, 64))
	snapL1 = int64(fileBE64(t, img, snapTable))
	if snapTable == 0 || snapL1 == 0 {
		t.Fatal("no snapshot table")
	}
	return img, snapTable, snapL1
}

// logCount is an OpenOptions.Logf that counts what it is given.
type logCount struct {
	mu    sync.Mutex
	lines []string
}

func (l *logCount) logf(format string, args ...any) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.lines = append(l.lines, fmt.Sprintf(format, args...))
}

// TestReadIntoMetadata: a data cluster whose L2 entry names metadata the
// overlap checker knows — here the snapshot table and a snapshot's L1
// table, which the hostile images lack — fails with ErrCorrupt naming it,
// on a read-only and on a writable open; the rest of the disk reads; the
// cause is logged once. On a writable open the image is then marked
// corrupt (no further write; the corrupt bit on disk); a read-only open
// changes no byte of the file.
func TestReadIntoMetadata(t *testing.T) {
	requireQemu(t)
	for _, ro := range []bool{true, false} {
		t.Run(fmt.Sprintf("read-only=%t", ro), func(t *testing.T) {
			t.Parallel()
			img, snapTable, snapL1 := snapshotImage(t, t.TempDir())
			l2, _ := firstL2(t, img)
			putFileBE64(t, img, l2+2*8, oflagCopied|uint64(snapTable))
			putFileBE64(t, img, l2+3*8, oflagCopied|uint64(snapL1))
			before, err := os.ReadFile(img)
			if err != nil {
				t.Fatal(err)
			}
			var log logCount
			opts := drivers.OpenOptions{ReadOnly: ro, Logf: log.logf}
			var d *image
			if ro {
				d = openTest(t, img, opts)
			} else {
				d = openRW(t, img, opts)
				defer d.Close()
			}
			p := make([]byte, 64<<10)
			for _, c := range []struct {
				at   int64
				want string
			}{{2 << 16, "the snapshot table"}, {3 << 16, "an inactive L1 table"}, {2 << 16, "the snapshot table"}} {
				_, err := readAt(d, p, c.at)
				if !errors.Is(err, drivers.ErrCorrupt) || !strings.Contains(err.Error(), c.want) {
					t.Errorf("read at %#x: %v, want ErrCorrupt naming %s", c.at, err, c.want)
				}
			}
			if _, err := readAt(d, p, 1<<16); err != nil || !bytes.Equal(p, bytes.Repeat([]byte{0x11}, 64<<10)) {
				t.Errorf("read of an intact cluster: %v (or wrong bytes)", err)
			}
			if len(log.lines) != 1 || !strings.Contains(log.lines[0], "not guest data") {
				t.Errorf("logged %q, want one line naming the read into metadata", log.lines)
			}
			if ro {
				if after, _ := os.ReadFile(img); !bytes.Equal(before, after) {
					t.Error("a read-only open changed the file")
				}
				return
			}
			if _, err := writeAt(d, p, 8<<16); !errors.Is(err, drivers.ErrCorrupt) {
				t.Errorf("write after a read into metadata: %v, want ErrCorrupt (the image is marked corrupt)", err)
			}
			if fileBE64(t, img, 72)&incompatCorrupt == 0 {
				t.Error("the corrupt bit is not set")
			}
		})
	}
}

// TestReadRunIntoMetadata: a run of contiguous clusters whose second
// cluster is metadata reads its first cluster, then fails: the damage
// costs only the clusters it covers.
func TestReadRunIntoMetadata(t *testing.T) {
	requireQemu(t)
	img, snapTable, snapL1 := snapshotImage(t, t.TempDir())
	l2, l1 := firstL2(t, img)
	// Some table that follows a data cluster (qemu-img places the
	// snapshot's tables after the data written before it).
	d := openTest(t, img, drivers.OpenOptions{})
	var prev, meta int64
	for _, m := range []int64{snapTable, snapL1, l2, l1} {
		if k, _ := d.overlapping(m-d.clusterSize, d.clusterSize, 0); k == 0 && m > d.clusterSize {
			prev, meta = m-d.clusterSize, m
			break
		}
	}
	d.Close()
	if meta == 0 {
		t.Fatal("no table follows a data cluster; the test needs one")
	}
	putFileBE64(t, img, l2+4*8, oflagCopied|uint64(prev))
	putFileBE64(t, img, l2+5*8, oflagCopied|uint64(meta))
	want := make([]byte, 64<<10)
	f, err := os.Open(img)
	if err != nil {
		t.Fatal(err)
	}
	_, err = f.ReadAt(want, prev)
	f.Close()
	if err != nil {
		t.Fatal(err)
	}

	d = openTest(t, img, drivers.OpenOptions{})
	p := make([]byte, 128<<10)
	n, err := readAt(d, p, 4<<16)
	if n != 64<<10 || !errors.Is(err, drivers.ErrCorrupt) || !bytes.Equal(p[:n], want) {
		t.Errorf("read of a run into the table at %#x: %d bytes, %v; want 64 KiB of the cluster before it, then ErrCorrupt", meta, n, err)
	}
}

// TestReadOverlapScope: what the check must not refuse. An external data
// file's clusters live in another file, at guest offsets where the image
// file has its tables; a backing layer checks against its own metadata,
// not the overlay's; and a read-only image whose L1 table is read in
// pieces (l1c) still refuses a data cluster on its own L2 table or on the
// L1 table, with no table walk.
func TestReadOverlapScope(t *testing.T) {
	requireQemu(t)
	dir := t.TempDir()

	t.Run("data file", func(t *testing.T) {
		img := filepath.Join(dir, "df.qcow2")
		qemuImg(t, "create", "-q", "-f", "qcow2", "-o", "data_file="+filepath.Join(dir, "df.raw"), img, "4M")
		driverstest.QemuIO(t, img, "write -P 0x33 0 1M")
		d := openTest(t, img, drivers.OpenOptions{})
		p := make([]byte, 1<<20)
		if _, err := readAt(d, p, 0); err != nil || !bytes.Equal(p, bytes.Repeat([]byte{0x33}, 1<<20)) {
			t.Errorf("read of data-file clusters at the guest offsets of the image's tables: %v (or wrong bytes)", err)
		}
	})

	t.Run("backing layer", func(t *testing.T) {
		base := filepath.Join(dir, "base.qcow2")
		qemuImg(t, "create", "-q", "-f", "qcow2", base, "4M")
		driverstest.QemuIO(t, base, "write -P 0x44 0 1M")
		l2, l1 := firstL2(t, base)
		putFileBE64(t, base, l2+8, oflagCopied|uint64(l1))
		top := filepath.Join(dir, "top.qcow2")
		qemuImg(t, "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", top, "4M")
		// The overlay's own data lands at host offsets where the base
		// has its tables: no concern of the base's check.
		driverstest.QemuIO(t, top, "write -P 0x55 2M 1M")
		d := openTest(t, top, drivers.OpenOptions{})
		p := make([]byte, 64<<10)
		if _, err := readAt(d, p, 1<<16); !errors.Is(err, drivers.ErrCorrupt) || !strings.Contains(err.Error(), base) {
			t.Errorf("read through to the base's L1 table: %v, want ErrCorrupt from the base", err)
		}
		for _, c := range []struct {
			at int64
			b  byte
		}{{0, 0x44}, {2 << 20, 0x55}, {3<<20 - 64<<10, 0x55}} {
			if _, err := readAt(d, p, c.at); err != nil || !bytes.Equal(p, bytes.Repeat([]byte{c.b}, 64<<10)) {
				t.Errorf("read at %#x: %v (or wrong bytes)", c.at, err)
			}
		}
	})

	t.Run("L1 read in pieces", func(t *testing.T) {
		// 512-byte clusters: an L2 table maps 32 KiB, so 8 GiB needs
		// 262144 L1 entries (2 MiB, past l1LoadMax).
		img := filepath.Join(dir, "big.qcow2")
		qemuImg(t, "create", "-q", "-f", "qcow2", "-o", "cluster_size=512", img, "8G")
		driverstest.QemuIO(t, img, "write -P 0x66 0 4k")
		l2, l1 := firstL2(t, img)
		putFileBE64(t, img, l2+2*8, oflagCopied|uint64(l2))
		putFileBE64(t, img, l2+3*8, oflagCopied|uint64(l1+4096))
		d := openTest(t, img, drivers.OpenOptions{})
		if d.l1c == nil {
			t.Fatal("the L1 table was read whole; the case needs it read in pieces")
		}
		p := make([]byte, 512)
		for _, c := range []struct {
			at   int64
			want string
		}{{2 * 512, "an active L2 table"}, {3 * 512, "the active L1 table"}} {
			if _, err := readAt(d, p, c.at); !errors.Is(err, drivers.ErrCorrupt) || !strings.Contains(err.Error(), c.want) {
				t.Errorf("read at %#x: %v, want ErrCorrupt naming %s", c.at, err, c.want)
			}
		}
		if _, err := readAt(d, p, 512); err != nil || !bytes.Equal(p, bytes.Repeat([]byte{0x66}, 512)) {
			t.Errorf("read of an intact cluster: %v (or wrong bytes)", err)
		}
		if d.l2Set != nil {
			t.Errorf("the L2 table offsets were collected (%d) from an L1 table read in pieces", len(d.l2Set))
		}
	})
}
