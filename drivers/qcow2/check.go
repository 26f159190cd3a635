package qcow2

import (
	"encoding/binary"
	"fmt"

	"imgfuse/coroutine"
	"imgfuse/drivers"
)

// Consistency check and refcount rebuild (qcow2.md §1.14; QEMU's
// qcow2_check_refcounts, calculate_refcounts, compare_refcounts,
// check_oflag_copied and rebuild_refcount_structure).
//
// The checker counts, in memory, the references to every host cluster that
// the image's metadata makes, and compares them with the stored refcounts:
// a stored refcount below the references is a corruption (the cluster
// could be handed out again while in use), one above is a leak (space lost,
// nothing else).

// maxCheckMessages bounds the messages a check keeps: qemu-img check
// prints one per leaked or damaged cluster, and so does imgfuse check up
// to this many (a few MiB of memory), however many a hostile image has.
const maxCheckMessages = 1 << 16

// checkResult is the outcome of a check, counted as qemu-img check does.
type checkResult struct {
	Corruptions, Leaks int
	// Undercounted counts the clusters whose stored refcount is below
	// their references (included in Corruptions): the ones an allocator
	// could hand out while in use.
	Undercounted int
	// Errors holds the first maxCheckMessages messages.
	Errors []string
	// ImageEnd is the end of the last cluster in use or referenced.
	ImageEnd int64
}

func (res *checkResult) corruption(format string, args ...any) {
	res.Corruptions++
	res.note(format, args...)
}

func (res *checkResult) leak(format string, args ...any) {
	res.Leaks++
	res.note(format, args...)
}

func (res *checkResult) note(format string, args ...any) {
	if len(res.Errors) < maxCheckMessages {
		res.Errors = append(res.Errors, fmt.Sprintf(format, args...))
	}
}

// refcountCalc is the result of computeRefcounts.
type refcountCalc struct {
	// counts[i] is the number of references to host cluster i. Its
	// length covers the file, and any reference less than a cluster
	// past its end.
	counts []uint64
	// res holds the corruptions found while walking the metadata.
	res checkResult
	// rebuild: the refcount structure itself is damaged (QEMU then
	// rebuilds it rather than fixing single refcounts).
	rebuild bool
}

// refWalker walks an image's metadata, counting references.
type refWalker struct {
	read func(off int64, p []byte) error
	h    *header
	// f decodes L2 entries as the image does (the walker may have no
	// image: a header is enough).
	f        l2Format
	cb       uint32
	cs       int64
	fileSize int64
	c        *refcountCalc
}

// inc counts one reference to every cluster touching [off, off+size).
// Like QEMU it tolerates a range ending less than a cluster past the end
// of the file (the last cluster may be partly written); a range reaching
// further is a corruption and is not counted.
func (w *refWalker) inc(off, size int64) {
	if size <= 0 {
		return
	}
	if off < 0 || off > maxHostClusterOffset || size > maxHostClusterOffset || off+size-w.fileSize >= w.cs {
		w.c.res.corruption("ERROR: reference to [%#x, +%#x) exceeds the end of the file (%d bytes) by a cluster or more",
			off, size, w.fileSize)
		return
	}
	first, last := off>>w.cb, (off+size-1)>>w.cb
	for int64(len(w.c.counts)) <= last {
		w.c.counts = append(w.c.counts, 0)
	}
	for i := first; i <= last; i++ {
		w.c.counts[i]++
	}
}

// computeRefcounts counts the references of the image described by h to
// each host cluster of its file: the header cluster; the active L1 table,
// its L2 tables and their data and compressed clusters (every host cluster
// a compressed stream touches; no data cluster of an external data file);
// every snapshot's L1, L2 tables and data; the snapshot table; the
// reftable and the refcount blocks; the encryption header; the bitmap
// directory, tables and data. read fills p from the image file at off,
// zeros past its end; it may be a PreadCo closure over the calling
// coroutine. fileSize is the image file's size, snaps the snapshot table.
//
// Corruptions found on the way (reserved bits, unaligned offsets,
// references past the end of the file, invalid compressed or subcluster
// entries) are counted in the result; only read errors fail the walk.
func computeRefcounts(read func(off int64, p []byte) error, h *header, fileSize int64, snaps []snapshotEntry) (*refcountCalc, error) {
	return walkRefcounts(read, h, fileSize, snaps, true)
}

