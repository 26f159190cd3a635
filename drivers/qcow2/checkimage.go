package qcow2

import (
	"fmt"
	"slices"
	"strings"

	"imgfuse/coroutine"
	"imgfuse/drivers"
)

// The drivers.Checker capability: `imgfuse check` (qemu-img check). The
// counting is check.go's; this file adds what the command needs around
// it: a check of an image opened read-only, progress, block statistics,
// and the repairs of qemu-img check -r leaks|all.

var _ drivers.Checker = (*image)(nil)

// Check implements drivers.Checker. It must not be called from a
// coroutine, nor with requests in flight.
func (img *image) Check(mode drivers.CheckMode, progress func(done, total int64)) (_ drivers.CheckResult, err error) {
	defer img.nameErr(&err)
	var res drivers.CheckResult
	if img.snapshot != nil {
		return res, fmt.Errorf("check: opened on a snapshot: %w", drivers.ErrUnsupported)
	}
	if mode != drivers.CheckOnly && !img.writable {
		return res, img.readOnly("repair")
	}
	if img.l1Short {
		// The walk would read the missing entries as zeros and report
		// the clusters they map as leaked, or a clean image: the check
		// cannot be run, as when such an image could not be opened.
		res.CheckErrors++
		return res, fmt.Errorf("check: %w", l1PastEOF("L1 table", uint64(img.l1Off), img.l1Size*8, img.fileSize))
	}
	coroutine.Run(func(co *coroutine.Co) {
		img.mu.Lock(co)
		defer img.mu.Unlock(co)
		res, err = img.checkLocked(co, mode, progress)
	})
	return res, err
}

func (img *image) checkLocked(co *coroutine.Co, mode drivers.CheckMode, progress func(done, total int64)) (drivers.CheckResult, error) {
	img.mu.AssertHeld(co)
	var res drivers.CheckResult
	rc := img.rc
	if rc == nil {
		var err error
		if rc, err = openRefcounts(co, img.file, img.h, img.fileSize, nil); err != nil {
			res.CheckErrors++
			return res, fmt.Errorf("check: %w", err)
		}
		rc.mu = &img.mu
	}
	read := img.progressReader(co, progress)
	r, err := rc.checkLocked(co, read, img.snaps)
	if err != nil {
		res.CheckErrors++
		return res, fmt.Errorf("check: %w", err)
	}
	res.Messages = r.Errors
	if mode != drivers.CheckOnly && (r.Leaks > 0 || r.Corruptions > 0) {
		// QEMU checks the COPIED flags after fixing the refcounts, so
		// the first pass's verdicts on them are not what it prints: -r
		// all repairs (and names) what is still wrong, -r leaks names it
		// from the state after the fixes (the check below).
		res.Messages = withoutCopiedFlags(r.Errors)
		note := func(m string) {
			if len(res.Messages) < 2*maxCheckMessages {
				res.Messages = append(res.Messages, m)
			}
		}
		fixedLeaks, fixedCorrupt, err := img.repairCheckedLocked(co, mode, read, note)
		if err != nil {
			res.CheckErrors++
			return res, fmt.Errorf("repair: %w", err)
		}
		if r, err = rc.checkLocked(co, read, img.snaps); err != nil {
			res.CheckErrors++
			return res, fmt.Errorf("check after repair: %w", err)
		}
		res.LeaksFixed, res.CorruptionsFixed = fixedLeaks, fixedCorrupt
		if mode != drivers.RepairAll {
			res.Messages = append(res.Messages, copiedFlags(r.Errors)...)
		}
		res.Messages = append(res.Messages, r.Errors...)
	}
	res.Corruptions, res.Leaks = r.Corruptions, r.Leaks
	// A repaired image without corruptions is consistent again (QEMU's
	// qcow2_mark_clean and qcow2_mark_consistent): the dirty bit of a
	// crashed lazy-refcounts image (its refcounts now checked) and the
	// corrupt bit go.
	if mode != drivers.CheckOnly && r.Corruptions == 0 {
		img.staleRefcounts = false
		if bits := img.h.Incompatible &^ (incompatCorrupt | incompatDirty); bits != img.h.Incompatible {
			if err := img.setIncompatibleLocked(co, bits); err != nil {
				res.CheckErrors++
				return res, err
			}
		}
	}
	res.ImageEndOffset = r.ImageEnd
	cs := img.clusterSize
	res.TotalClusters = (img.size.Load() + cs - 1) / cs
	if err := img.blockStats(read, &res); err != nil {
		res.CheckErrors++
		return res, fmt.Errorf("check: %w", err)
	}
	return res, nil
}

