package qcow2

import (
	"errors"
	"fmt"
	"math"
	"strconv"
	"time"

	"imgfuse/drivers"
)

// Snapshot table layout (qcow2.txt "Snapshots"). Each entry is a 40-byte
// fixed part, extra_data_size bytes of extra data, the id and the name (not
// NUL-terminated), padded to 8 bytes.
const (
	snapshotHeaderLen = 40
	maxSnapshotExtra  = 1024 // QEMU's QCOW_MAX_SNAPSHOT_EXTRA_DATA

	// Extra data fields, by the extra_data_size that includes them.
	extraVMStateEnd = 8  // u64 vm_state_size_large
	extraDiskEnd    = 16 // u64 disk_size (mandatory in v3)
	extraIcountEnd  = 24 // u64 icount (-1: none)

	// snapshotReadChunk is how much of the table one read fetches: a
	// typical entry is 64..100 bytes, so a few reads cover a whole table.
	snapshotReadChunk = 64 << 10
)

// snapshotEntry is one internal snapshot.
type snapshotEntry struct {
	L1Offset    uint64
	L1Size      uint32
	ID, Name    string
	DateSec     uint32
	DateNsec    uint32
	VMClockNsec uint64
	VMStateSize uint64 // the 64-bit extra field if present, else the 32-bit one
	DiskSize    uint64 // 0 if the entry has no disk_size extra field (v2): caller uses header Size
	Icount      int64  // -1 if absent
	Extra       []byte // all extra data, preserved
}

// tableReader serves byte ranges of an on-disk table through read, in
// chunks, so a table of many small entries costs few reads.
type tableReader struct {
	read func(off int64, p []byte) error
	buf  []byte
	pos  int64 // file offset of buf[0]
}

// get returns n bytes at file offset off. The result is valid until the
// next call. n is bounded by the caller (at most an entry's size).
func (r *tableReader) get(off int64, n int) ([]byte, error) {
	if off >= r.pos && off-r.pos+int64(n) <= int64(len(r.buf)) {
		return r.buf[off-r.pos : off-r.pos+int64(n)], nil
	}
	size := max(n, snapshotReadChunk)
	if cap(r.buf) < size {
		r.buf = make([]byte, size)
	}
	r.buf = r.buf[:size]
	if err := r.read(off, r.buf); err != nil {
		r.buf = r.buf[:0]
		return nil, err
	}
	r.pos = off
	return r.buf[:n], nil
}

// readSnapshotTable reads and validates h.NbSnapshots entries at
// h.SnapshotsOffset through read (which fills p from the image file at off,
// zeros past EOF).
//
// It applies QEMU's limits (qcow2_read_snapshots and the snapshot L1 checks
// of qcow2_check): the table spans at most 64 MiB, extra data at most 1 KiB
// per entry, and snapshot L1 tables are cluster-aligned and at most 32 MiB.
// The L1 checks are stricter than QEMU's open, which defers them to the
// use of the snapshot; callers map through these L1 tables without
// re-checking them. Every length it allocates from is one of those bounded
// fields. Errors from read are returned wrapped; malformed entries wrap
// drivers.ErrCorrupt.
//
// A v3 entry without disk_size violates the spec, but QEMU opens such
// images (only `qemu-img check` reports them, "snapshot table entry is
// incomplete") and uses the virtual size instead; so does this reader, by
// leaving DiskSize 0.
func readSnapshotTable(read func(off int64, p []byte) error, h *header) ([]snapshotEntry, error) {
	if h.NbSnapshots == 0 {
		return nil, nil
	}
	if h.NbSnapshots > maxSnapshots {
		return nil, corruptf("%d snapshots (limit %d)", h.NbSnapshots, maxSnapshots)
	}
	if err := validateTable("snapshot table", h.SnapshotsOffset, uint64(h.NbSnapshots), snapshotHeaderLen, snapshotHeaderLen*maxSnapshots, h.ClusterBits); err != nil {
		return nil, err
	}
	start := int64(h.SnapshotsOffset)
	// The table may span at most maxSnapshotsBytes, so every offset
	// below stays far from overflow: start <= MaxInt64 - 2.6 MiB was
	// checked above, and the loop stops once the span passes 64 MiB.
	if start > math.MaxInt64-2*maxSnapshotsBytes {
		return nil, corruptf("snapshot table offset %#x too large", start)
	}
	r := &tableReader{read: read}
	snaps := make([]snapshotEntry, 0, h.NbSnapshots) // <= 65536 entries
	off := start
	for i := uint32(0); i < h.NbSnapshots; i++ {
		off = (off + 7) &^ 7
		if off-start+snapshotHeaderLen > maxSnapshotsBytes {
			return nil, corruptf("snapshot table larger than %d bytes", maxSnapshotsBytes)
		}
		fixed, err := r.get(off, snapshotHeaderLen)
		if err != nil {
			return nil, fmt.Errorf("reading snapshot %d at %#x: %w", i, off, err)
		}
		s := snapshotEntry{
			L1Offset:    be.Uint64(fixed[0:]),
			L1Size:      be.Uint32(fixed[8:]),
			DateSec:     be.Uint32(fixed[16:]),
			DateNsec:    be.Uint32(fixed[20:]),
			VMClockNsec: be.Uint64(fixed[24:]),
			VMStateSize: uint64(be.Uint32(fixed[32:])),
			Icount:      -1,
		}
		idLen := int(be.Uint16(fixed[12:]))
		nameLen := int(be.Uint16(fixed[14:]))
		extraLen := be.Uint32(fixed[36:])
		if extraLen > maxSnapshotExtra {
			return nil, corruptf("snapshot %d: %d bytes of extra data (limit %d)", i, extraLen, maxSnapshotExtra)
		}
		off += snapshotHeaderLen
		varLen := int(extraLen) + idLen + nameLen // <= 1024 + 2*65535
		if off-start+int64(varLen) > maxSnapshotsBytes {
			return nil, corruptf("snapshot table larger than %d bytes", maxSnapshotsBytes)
		}
		v, err := r.get(off, varLen)
		if err != nil {
			return nil, fmt.Errorf("reading snapshot %d at %#x: %w", i, off, err)
		}
		off += int64(varLen)
		extra := v[:extraLen]
		s.Extra = append([]byte(nil), extra...)
		if len(extra) >= extraVMStateEnd {
			s.VMStateSize = be.Uint64(extra[0:])
		}
		if len(extra) >= extraDiskEnd {
			s.DiskSize = be.Uint64(extra[8:])
		}
		if len(extra) >= extraIcountEnd {
			s.Icount = int64(be.Uint64(extra[16:]))
		}
		s.ID = string(v[extraLen : int(extraLen)+idLen])
		s.Name = string(v[int(extraLen)+idLen:])
		if err := validateTable(fmt.Sprintf("snapshot %q L1 table", s.ID), s.L1Offset, uint64(s.L1Size), 8, maxL1Bytes, h.ClusterBits); err != nil {
			return nil, err
		}
		snaps = append(snaps, s)
	}
	return snaps, nil
}