// walkRefcounts is computeRefcounts, leaving out the refcount structure
// (reftable and blocks) unless withRefcounts is set.
func walkRefcounts(read func(off int64, p []byte) error, h *header, fileSize int64, snaps []snapshotEntry, withRefcounts bool) (*refcountCalc, error) {
	cs := h.clusterSize()
	w := &refWalker{read: read, h: h, f: newL2Format(h), cb: h.ClusterBits, cs: cs, fileSize: fileSize, c: &refcountCalc{}}
	w.c.counts = make([]uint64, (fileSize+cs-1)/cs)

	w.inc(0, cs)
	if err := w.l1(h.L1Offset, h.L1Size, "active"); err != nil {
		return nil, err
	}
	if h.hasDataFile() && len(snaps) > 0 {
		w.c.res.corruption("ERROR %d snapshots in an image with an external data file", len(snaps))
	}
	var snapBytes int64
	for i := range snaps {
		s := &snaps[i]
		if err := w.l1(s.L1Offset, s.L1Size, fmt.Sprintf("snapshot %q", s.ID)); err != nil {
			return nil, err
		}
		snapBytes = (snapBytes + 7) &^ 7
		snapBytes += snapshotHeaderLen + int64(len(s.Extra)) + int64(len(s.ID)) + int64(len(s.Name))
	}
	w.inc(int64(h.SnapshotsOffset), snapBytes)
	if withRefcounts {
		w.inc(int64(h.ReftableOffset), int64(h.ReftableClusters)<<w.cb)
	}
	if h.HasCrypto {
		w.inc(int64(h.CryptoOffset), int64(h.CryptoLength))
	}
	if h.HasBitmaps && h.Autoclear&autoclearBitmaps != 0 {
		if err := w.bitmaps(); err != nil {
			return nil, err
		}
	}
	if withRefcounts {
		if err := w.refblocks(); err != nil {
			return nil, err
		}
	}
	return w.c, nil
}

// l1 counts an L1 table of n entries at off, its L2 tables and their
// clusters.
func (w *refWalker) l1(off uint64, n uint32, what string) error {
	size := int64(n) * 8
	if size > maxL1Bytes || off&uint64(w.cs-1) != 0 || off > maxHostClusterOffset {
		w.c.res.corruption("ERROR %s L1 table at %#x (%d entries) is invalid", what, off, n)
		return nil
	}
	if n == 0 {
		return nil
	}
	w.inc(int64(off), size)
	buf := make([]byte, size)
	if err := w.read(int64(off), buf); err != nil {
		return fmt.Errorf("check: reading %s L1 table at %#x: %w", what, off, err)
	}
	l2 := make([]byte, w.cs)
	for i := range int64(n) {
		e := binary.BigEndian.Uint64(buf[i*8:])
		if e&l1eReservedMask != 0 {
			w.c.res.corruption("ERROR found L1 entry with reserved bits set: %#x", e)
		}
		l2Off := int64(e & l1eOffsetMask)
		if l2Off == 0 {
			continue
		}
		w.inc(l2Off, w.cs)
		if l2Off&(w.cs-1) != 0 {
			w.c.res.corruption("ERROR l2_offset=%#x: Table is not cluster aligned; L1 entry corrupted", l2Off)
			continue
		}
		if err := w.read(l2Off, l2); err != nil {
			return fmt.Errorf("check: reading L2 table at %#x: %w", l2Off, err)
		}
		s := w.f.tableSlice(i, l2Off, l2)
		w.l2(&s)
	}
	return nil
}

// l2 counts the clusters an L2 table references.
func (w *refWalker) l2(s *l2Slice) {
	h := w.h
	extL2 := h.extendedL2()
	for i := range s.n {
		e, bitmap := s.entry(i)
		if e&oflagCompressed != 0 {
			coff, csize := w.f.compressedRange(e)
			if e&oflagCopied != 0 {
				w.c.res.corruption("ERROR: coffset=%#x: copied flag must never be set for compressed clusters", coff)
			}
			if h.hasDataFile() {
				w.c.res.corruption("ERROR compressed cluster with data file, entry=%#x", e)
				continue
			}
			if bitmap != 0 {
				w.c.res.corruption("ERROR compressed cluster with non-zero subcluster allocation bitmap, entry=%#x", e)
				continue
			}
			w.inc(coff, csize)
			continue
		}
		if e&l2eStdReservedMk != 0 {
			w.c.res.corruption("ERROR L2 entry %#x has reserved bits set", e)
		}
		if e&oflagZero != 0 && (extL2 || h.Version < 3) {
			w.c.res.corruption("ERROR L2 entry %#x has the zero flag, invalid in this image", e)
		}
		host := int64(e & l2eOffsetMask)
		allocated := host != 0 || h.hasDataFile() && e&oflagCopied != 0
		if !allocated {
			if extL2 && uint32(bitmap) != 0 {
				w.c.res.corruption("ERROR: Unallocated cluster has non-zero subcluster allocation map %#x", bitmap)
			}
			continue
		}
		if extL2 && uint32(bitmap)&uint32(bitmap>>32) != 0 {
			w.c.res.corruption("ERROR offset=%#x: Allocated cluster has corrupted subcluster allocation bitmap", host)
		}
		if host&(w.cs-1) != 0 {
			w.c.res.corruption("ERROR offset=%#x: Data cluster is not properly aligned; L2 entry corrupted", host)
		}
		if h.hasDataFile() {
			continue // data clusters of an external file are not refcounted
		}
		w.inc(host, w.cs)
	}
}