// progressReader is a metadata reader for the checker that reports, per
// table read, how many of the L2 table reads of a check were done: each
// active table is read three times (references, COPIED flags, block
// statistics), each snapshot's once (its L1 size is an upper bound).
func (img *image) progressReader(co *coroutine.Co, progress func(done, total int64)) func(off int64, p []byte) error {
	base := func(off int64, p []byte) error { return img.file.PreadCo(co, p, off) }
	if progress == nil {
		return base
	}
	var total int64 = 1
	for _, e := range img.l1 {
		if e&l1eOffsetMask != 0 {
			total += 3
		}
	}
	for i := range img.snaps {
		total += int64(img.snaps[i].L1Size) // an upper bound: entries, not tables
	}
	var done int64
	return func(off int64, p []byte) error {
		if int64(len(p)) == img.clusterSize {
			done++
			progress(min(done, total), total)
		}
		return base(off, p)
	}
}

// blockStats counts the active disk's allocated, fragmented and
// compressed clusters as QEMU's check_refcounts_l2 does (CHECK_FRAG_INFO):
// a cluster is fragmented when it does not follow the previous allocated
// cluster of the same L2 table in the file; compressed clusters always
// are.
func (img *image) blockStats(read func(off int64, p []byte) error, res *drivers.CheckResult) error {
	h := img.h
	cs := img.clusterSize
	tb := make([]byte, cs)
	for i, l1e := range img.l1 {
		l2Off := int64(l1e & l1eOffsetMask)
		if l2Off == 0 || l2Off&(cs-1) != 0 || l2Off >= img.fileSize {
			continue // counted as a corruption by the check
		}
		if err := read(l2Off, tb); err != nil {
			return fmt.Errorf("reading L2 table at %#x: %w", l2Off, err)
		}
		s := img.tableSlice(int64(i), l2Off, tb)
		var next int64
		for j := range s.n {
			e, _ := s.entry(j)
			host := int64(e & l2eOffsetMask)
			switch {
			case e&oflagCompressed != 0:
				res.AllocatedClusters++
				res.CompressedClusters++
				res.FragmentedClusters++
			case e&oflagZero != 0 && !h.extendedL2() && host == 0:
				// a plain zero cluster: nothing allocated
			case host != 0 || h.hasDataFile() && e&oflagCopied != 0:
				res.AllocatedClusters++
				if next != 0 && host != next {
					res.FragmentedClusters++
				}
				next = host + cs
			}
		}
	}
	return nil
}

// repairCheckedLocked repairs what a check found (QEMU's
// qcow2_check_refcounts with BDRV_FIX_LEAKS, and BDRV_FIX_ERRORS for
// RepairAll): refcounts above the references are lowered to them; with
// RepairAll, a damaged refcount structure is rebuilt, refcounts below the
// references are raised to them, and COPIED flags are made to agree with
// the refcounts. It returns the leaks and corruptions fixed.
func (img *image) repairCheckedLocked(co *coroutine.Co, mode drivers.CheckMode, read func(off int64, p []byte) error, note func(string)) (leaks, corruptions int, err error) {
	img.mu.AssertHeld(co)
	rc := img.rc
	if err := img.l2.Write(co); err != nil {
		return 0, 0, err
	}
	fileSize, err := img.file.Size()
	if err != nil {
		return 0, 0, err
	}
	calc, err := computeRefcounts(read, img.h, fileSize, img.snaps)
	if err != nil {
		return 0, 0, err
	}
	// A cluster in use with refcount 0, or a damaged refcount structure,
	// needs a rebuild (QEMU's compare_refcounts sets rebuild), which only
	// -r all may do; -r leaks then fails the check, as qemu-img's does.
	type fix struct {
		cluster   int64
		got, want uint64
	}
	var fixes []fix
	rebuild := calc.rebuild
	under, over := 0, 0
	for i, want := range calc.counts {
		got, err := rc.getLocked(co, int64(i))
		if err != nil || got == want {
			continue // an error is reported by the check
		}
		if got < want {
			under++
			rebuild = rebuild || got == 0
		} else {
			over++
		}
		fixes = append(fixes, fix{int64(i), got, want})
	}
	switch {
	case rebuild && mode != drivers.RepairAll:
		note("ERROR need to rebuild refcount structures") // qemu-img's words
		return 0, 0, fmt.Errorf("the refcount structure needs a rebuild, which only -r all does: %w", drivers.ErrCorrupt)
	case rebuild:
		note("Rebuilding refcount structure")
		// QEMU's rebuild counts the old reftable and blocks as in use
		// and frees them as leaks once the header points at the new
		// table, naming each; here they are free at once, and named
		// the same way.
		old := img.refcountStructureClusters(rc)
		if err := rc.rebuildLocked(co, read, img.snaps); err != nil {
			return 0, 0, err
		}
		for _, c := range old {
			note(fmt.Sprintf("Repairing cluster %d refcount=1 reference=0", c))
		}
		leaks, corruptions = over, under
	default:
		for _, f := range fixes {
			if f.got < f.want && mode != drivers.RepairAll {
				continue
			}
			note(fmt.Sprintf("Repairing cluster %d refcount=%d reference=%d", f.cluster, f.got, f.want))
			if err := rc.updateLocked(co, f.cluster<<img.clusterBits, img.clusterSize, int64(f.want)-int64(f.got)); err != nil {
				return leaks, corruptions, fmt.Errorf("cluster %d: %w", f.cluster, err)
			}
			if f.got < f.want {
				corruptions++
			} else {
				leaks++
			}
		}
	}
	if mode == drivers.RepairAll {
		n, err := img.fixCopiedLocked(co, rc, note)
		corruptions += n
		if err != nil {
			return leaks, corruptions, err
		}
	}
	if err := rc.flushLocked(co); err != nil {
		return leaks, corruptions, err
	}
	return leaks, corruptions, img.file.FdatasyncCo(co)
}

