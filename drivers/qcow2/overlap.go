package qcow2

import (
	"encoding/binary"
	"fmt"
	"slices"

	"imgfuse/coroutine"
	"imgfuse/drivers"
)

// Overlap checks (QEMU's qcow2_check_metadata_overlap with its default
// overlap-check=cached): before any write to the image file, the range is
// compared with every piece of metadata whose location is known without
// reading the file. A damaged image (a refcount of 0 for a table, a
// refcount block placed on a table, an L2 entry pointing into metadata)
// would otherwise have guest data or other metadata written over its
// tables; the check turns that into an ErrCorrupt error and the corrupt
// bit (checkWriteLocked).

// metaKind names one kind of metadata (QEMU's QCow2MetadataOverlap); a
// set of them is or-ed together.
type metaKind uint16

const (
	olHeader metaKind = 1 << iota
	olActiveL1
	olActiveL2
	olRefcountTable
	olRefcountBlock
	olSnapshotTable
	olInactiveL1
)

var metaNames = [...]string{"the header", "the active L1 table", "an active L2 table", "the refcount table",
	"a refcount block", "the snapshot table", "an inactive L1 table"}

func (k metaKind) String() string {
	for i, name := range metaNames {
		if k&(1<<i) != 0 {
			return name
		}
	}
	return "no metadata"
}

// overlapping returns the first kind of metadata outside ign that
// [off, off+n) of the image file overlaps, and where that metadata
// starts; 0 if none. The caller holds mu. The cost is constant for the
// header and the tables the header locates, one step per snapshot, and a
// binary search each in the sorted offsets of the active L2 tables and of
// the refcount blocks: in-place writes pay well under a microsecond.
func (img *image) overlapping(off, n int64, ign metaKind) (metaKind, int64) {
	if n <= 0 {
		return 0, 0
	}
	hit := func(start, length int64) bool { return length > 0 && off < start+length && start < off+n }
	h := img.h
	cs := img.clusterSize
	switch {
	case ign&olHeader == 0 && hit(0, cs):
		return olHeader, 0
	case ign&olActiveL1 == 0 && hit(int64(h.L1Offset), int64(h.L1Size)*8):
		return olActiveL1, int64(h.L1Offset)
	case ign&olRefcountTable == 0 && hit(int64(h.ReftableOffset), int64(h.ReftableClusters)<<img.clusterBits):
		return olRefcountTable, int64(h.ReftableOffset)
	case ign&olSnapshotTable == 0 && hit(int64(h.SnapshotsOffset), img.snapTableBytes):
		return olSnapshotTable, int64(h.SnapshotsOffset)
	}
	if ign&olInactiveL1 == 0 {
		for i := range img.snaps {
			s := &img.snaps[i]
			if hit(int64(s.L1Offset), int64(s.L1Size)*8) {
				return olInactiveL1, int64(s.L1Offset)
			}
		}
	}
	if ign&olActiveL2 == 0 {
		if at, ok := clusterHit(img.l2Set, off, n, cs); ok {
			return olActiveL2, at
		}
	}
	if ign&olRefcountBlock == 0 {
		blocks := img.roBlocks
		if img.rc != nil {
			blocks = img.rc.blockSet()
		}
		if at, ok := clusterHit(blocks, off, n, cs); ok {
			return olRefcountBlock, at
		}
	}
	return 0, 0
}

// clusterHit reports whether one of the clusters starting at the sorted
// offsets set overlaps [off, off+n), and which.
func clusterHit(set []int64, off, n, cs int64) (int64, bool) {
	// The first cluster ending after off.
	i, _ := slices.BinarySearch(set, off-cs+1)
	if i < len(set) && set[i] < off+n {
		return set[i], true
	}
	return 0, false
}