// refblocks counts the refcount blocks, after everything else (so a block
// shared with other metadata shows as a refcount of 2).
func (w *refWalker) refblocks() error {
	n := int64(w.h.ReftableClusters) << w.cb
	if n > maxReftableBytes {
		w.c.res.corruption("ERROR refcount table of %d clusters is too large", w.h.ReftableClusters)
		w.c.rebuild = true
		return nil
	}
	buf := make([]byte, n)
	if err := w.read(int64(w.h.ReftableOffset), buf); err != nil {
		return fmt.Errorf("check: reading the refcount table: %w", err)
	}
	nbClusters := (w.fileSize + w.cs - 1) / w.cs
	for i := range n / 8 {
		e := binary.BigEndian.Uint64(buf[i*8:])
		if e&^reftOffsetMask != 0 {
			w.c.res.corruption("ERROR refcount table entry %d has reserved bits set", i)
			w.c.rebuild = true
			continue
		}
		if e == 0 {
			continue
		}
		if e&uint64(w.cs-1) != 0 {
			w.c.res.corruption("ERROR refcount block %d is not cluster aligned; refcount table entry corrupted", i)
			w.c.rebuild = true
			continue
		}
		cl := int64(e >> w.cb)
		if cl >= nbClusters {
			w.c.res.corruption("ERROR refcount block %d is outside image", i)
			w.c.rebuild = true
			continue
		}
		w.inc(int64(e), w.cs)
		if w.c.counts[cl] != 1 {
			w.c.res.corruption("ERROR refcount block %d refcount=%d", i, w.c.counts[cl])
			w.c.rebuild = true
		}
	}
	return nil
}

// bitmaps counts the persistent dirty bitmaps: the directory, each
// bitmap's table and the data clusters it lists.
func (w *refWalker) bitmaps() error {
	h := w.h
	dirOff, dirSize := int64(h.BitmapDirOffset), int64(h.BitmapDirSize)
	// QEMU bounds the directory at 64 KiB entries of at most ~1 KiB.
	if dirSize <= 0 || dirSize > 64<<20 || dirOff&(w.cs-1) != 0 || dirOff > maxHostClusterOffset {
		w.c.res.corruption("ERROR bitmap directory at %#x (%d bytes) is invalid", dirOff, dirSize)
		return nil
	}
	w.inc(dirOff, dirSize)
	dir := make([]byte, dirSize)
	if err := w.read(dirOff, dir); err != nil {
		return fmt.Errorf("check: reading the bitmap directory: %w", err)
	}
	const entryLen = 24 // fixed part of a directory entry
	for p, k := int64(0), uint32(0); k < h.NbBitmaps; k++ {
		if p+entryLen > dirSize {
			w.c.res.corruption("ERROR bitmap directory entry %d runs past the directory", k)
			return nil
		}
		tOff := int64(binary.BigEndian.Uint64(dir[p:]))
		tSize := int64(binary.BigEndian.Uint32(dir[p+8:]))
		nameLen := int64(binary.BigEndian.Uint16(dir[p+18:]))
		extraLen := int64(binary.BigEndian.Uint32(dir[p+20:]))
		p += (entryLen + extraLen + nameLen + 7) &^ 7
		if tOff&(w.cs-1) != 0 || tOff < 0 || tOff > maxHostClusterOffset || tSize*8 > 64<<20 {
			w.c.res.corruption("ERROR bitmap table of bitmap %d at %#x (%d entries) is invalid", k, tOff, tSize)
			continue
		}
		if tSize == 0 {
			continue
		}
		w.inc(tOff, tSize*8)
		tb := make([]byte, tSize*8)
		if err := w.read(tOff, tb); err != nil {
			return fmt.Errorf("check: reading bitmap table at %#x: %w", tOff, err)
		}
		for j := int64(0); j < tSize; j++ {
			e := binary.BigEndian.Uint64(tb[j*8:])
			off := int64(e & l1eOffsetMask)
			if off == 0 {
				continue
			}
			if off&(w.cs-1) != 0 {
				w.c.res.corruption("ERROR bitmap data cluster at %#x is not aligned", off)
				continue
			}
			w.inc(off, w.cs)
		}
	}
	return nil
}