// fixCopiedLocked sets the COPIED flag of every active L1 and L2 entry
// whose cluster has refcount 1 and clears it elsewhere (QEMU's
// check_oflag_copied with BDRV_FIX_ERRORS). It changes the L2 tables
// through the L2 cache, written back at the end, and the L1 entries with
// writeL1EntryLocked: every write passes the overlap check, as every
// other metadata write does, so a table that overlaps other metadata (a
// damaged L1 entry naming the L1 table, say) is not written over it, and
// the image is marked corrupt instead. It returns the entries fixed.
func (img *image) fixCopiedLocked(co *coroutine.Co, rc *refcounts, note func(string)) (int, error) {
	img.mu.AssertHeld(co)
	cs := img.clusterSize
	fixed := 0
	for i := range int64(len(img.l1)) {
		l1e := img.l1[i]
		l2Off := int64(l1e & l1eOffsetMask)
		if l2Off == 0 || l2Off&(cs-1) != 0 || l2Off >= img.fileSize {
			continue
		}
		if r, err := rc.getLocked(co, l2Off>>img.clusterBits); err == nil && (r == 1) != (l1e&oflagCopied != 0) {
			note(fmt.Sprintf("Repairing OFLAG_COPIED L2 cluster: l1_index=%d l1_entry=%x refcount=%d", i, l1e, r))
			if err := img.writeL1EntryLocked(co, i, l1e^oflagCopied); err != nil {
				return fixed, err
			}
			fixed++
		}
		n, err := img.fixCopiedL2Locked(co, rc, i, l2Off, note)
		fixed += n
		if err != nil {
			return fixed, err
		}
	}
	if err := img.l2.Write(co); err != nil {
		return fixed, fmt.Errorf("writing the repaired L2 tables: %w", err)
	}
	return fixed, nil
}

// fixCopiedL2Locked is fixCopiedLocked for the entries of the L2 table of
// L1 entry l1Index, at l2Off.
func (img *image) fixCopiedL2Locked(co *coroutine.Co, rc *refcounts, l1Index, l2Off int64, note func(string)) (int, error) {
	img.mu.AssertHeld(co)
	s, err := img.tableSliceLocked(co, l1Index, l2Off)
	if err != nil {
		return 0, err
	}
	defer s.close()
	fixed := 0
	for j := range s.n {
		e, bitmap := s.entry(j)
		host := int64(e & l2eOffsetMask)
		if e&oflagCompressed != 0 || img.extData || host == 0 || host&(img.clusterSize-1) != 0 {
			continue
		}
		r, err := rc.getLocked(co, host>>img.clusterBits)
		if err != nil || (r == 1) == (e&oflagCopied != 0) {
			continue
		}
		note(fmt.Sprintf("Repairing OFLAG_COPIED data cluster: l2_entry=%x refcount=%d", e, r))
		s.set(j, e^oflagCopied, bitmap)
		fixed++
	}
	return fixed, nil
}

// refcountStructureClusters lists, ascending, the clusters of rc's
// reftable and of the refcount blocks it points at inside the file.
func (img *image) refcountStructureClusters(rc *refcounts) []int64 {
	seen := map[int64]bool{}
	start := int64(img.h.ReftableOffset) >> img.clusterBits
	for c := start; c < start+int64(img.h.ReftableClusters); c++ {
		seen[c] = true
	}
	for _, e := range rc.reftable {
		if off := int64(e & reftOffsetMask); off != 0 && off&(img.clusterSize-1) == 0 && off < img.fileSize {
			seen[off>>img.clusterBits] = true
		}
	}
	out := make([]int64, 0, len(seen))
	for c := range seen {
		out = append(out, c)
	}
	slices.Sort(out)
	return out
}

// withoutCopiedFlags and copiedFlags split check messages into those
// about COPIED flags and the others.
func withoutCopiedFlags(msgs []string) []string {
	return slices.DeleteFunc(slices.Clone(msgs), isCopiedFlagMessage)
}

func copiedFlags(msgs []string) []string {
	return slices.DeleteFunc(slices.Clone(msgs), func(m string) bool { return !isCopiedFlagMessage(m) })
}

func isCopiedFlagMessage(m string) bool { return strings.Contains(m, "OFLAG_COPIED") }