// checkWriteLocked is the overlap check every write to the image file
// passes (data, L2 tables, refcount blocks, L1 and refcount table
// entries, new tables, header fields): ign are the kinds of metadata the
// write is allowed to hit (the kind it writes). On a hit the image is
// marked corrupt (signalCorruptionLocked: no further writes) and the
// error wraps drivers.ErrCorrupt, which the mount reports as EIO.
func (img *image) checkWriteLocked(co *coroutine.Co, off, n int64, ign metaKind) error {
	img.mu.AssertHeld(co)
	k, at := img.overlapping(off, n, ign)
	if k == 0 {
		return nil
	}
	err := fmt.Errorf("preventing invalid write of [%#x, +%#x) on metadata (overlaps with %s at %#x): %w", off, n, k, at, drivers.ErrCorrupt)
	return img.signalCorruptionLocked(co, err)
}

// checkReadLocked is the overlap check of a data read from the image
// file, run by ReadAt on every run it maps (once per run, not per
// cluster): a host range that overlaps metadata the image knows
// (overlapping, plus the L2 table the run was mapped from) holds no
// guest data. QEMU reads such a range and returns the table's bytes as
// data; here the read fails instead, so a damaged L2 entry (a table
// pointing at itself, at the L1 table, at the header) never shows
// metadata as guest bytes.
//
// A run whose first byte reads metadata fails with an error wrapping
// drivers.ErrCorrupt; a run that reaches metadata further on is cut
// before it (on entry run maps guest pos; on exit run.n may be
// shorter), so the clusters before the damage still read, as mapLocked
// does for damage it meets further on. The first hit of an open image
// is logged; on a writable image it also marks the image corrupt
// (signalCorruptionLocked): its mapping sends guest data into metadata,
// which a later write would overwrite or a later allocation reuse.
// Reads go on.
//
// Clusters of an external data file live in another file and are not
// checked; a backing layer checks its own reads.
func (img *image) checkReadLocked(co *coroutine.Co, run *hostRun, pos int64) error {
	img.mu.AssertHeld(co)
	var off, n int64
	switch run.typ {
	case ctNormal:
		if img.extData {
			return nil
		}
		off, n = run.host, run.n
	case ctCompressed:
		off, n = img.compressedRange(run.l2e)
	default:
		return nil
	}
	if !img.readMeta {
		if err := img.readMetaLocked(co); err != nil {
			return err
		}
	}
	cs := img.clusterSize
	for {
		k, at := img.overlapping(off, n, 0)
		if k == 0 && run.l2Off != 0 && off < run.l2Off+cs && run.l2Off < off+n {
			// Always known, even when l2Set is not (an L1 table
			// read in pieces).
			k, at = olActiveL2, run.l2Off
		}
		if k == 0 {
			break
		}
		if at > off && run.typ == ctNormal {
			n = at - off // host and guest bytes correspond one to one
			continue
		}
		err := fmt.Errorf("L2 table at %#x maps guest %#x to host [%#x, +%#x), which overlaps %s at %#x, not guest data: %w",
			run.l2Off, pos, off, n, k, at, drivers.ErrCorrupt)
		if !img.readHitLogged && img.logf != nil {
			img.readHitLogged = true
			img.logf("%v (reads of such ranges fail with EIO; logged once)", img.named(err))
		}
		if img.writable {
			return img.signalCorruptionLocked(co, err)
		}
		return err
	}
	if run.typ == ctNormal {
		run.n = n
	}
	return nil
}

// readReftableMax bounds the refcount table a read-only image reads for
// the read-side overlap check (one read, on the first checked data
// read): 1 MiB lists 131072 refcount blocks, which cover 256 TiB of
// image file with 64 KiB clusters and 16 GiB with 512-byte ones. A
// larger table is not read, and its blocks are not checked.
const readReftableMax = 1 << 20

