package qcow2

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"strings"
	"testing"
	"time"

	"imgfuse/drivers"
	"imgfuse/drivers/driverstest"
)

// fileReader is the read callback readSnapshotTable gets: pread with zeros
// past EOF.
func fileReader(file []byte) func(off int64, p []byte) error {
	return func(off int64, p []byte) error {
		clear(p)
		if off < int64(len(file)) {
			copy(p, file[off:])
		}
		return nil
	}
}

// TestSnapshotsFromQemu reads the tables of images with snapshots taken by
// `qemu-img snapshot -c` and compares them with `qemu-img info`.
func TestSnapshotsFromQemu(t *testing.T) {
	driverstest.RequireTools(t, "qemu-img", "qemu-io")
	for _, compat := range []string{"0.10", "1.1"} {
		t.Run(compat, func(t *testing.T) {
			t.Parallel()
			img := filepath.Join(t.TempDir(), "s.qcow2")
			driverstest.Cmd(t, "qemu-img", "create", "-q", "-f", "qcow2", "-o", "compat="+compat+",cluster_size=4k", img, "1M")
			driverstest.QemuIO(t, img, "write -P 0xaa 0 8k")
			driverstest.Cmd(t, "qemu-img", "snapshot", "-c", "first", img)
			driverstest.QemuIO(t, img, "write -P 0xbb 4k 8k")
			driverstest.Cmd(t, "qemu-img", "snapshot", "-c", "second one", img)
			wantSecond := uint64(1 << 20)
			if compat != "0.10" { // QEMU refuses to resize a v2 image with snapshots
				driverstest.Cmd(t, "qemu-img", "resize", img, "3M")
				wantSecond = 3 << 20
			}
			driverstest.Cmd(t, "qemu-img", "snapshot", "-c", strings.Repeat("n", 300), img)
			driverstest.Cmd(t, "qemu-img", "snapshot", "-d", "second one", img)
			file, err := os.ReadFile(img)
			if err != nil {
				t.Fatal(err)
			}
			h, err := parseHeader(file, int64(len(file)))
			if err != nil {
				t.Fatal(err)
			}
			snaps, err := readSnapshotTable(fileReader(file), h)
			if err != nil {
				t.Fatal(err)
			}
			qi := qemuImageInfo(t, img)
			if len(snaps) != len(qi.Snapshots) || len(snaps) != 2 {
				t.Fatalf("%d snapshots, qemu-img info lists %d (want 2)", len(snaps), len(qi.Snapshots))
			}
			for i, q := range qi.Snapshots {
				s := snaps[i]
				got := fmt.Sprint(s.ID, s.Name, s.VMStateSize, s.DateSec, s.DateNsec, s.VMClockNsec)
				want := fmt.Sprint(q.ID, q.Name, q.VMStateSize, q.DateSec, q.DateNsec, q.VMClockSec*1e9+q.VMClockNsec)
				if got != want {
					t.Errorf("snapshot %d: got %s, qemu-img says %s", i, got, want)
				}
				if q.Icount != nil && s.Icount != *q.Icount {
					t.Errorf("snapshot %d: icount %d, qemu-img says %d", i, s.Icount, *q.Icount)
				}
				if s.L1Offset == 0 || s.L1Offset%4096 != 0 || s.L1Size == 0 {
					t.Errorf("snapshot %d: L1 at %#x size %d", i, s.L1Offset, s.L1Size)
				}
				info := s.info()
				if info.ID != s.ID || info.Name != s.Name || !info.Date.Equal(time.Unix(int64(q.DateSec), int64(q.DateNsec))) {
					t.Errorf("info() = %+v", info)
				}
			}
			// The disk size is recorded per snapshot.
			if snaps[0].DiskSize != 1<<20 || snaps[1].DiskSize != wantSecond {
				t.Errorf("disk sizes %d, %d; want %d, %d", snaps[0].DiskSize, snaps[1].DiskSize, 1<<20, wantSecond)
			}
			s, err := findSnapshot(snaps, "first")
			if err != nil || s.Name != "first" {
				t.Errorf("findSnapshot(first) = %v, %v", s, err)
			}
			// Rewriting gives QEMU's bytes back.
			table, err := marshalSnapshotTable(snaps)
			if err != nil {
				t.Fatal(err)
			}
			if orig := file[h.SnapshotsOffset : h.SnapshotsOffset+uint64(len(table))]; !bytes.Equal(table, orig) {
				t.Errorf("marshalSnapshotTable differs from QEMU's table:\nours %x\nqemu %x", table, orig)
			}
		})
	}
}