// checkLocked checks the image: the references computed from the metadata
// on disk (after writing back the L2 cache, so it is current) against the
// stored refcounts, then the COPIED flags of the active L1 and L2 tables
// against the stored refcounts. read is as for computeRefcounts; snaps is
// the snapshot table. Nothing is repaired.
func (r *refcounts) checkLocked(co *coroutine.Co, read func(off int64, p []byte) error, snaps []snapshotEntry) (checkResult, error) {
	r.mu.AssertHeld(co)
	if r.l2 != nil {
		if err := r.l2.Write(co); err != nil {
			return checkResult{}, err
		}
	}
	fileSize, err := r.file.Size()
	if err != nil {
		return checkResult{}, err
	}
	calc, err := computeRefcounts(read, r.h, fileSize, snaps)
	if err != nil {
		return checkResult{}, err
	}
	res := calc.res
	var highest int64 = -1
	for i, want := range calc.counts {
		got, err := r.getLocked(co, int64(i))
		if err != nil {
			res.corruption("ERROR cannot get refcount of cluster %d: %v", i, err)
			continue
		}
		if got > 0 || want > 0 {
			highest = int64(i)
		}
		switch {
		case got < want:
			res.Undercounted++
			res.corruption("ERROR cluster %d refcount=%d reference=%d", i, got, want)
		case got > want:
			res.leak("Leaked cluster %d refcount=%d reference=%d", i, got, want)
		}
	}
	res.ImageEnd = (highest + 1) << r.clusterBits
	if err := r.checkCopiedLocked(co, read, &res); err != nil {
		return res, err
	}
	return res, nil
}

// checkCopiedLocked reports every active L1 or L2 entry whose COPIED flag
// disagrees with (stored refcount == 1) (QEMU's check_oflag_copied).
func (r *refcounts) checkCopiedLocked(co *coroutine.Co, read func(off int64, p []byte) error, res *checkResult) error {
	r.mu.AssertHeld(co)
	h := r.h
	n := int64(h.L1Size)
	if n*8 > maxL1Bytes || h.L1Offset&uint64(r.clusterSize-1) != 0 || n == 0 {
		return nil // reported by the walk
	}
	l1 := make([]byte, n*8)
	if err := read(int64(h.L1Offset), l1); err != nil {
		return fmt.Errorf("check: reading the L1 table: %w", err)
	}
	f := newL2Format(h)
	tb := make([]byte, r.clusterSize)
	for i := range n {
		e := binary.BigEndian.Uint64(l1[i*8:])
		l2Off := int64(e & l1eOffsetMask)
		if l2Off == 0 || l2Off&(r.clusterSize-1) != 0 {
			continue
		}
		rc, err := r.getLocked(co, l2Off>>r.clusterBits)
		if err != nil {
			continue // reported by the comparison
		}
		if (rc == 1) != (e&oflagCopied != 0) {
			res.corruption("ERROR OFLAG_COPIED L2 cluster: l1_index=%d l1_entry=%x refcount=%d", i, e, rc)
		}
		if err := read(l2Off, tb); err != nil {
			return fmt.Errorf("check: reading L2 table at %#x: %w", l2Off, err)
		}
		s := f.tableSlice(i, l2Off, tb)
		for j := range s.n {
			le, _ := s.entry(j)
			if le&oflagCompressed != 0 {
				continue
			}
			host := int64(le & l2eOffsetMask)
			var rc uint64 = 1
			if h.hasDataFile() {
				if host == 0 && le&oflagCopied == 0 {
					continue
				}
			} else {
				if host == 0 || host&(r.clusterSize-1) != 0 {
					continue
				}
				if rc, err = r.getLocked(co, host>>r.clusterBits); err != nil {
					continue
				}
			}
			if (rc == 1) != (le&oflagCopied != 0) {
				res.corruption("ERROR OFLAG_COPIED data cluster: l2_entry=%x refcount=%d", le, rc)
			}
		}
	}
	return nil
}