// readMetaLocked puts in place what the read-side overlap check of a
// read-only image needs beyond the header: the sorted offsets of the L2
// tables of its L1 table (when read whole at open; a table read in
// pieces is not walked, see checkReadLocked) and of its refcount blocks
// (the reftable read once, through a 64 KiB buffer, its offsets kept).
// A writable image has both already (l2Set, rc.blockSet). A reftable
// that cannot be read fails the read, and is tried again by the next.
func (img *image) readMetaLocked(co *coroutine.Co) error {
	img.mu.AssertHeld(co)
	if img.rc != nil {
		img.readMeta = true
		return nil
	}
	if img.l1 != nil && img.l2Set == nil {
		img.l2Set = buildL2Set(img.l1)
	}
	rtOff := int64(img.h.ReftableOffset)
	rtBytes := int64(img.h.ReftableClusters) << img.clusterBits
	// Past the end of the file the table reads as zeros: no blocks.
	rtBytes = min(rtBytes, max(img.fileSize-rtOff, 0))
	var blocks []int64
	if rtBytes > 0 && rtBytes <= readReftableMax {
		buf := make([]byte, min(rtBytes, 64<<10))
		for i := int64(0); i < rtBytes; i += int64(len(buf)) {
			p := buf[:min(int64(len(buf)), rtBytes-i)]
			if err := img.file.PreadCo(co, p, rtOff+i); err != nil {
				return fmt.Errorf("reading the refcount table at %#x: %w", rtOff, err)
			}
			for j := 0; j+8 <= len(p); j += 8 {
				if b := int64(binary.BigEndian.Uint64(p[j:]) & reftOffsetMask); b != 0 {
					blocks = append(blocks, b)
				}
			}
		}
		slices.Sort(blocks)
	}
	img.roBlocks = blocks
	img.readMeta = true
	return nil
}

// guardLocked is checkWriteLocked for the writes of cached tables and
// refcount structures: once the image is marked corrupt they are refused
// as well, so nothing is written back over a damaged image.
func (img *image) guardLocked(co *coroutine.Co, off, n int64, ign metaKind) error {
	img.mu.AssertHeld(co)
	if img.broken != nil {
		return img.broken
	}
	return img.checkWriteLocked(co, off, n, ign)
}

// buildL2Set lists the L2 table offsets of the active L1 table, sorted, with
// duplicates (a damaged L1 may name a table twice). Built for a writable
// image; kept up to date by setL1Locked.
func buildL2Set(l1 []uint64) []int64 {
	var set []int64
	for _, e := range l1 {
		if off := int64(e & l1eOffsetMask); off != 0 {
			set = append(set, off)
		}
	}
	slices.Sort(set)
	return set
}

// setL1Locked records L1 entry i as e in memory and in the L2 set.
func (img *image) setL1Locked(co *coroutine.Co, i int64, e uint64) {
	img.mu.AssertHeld(co)
	if old := int64(img.l1[i] & l1eOffsetMask); old != 0 {
		if j, ok := slices.BinarySearch(img.l2Set, old); ok {
			img.l2Set = slices.Delete(img.l2Set, j, j+1)
		}
	}
	if off := int64(e & l1eOffsetMask); off != 0 {
		j, _ := slices.BinarySearch(img.l2Set, off)
		img.l2Set = slices.Insert(img.l2Set, j, off)
	}
	img.l1[i] = e
	img.l2Tables.Store(int64(len(img.l2Set)))
}

// snapshotTableBytes is the size of the snapshot table that snaps were
// read from: each entry 8-aligned, 40 bytes plus extra data, id and name.
func snapshotTableBytes(snaps []snapshotEntry) int64 {
	var n int64
	for i := range snaps {
		n = (n + 7) &^ 7
		n += snapshotHeaderLen + int64(len(snaps[i].Extra)+len(snaps[i].ID)+len(snaps[i].Name))
	}
	return n
}

// blockSet returns the refcount block offsets of the reftable, sorted,
// rebuilt after the reftable changed. The caller holds mu.
func (r *refcounts) blockSet() []int64 {
	if r.blocksStale {
		r.blocks = r.blocks[:0]
		for _, e := range r.reftable {
			if off := int64(e & reftOffsetMask); off != 0 {
				r.blocks = append(r.blocks, off)
			}
		}
		slices.Sort(r.blocks)
		r.blocksStale = false
	}
	return r.blocks
}