// snapHeader returns a header whose snapshot table sits at 64k.
func snapHeader(version uint32, n uint32) *header {
	h := baseHeader()
	h.Version = version
	h.NbSnapshots = n
	h.SnapshotsOffset = 1 << 16
	return h
}

func validSnapshot(id, name string) snapshotEntry {
	s := snapshotEntry{
		L1Offset: 5 << 16, L1Size: 1, ID: id, Name: name,
		DateSec: 1700000000, DateNsec: 5, VMClockNsec: 42,
		VMStateSize: 1 << 33, DiskSize: 64 << 20, Icount: -1,
	}
	// Extra as the table will hold it: the fields, big-endian.
	s.Extra = append(append(be64(s.VMStateSize), be64(s.DiskSize)...), be64(uint64(s.Icount))...)
	return s
}

// tableFile places table at 64k in an otherwise empty file.
func tableFile(t *testing.T, snaps []snapshotEntry) []byte {
	t.Helper()
	table, err := marshalSnapshotTable(snaps)
	if err != nil {
		t.Fatal(err)
	}
	return append(make([]byte, 1<<16), table...)
}

func TestReadSnapshotTable(t *testing.T) {
	unknownExtra := validSnapshot("2", "with unknown extra")
	unknownExtra.Extra = append(unknownExtra.Extra, []byte("future data")...)
	v2 := validSnapshot("1", "v2 entry")
	v2.Extra, v2.VMStateSize, v2.DiskSize = nil, 12345, 0
	good := []snapshotEntry{validSnapshot("1", "a"), unknownExtra, validSnapshot("3", "")}

	tests := []struct {
		name    string
		version uint32
		snaps   []snapshotEntry
		n       uint32 // nb_snapshots; len(snaps) when 0
		mut     func(file []byte)
		want    error
		substr  string
	}{
		{name: "valid", version: 3, snaps: good},
		{name: "v2 without extra", version: 2, snaps: []snapshotEntry{v2}},
		// QEMU opens these (only check complains); DiskSize 0 tells the
		// caller to use the virtual size.
		{name: "v3 without disk size", version: 3, snaps: []snapshotEntry{v2}},
		{name: "extra over 1024", version: 3, snaps: good[:1], mut: func(f []byte) {
			copy(f[1<<16+36:], be32(1025))
		}, want: drivers.ErrCorrupt, substr: "extra data"},
		{name: "L1 unaligned", version: 3, snaps: good[:1], mut: func(f []byte) {
			copy(f[1<<16:], be64(5<<16+8))
		}, want: drivers.ErrCorrupt, substr: "L1"},
		{name: "L1 too large", version: 3, snaps: good[:1], mut: func(f []byte) {
			copy(f[1<<16+8:], be32(4<<20+1))
		}, want: drivers.ErrCorrupt, substr: "L1 table too large"},
		{name: "L1 at 32 MiB limit", version: 3, snaps: good[:1], mut: func(f []byte) {
			copy(f[1<<16+8:], be32(4<<20))
		}},
		{name: "zero entries past EOF", version: 3, snaps: good, n: 4, want: nil},
		{name: "longest id and name", version: 2, snaps: []snapshotEntry{v2}, n: 65536, mut: func(f []byte) {
			// 65535 zero-filled entries of 40 bytes follow an entry
			// with a 64 KiB id and name: far below 64 MiB.
			copy(f[1<<16+12:], []byte{0xff, 0xff, 0xff, 0xff})
		}, want: nil},
		{name: "too many", version: 3, snaps: good, n: 65537, want: drivers.ErrCorrupt, substr: "snapshots"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			file := tableFile(t, tc.snaps)
			if tc.mut != nil {
				tc.mut(file)
			}
			n := tc.n
			if n == 0 {
				n = uint32(len(tc.snaps))
			}
			h := snapHeader(tc.version, n)
			if tc.version == 2 {
				h.HeaderLength, h.RefcountOrder, h.FeatureNames = hdrV2Len, 4, nil
			}
			got, err := readSnapshotTable(fileReader(file), h)
			if tc.want != nil {
				if !errors.Is(err, tc.want) || !strings.Contains(err.Error(), tc.substr) {
					t.Fatalf("err = %v, want %v mentioning %q", err, tc.want, tc.substr)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if len(got) != int(n) {
				t.Fatalf("%d entries, want %d", len(got), n)
			}
			if tc.mut == nil && tc.n == 0 && !reflect.DeepEqual(got, tc.snaps) {
				t.Fatalf("round trip:\nwant %+v\ngot  %+v", tc.snaps, got)
			}
		})
	}
}

// TestSnapshotTableSizeLimit builds entries whose names push the table
// past 64 MiB: QEMU refuses such a table, and so must we, without reading
// (or allocating) beyond the limit.
func TestSnapshotTableSizeLimit(t *testing.T) {
	const n = 1100 // 1100 entries of ~64 KiB names: ~70 MiB
	s := validSnapshot("1", strings.Repeat("x", 65535))
	entry, err := marshalSnapshotTable([]snapshotEntry{s})
	if err != nil {
		t.Fatal(err)
	}
	var maxRead int64
	read := func(off int64, p []byte) error {
		maxRead = max(maxRead, off+int64(len(p)))
		rel := (off - 1<<16) % int64(len(entry))
		for i := range p {
			p[i] = entry[(rel+int64(i))%int64(len(entry))]
		}
		return nil
	}
	_, err = readSnapshotTable(read, snapHeader(3, n))
	if !errors.Is(err, drivers.ErrCorrupt) || !strings.Contains(err.Error(), "larger than") {
		t.Fatalf("err = %v, want a too-large table", err)
	}
	if maxRead > 1<<16+maxSnapshotsBytes+snapshotReadChunk+1<<17 {
		t.Errorf("read up to %d, past the 64 MiB limit", maxRead)
	}
}

func TestMarshalSnapshotTable(t *testing.T) {
	s := validSnapshot("1", "big state") // 8 GiB of VM state
	table, err := marshalSnapshotTable([]snapshotEntry{s})
	if err != nil {
		t.Fatal(err)
	}
	if got := be.Uint32(table[32:]); got != 0 {
		t.Errorf("32-bit vm_state_size = %d, want 0 for a state over 4 GiB", got)
	}
	if len(table)%8 != 0 {
		t.Errorf("table of %d bytes is not padded to 8", len(table))
	}
	s.Extra = nil
	if _, err := marshalSnapshotTable([]snapshotEntry{s}); err == nil {
		t.Error("an 8 GiB state without extra data marshalled")
	}
	s.Extra, s.ID = make([]byte, 1025), "x"
	if _, err := marshalSnapshotTable([]snapshotEntry{s}); err == nil {
		t.Error("1025 bytes of extra data marshalled")
	}
}

func TestReadSnapshotTableReadError(t *testing.T) {
	boom := errors.New("disk on fire")
	_, err := readSnapshotTable(func(int64, []byte) error { return boom }, snapHeader(3, 1))
	if !errors.Is(err, boom) {
		t.Fatalf("err = %v, want the read error", err)
	}
}

func TestFindSnapshot(t *testing.T) {
	snaps := []snapshotEntry{
		{ID: "1", Name: "2"},
		{ID: "2", Name: "1"},
		{ID: "3", Name: "base"},
		{ID: "4", Name: "base"},
	}
	for _, tc := range []struct{ q, wantID string }{
		{"1", "1"}, {"2", "2"}, // an id wins over a name
		{"base", "3"}, // the first of equal names
	} {
		s, err := findSnapshot(snaps, tc.q)
		if err != nil || s.ID != tc.wantID {
			t.Errorf("findSnapshot(%q) = %v, %v; want id %s", tc.q, s, err, tc.wantID)
		}
	}
	if _, err := findSnapshot(snaps, "nope"); err == nil || !strings.Contains(err.Error(), `"nope"`) {
		t.Errorf("missing snapshot: err = %v", err)
	}
}

func TestSnapshotInfo(t *testing.T) {
	s := validSnapshot("7", "x")
	s.VMClockNsec = 1 << 63 // clamps instead of turning negative
	i := s.info()
	want := drivers.Snapshot{ID: "7", Name: "x", DiskSize: 64 << 20, VMStateSize: 1 << 33,
		Date: time.Unix(1700000000, 5).UTC(), VMClock: 1<<63 - 1, Icount: s.Icount}
	if !reflect.DeepEqual(i, want) {
		t.Errorf("info() = %+v, want %+v", i, want)
	}
}