// rebuildLocked replaces the refcount structure with one built from the
// references alone (QEMU's rebuild_refcount_structure, run when a dirty
// image is opened read-write): it counts the references of every table
// (computeRefcounts without the old reftable and blocks), lays out new
// refcount blocks covering the whole file and a new reftable past the end
// of everything in use, writes and syncs them, then points the header at
// the new table (bytes 48-59, one 12-byte sync write). Until that write the
// old structure is intact; after it the old reftable and blocks are
// referenced by nothing and have refcount 0: free space.
//
// The L2 cache is written back first (the walk reads tables from disk) and
// the refcount cache is emptied. If the walk found corruptions the new
// refcounts count every valid reference, and the error returned wraps
// drivers.ErrCorrupt (the caller should keep the dirty bit, or set the
// corrupt bit): the image needs a real repair. COPIED flags are not
// changed.
func (r *refcounts) rebuildLocked(co *coroutine.Co, read func(off int64, p []byte) error, snaps []snapshotEntry) error {
	r.mu.AssertHeld(co)
	if r.l2 != nil {
		if err := r.l2.Write(co); err != nil {
			return err
		}
	}
	// The old blocks are about to be dropped: writing them back first is
	// harmless and lets Invalidate empty the cache.
	if err := r.cache.Write(co); err != nil {
		return err
	}
	if err := r.cache.Invalidate(); err != nil {
		return err
	}
	fileSize, err := r.file.Size()
	if err != nil {
		return err
	}
	calc, err := walkRefcounts(read, r.h, fileSize, snaps, false)
	if err != nil {
		return err
	}
	counts := calc.counts

	cs := r.clusterSize
	perBlock := int64(1) << r.blockBits
	// Past everything referenced, the end of the file, and anything
	// allocated: the old structure stays untouched until the switch.
	start := max(int64(len(counts)), (max(fileSize, r.end)+cs-1)/cs)
	total, tableEntries, endCluster, err := r.areaLayout(start, 0, 0)
	if err != nil {
		return err
	}
	for int64(len(counts)) < endCluster {
		counts = append(counts, 0)
	}
	for c := start; c < endCluster; c++ {
		counts[c] = 1
	}
	for i, v := range counts {
		if v > r.max {
			calc.res.corruption("ERROR cluster %d has %d references, more than refcount_bits %d can count", i, v, 1<<r.order)
			counts[i] = r.max
		}
	}

	// Write the blocks, contiguous from start, in chunks of about 1 MiB.
	chunk := max(1, (1<<20)/cs)
	buf := make([]byte, min(chunk, total)*cs)
	for b := int64(0); b < total; b += chunk {
		nb := min(chunk, total-b)
		p := buf[:nb*cs]
		clear(p)
		for k := range nb {
			blk := p[k*cs : (k+1)*cs]
			base := (b + k) * perBlock
			for j := range perBlock {
				if base+j >= int64(len(counts)) {
					break
				}
				if v := counts[base+j]; v != 0 {
					setRefcount(blk, r.order, j, v)
				}
			}
		}
		// Checked like every metadata write. The old refcount blocks
		// are being replaced (the cache was emptied, they are read no
		// more), so landing on one is no overlap; anything else is.
		if err := r.check(co, (start+b)*cs, nb*cs, olRefcountBlock); err != nil {
			return fmt.Errorf("rebuild: writing refcount blocks: %w", err)
		}
		if err := r.file.PwriteCo(co, p, (start+b)*cs); err != nil {
			return fmt.Errorf("rebuild: writing refcount blocks: %w", err)
		}
	}
	if err := r.file.FdatasyncCo(co); err != nil {
		return err
	}
	table := make([]uint64, tableEntries)
	for i := range total {
		table[i] = uint64((start + i) * cs)
	}
	if err := r.switchReftableLocked(co, table, (start+total)*cs); err != nil {
		return err
	}
	r.freeClusterIndex = 0
	r.end = max(r.end, endCluster*cs)
	if calc.res.Corruptions > 0 {
		return fmt.Errorf("rebuild: %d corruptions in the image metadata (first: %s): %w",
			calc.res.Corruptions, calc.res.Errors[0], drivers.ErrCorrupt)
	}
	return nil
}