// errNoSnapshot is returned (wrapped) by findSnapshot.
var errNoSnapshot = errors.New("no such snapshot")

// findSnapshot returns the snapshot whose id is idOrName, else the first
// whose name is idOrName: QEMU's rule (find_snapshot_by_id_or_name), under
// which an id always wins over a name.
func findSnapshot(snaps []snapshotEntry, idOrName string) (*snapshotEntry, error) {
	for i := range snaps {
		if snaps[i].ID == idOrName {
			return &snaps[i], nil
		}
	}
	for i := range snaps {
		if snaps[i].Name == idOrName {
			return &snaps[i], nil
		}
	}
	return nil, fmt.Errorf("%w %q", errNoSnapshot, idOrName)
}

// info describes the snapshot for `imgfuse info`. DiskSize is 0 when the
// entry does not record it (v2 images); the caller substitutes the
// header's virtual size.
func (s *snapshotEntry) info() drivers.Snapshot {
	return drivers.Snapshot{
		ID:          s.ID,
		Name:        s.Name,
		DiskSize:    clampInt64(s.DiskSize),
		VMStateSize: clampInt64(s.VMStateSize),
		Date:        time.Unix(int64(s.DateSec), int64(s.DateNsec)).UTC(),
		VMClock:     clampInt64(s.VMClockNsec),
		Icount:      s.Icount,
	}
}

func clampInt64(v uint64) int64 {
	if v > math.MaxInt64 {
		return math.MaxInt64
	}
	return int64(v)
}

// String is used in error messages and tests.
func (s *snapshotEntry) String() string {
	return "snapshot " + strconv.Quote(s.ID) + " (" + strconv.Quote(s.Name) + ")"
}

// marshalSnapshotTable renders snaps as a snapshot table, the inverse of
// readSnapshotTable: each entry keeps its Extra bytes (so unknown extra
// data survives a rewrite), with the known extra fields it covers written
// from the entry's fields. A writer creating a snapshot
// gives it a 24-byte Extra (vm_state_size_large, disk_size, icount), as
// QEMU 7.2 does.
func marshalSnapshotTable(snaps []snapshotEntry) ([]byte, error) {
	var out []byte
	for i := range snaps {
		s := &snaps[i]
		if len(s.Extra) > maxSnapshotExtra || len(s.ID) > math.MaxUint16 || len(s.Name) > math.MaxUint16 {
			return nil, fmt.Errorf("marshal %v: field too long", s)
		}
		if s.VMStateSize > math.MaxUint32 && len(s.Extra) < extraVMStateEnd {
			return nil, fmt.Errorf("marshal %v: a VM state of %d bytes needs vm_state_size_large in the extra data", s, s.VMStateSize)
		}
		for len(out)%8 != 0 {
			out = append(out, 0)
		}
		var fixed [snapshotHeaderLen]byte
		be.PutUint64(fixed[0:], s.L1Offset)
		be.PutUint32(fixed[8:], s.L1Size)
		be.PutUint16(fixed[12:], uint16(len(s.ID)))
		be.PutUint16(fixed[14:], uint16(len(s.Name)))
		be.PutUint32(fixed[16:], s.DateSec)
		be.PutUint32(fixed[20:], s.DateNsec)
		be.PutUint64(fixed[24:], s.VMClockNsec)
		if s.VMStateSize <= math.MaxUint32 {
			// A larger state is recorded in the extra data only:
			// readers of the 32-bit field then see a disk-only
			// snapshot rather than a truncated state (QEMU's rule).
			be.PutUint32(fixed[32:], uint32(s.VMStateSize))
		}
		be.PutUint32(fixed[36:], uint32(len(s.Extra)))
		out = append(out, fixed[:]...)
		extra := append([]byte(nil), s.Extra...)
		if len(extra) >= extraVMStateEnd {
			be.PutUint64(extra[0:], s.VMStateSize)
		}
		if len(extra) >= extraDiskEnd {
			be.PutUint64(extra[8:], s.DiskSize)
		}
		if len(extra) >= extraIcountEnd {
			be.PutUint64(extra[16:], uint64(s.Icount))
		}
		out = append(out, extra...)
		out = append(out, s.ID...)
		out = append(out, s.Name...)
		if len(out) > maxSnapshotsBytes {
			return nil, fmt.Errorf("marshal snapshot table: more than %d bytes", maxSnapshotsBytes)
		}
	}
	for len(out)%8 != 0 {
		out = append(out, 0)
	}
	return out, nil
}
