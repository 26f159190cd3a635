package qcow2

import (
	"encoding/binary"
	"fmt"
	"math/bits"
	"slices"

	"imgfuse/aio"
	"imgfuse/coroutine"
	"imgfuse/drivers"
)

// allocation is an allocating write in flight (QEMU's QCowL2Meta): it
// exists from the moment its host clusters are chosen, under mu, until its
// L2 entries are written, under mu again. In between, data (and COW) is
// written with mu released; every write and zero write that touches its
// clusters waits on wait and then redoes its lookup.
type allocation struct {
	// start and end are the guest clusters covered, cluster-aligned.
	// Immutable.
	start, end int64
	// host is the host offset of the cluster at start; the clusters are
	// contiguous. Immutable.
	host int64
	// keep: host is the existing host cluster (a COPIED cluster with
	// subclusters, or a preallocated zero cluster, becoming allocated);
	// nothing was allocated for it. fresh: the clusters were allocated
	// with rc.allocLocked and are freed if the write fails. Immutable.
	keep, fresh bool
	// lo and hi are the guest bytes written to the host clusters: the
	// request plus the COW head and tail. Immutable.
	lo, hi int64
	// wait holds the requests waiting for this allocation to finish.
	wait coroutine.CoQueue
}

// cow reports whether the write copies data it was not given.
func (a *allocation) cow(off, n int64) bool { return a.lo < off || a.hi > off+n }

// writePlan is what one step of a write does: n bytes of the request at
// host offset host, in place (a == nil) or into an allocation.
type writePlan struct {
	n    int64
	host int64
	a    *allocation
}

// Cluster classes for a write (QEMU's cluster_needs_new_alloc and
// handle_copied).
const (
	// wInPlace: a COPIED cluster whose touched subclusters are all
	// allocated: write in place, no metadata.
	wInPlace = iota
	// wKeep: a COPIED cluster with a host cluster, some touched
	// subclusters not allocated (or a preallocated zero cluster): write
	// into it, then update its L2 entry.
	wKeep
	// wNew: needs a new host cluster.
	wNew
)

// hostCluster returns the host cluster of a standard L2 entry and whether
// it has one (a compressed entry has none in this sense). With an external
// data file, guest cluster 0 lives at host offset 0: COPIED tells it from
// an unallocated entry, unless the zero flag makes it a plain zero cluster.
func (img *image) hostCluster(e uint64) (int64, bool) {
	if e&oflagCompressed != 0 {
		return 0, false
	}
	host := e & l2eOffsetMask
	if host != 0 {
		return int64(host), true
	}
	if img.h.hasDataFile() && e&oflagCopied != 0 && (img.scPerCluster > 1 || e&oflagZero == 0) {
		return 0, true
	}
	return 0, false
}

// scMask returns the bits of subclusters [a, b) of a 32-bit bitmap.
func scMask(a, b int) uint32 {
	if b-a >= 32 {
		return ^uint32(0)
	}
	return (uint32(1)<<(b-a) - 1) << a
}

// classify says what a write of subclusters [scA, scB) of the cluster with
// entry e and bitmap does.
func (img *image) classify(e, bitmap uint64, scA, scB int) int {
	if e&oflagCopied == 0 {
		return wNew
	}
	if _, ok := img.hostCluster(e); !ok {
		return wNew
	}
	if img.scPerCluster == 1 {
		if e&oflagZero != 0 {
			return wKeep
		}
		return wInPlace
	}
	m := scMask(scA, scB)
	if uint32(bitmap)&m == m {
		return wInPlace
	}
	return wKeep
}

// touched returns the subclusters [scA, scB) of the cluster at cstart that
// the guest range [off, end) touches.
func (img *image) touched(cstart, off, end int64) (int, int) {
	lo := max(off, cstart) - cstart
	hi := min(end, cstart+img.clusterSize) - cstart
	return int(lo >> img.scBits), int((hi + 1<<img.scBits - 1) >> img.scBits)
}

// WriteAt implements drivers.Driver. The request may be unaligned and span
// any number of clusters; p is not referenced once WriteAt returns. A write
// past the end fails with drivers.ErrNoSpace unless the image was opened
// Growable, in which case the disk grows first.
//
// Each step maps one run under the lock: a run of COPIED clusters is
// written in place with no metadata I/O; anything else gets an allocation
// (new host clusters, or the kept one), is written with its COW head and
// tail outside the lock, and is then linked into its L2 table.
func (img *image) WriteAt(co *coroutine.Co, p []byte, off int64) (_ int, err error) {
	defer img.nameErr(&err)
	if !img.writable {
		return 0, img.readOnly("write")
	}
	end := off + int64(len(p))
	if off < 0 || end < off {
		return 0, fmt.Errorf("write of %d bytes at %#x: invalid range", len(p), off)
	}
	if end > img.size.Load() {
		if err := img.growForWrite(co, end); err != nil {
			return 0, err
		}
	}
	done := 0
	for done < len(p) {
		n, err := img.writeStep(co, p[done:], off+int64(done))
		if err != nil {
			return done, err
		}
		done += n
	}
	return done, nil
}

// growForWrite grows the disk to cover end for a Growable image, or says
// why not.
func (img *image) growForWrite(co *coroutine.Co, end int64) error {
	if !img.growable {
		return fmt.Errorf("write up to %#x past the end of the %d-byte disk: %w", end, img.size.Load(), drivers.ErrNoSpace)
	}
	img.mu.Lock(co)
	defer img.mu.Unlock(co)
	return img.growLocked(co, end)
}

// writeStep writes a prefix of p at off and returns its length.
func (img *image) writeStep(co *coroutine.Co, p []byte, off int64) (int, error) {
	img.mu.Lock(co)
	var (
		pl    writePlan
		err   error
		retry = true
	)
	for retry && err == nil {
		pl, retry, err = img.planWriteLocked(co, off, int64(len(p)))
	}
	err = img.signalCorruptionLocked(co, err)
	if err == nil && pl.a == nil {
		img.inPlace.Add(1) // under mu: see drainInPlaceLocked
	}
	img.mu.Unlock(co)
	if err != nil {
		return 0, err
	}
	data := p[:pl.n]
	a := pl.a
	if a == nil {
		err := img.data.PwriteCo(co, data, pl.host)
		img.inPlaceDone()
		if err != nil {
			return 0, fmt.Errorf("writing guest %#x to host %#x: %w", off, pl.host, err)
		}
		return int(pl.n), nil
	}
	err = img.writeAllocation(co, a, data, off)
	img.mu.Lock(co)
	if err == nil {
		err = img.signalCorruptionLocked(co, img.linkLocked(co, a, a.cow(off, pl.n)))
	} else {
		img.abortLocked(co, a)
	}
	img.allocs = slices.DeleteFunc(img.allocs, func(x *allocation) bool { return x == a })
	a.wait.RestartAll()
	img.mu.Unlock(co)
	if err != nil {
		return 0, err
	}
	return int(pl.n), nil
}

// waitForAllocsLocked makes [off, off+n) (rounded out to clusters) free of
// allocations in flight. If one overlaps the start, it waits for it
// (releasing mu) and reports waited: the caller must redo its lookup. An
// allocation further on only shortens the range: the result is the number
// of bytes from off clear of them.
func (img *image) waitForAllocsLocked(co *coroutine.Co, off, n int64) (int64, bool) {
	img.mu.AssertHeld(co)
	cs := img.clusterSize
	cstart := off &^ (cs - 1)
	for _, a := range img.allocs {
		cend := (off + n + cs - 1) &^ (cs - 1)
		if a.end <= cstart || a.start >= cend {
			continue
		}
		if a.start <= cstart {
			a.wait.Wait(co, &img.mu)
			return 0, true
		}
		n = a.start - off
	}
	return n, false
}

// planWriteLocked decides the next step of a write of n bytes at off. If it
// had to wait for an allocation in flight it returns retry, having released
// and re-acquired mu: the caller calls it again.
func (img *image) planWriteLocked(co *coroutine.Co, off, n int64) (writePlan, bool, error) {
	img.mu.AssertHeld(co)
	if img.broken != nil {
		return writePlan{}, false, img.broken
	}
	cs := img.clusterSize
	inCluster := off & (cs - 1)
	cstart := off - inCluster
	l1Index, _, n := img.l2Slot(off, n)
	n, waited := img.waitForAllocsLocked(co, off, n)
	if waited {
		return writePlan{}, true, nil
	}
	r, err := img.writeRunLocked(co, off, n)
	if err != nil {
		return writePlan{}, false, err
	}
	n = min(n, r.count*cs-inCluster)

	if r.class != wNew {
		if err := img.checkDataLocked(co, r.host, r.count); err != nil {
			return writePlan{}, false, err
		}
	}
	if r.class == wInPlace {
		return writePlan{n: n, host: r.host + inCluster}, false, nil
	}

	// An allocating step: compute the COW range, make the L2 table
	// writable, allocate, and register the allocation.
	a := &allocation{start: cstart, end: cstart + r.count*cs, keep: r.class == wKeep}
	a.lo, a.hi = img.cowRange(a, r, off, off+n)
	if _, err := img.l2TableForWriteLocked(co, l1Index); err != nil {
		return writePlan{}, false, err
	}
	switch {
	case a.keep:
		a.host = r.host
	case img.h.hasDataFile():
		// Guest offset == host offset; data clusters are not
		// refcounted.
		a.host = cstart
	default:
		host, err := img.rc.allocLocked(co, r.count)
		if err != nil {
			return writePlan{}, false, fmt.Errorf("allocating %d clusters: %w", r.count, err)
		}
		img.fileSize = max(img.fileSize, img.rc.end)
		a.host, a.fresh = host, true
	}
	img.allocs = append(img.allocs, a)
	return writePlan{n: n, host: a.host + inCluster, a: a}, false, nil
}

// checkDataLocked runs the overlap check on a data write into count host
// clusters from host (nothing to check in an external data file).
func (img *image) checkDataLocked(co *coroutine.Co, host, count int64) error {
	img.mu.AssertHeld(co)
	if img.extData {
		return nil
	}
	return img.checkWriteLocked(co, host, count<<img.clusterBits, 0)
}

// writeRun is the run of clusters one write step covers: clusters of one
// class (and, in place, contiguous host clusters; an existing cluster
// kept is a run of its own).
type writeRun struct {
	class int
	count int64 // clusters
	// host is the host cluster of the first cluster (classes wInPlace
	// and wKeep).
	host int64
	// The entries and bitmaps of the first and last clusters, for the
	// COW range.
	first, firstBm, last, lastBm uint64
}

// writeRunLocked reads the L2 entries of a write of n bytes at off (inside
// one L2 table): the first decides the class, the run extends while the
// class (and, in place, host contiguity) holds. A damaged first entry is
// an error; a damaged later one ends the run.
func (img *image) writeRunLocked(co *coroutine.Co, off, n int64) (writeRun, error) {
	img.mu.AssertHeld(co)
	s, err := img.sliceLocked(co, off, n, slicePlan)
	if err != nil {
		return writeRun{}, err
	}
	defer s.close()
	var r writeRun
	for i := range s.n {
		e, bm := s.entry(i)
		scA, scB := s.touched(i)
		if _, _, _, err := s.typeAt(i, scA); err != nil {
			if i == 0 {
				return writeRun{}, err
			}
			break
		}
		h, _ := img.hostCluster(e)
		k := img.classify(e, bm, scA, scB)
		if i == 0 {
			r.class, r.first, r.firstBm, r.host = k, e, bm, h
		} else if k != r.class || r.class == wKeep ||
			(r.class == wInPlace && h != r.host+i*img.clusterSize) {
			break
		}
		r.last, r.lastBm = e, bm
		r.count++
	}
	return r, nil
}

// cowRange returns the guest range [lo, hi) an allocation writes for a
// request [off, end): the request, plus the head of the first cluster and
// the tail of the last that must be copied (QEMU's calculate_l2_meta).
// Without subclusters that is the whole clusters. With them, only
// partially written subclusters are copied, except that a new cluster
// replacing one with a host cluster copies every allocated subcluster of
// it (they move with the cluster), and a compressed one is copied whole.
func (img *image) cowRange(a *allocation, r writeRun, off, end int64) (int64, int64) {
	first, firstBm, last, lastBm := r.first, r.firstBm, r.last, r.lastBm
	cs := img.clusterSize
	if img.scPerCluster == 1 {
		return a.start, a.end
	}
	sc := int64(1) << img.scBits
	lo := off &^ (sc - 1)
	hi := (end + sc - 1) &^ (sc - 1)
	lastStart := a.end - cs
	if a.keep {
		// Subclusters already allocated hold their data in place.
		if scA := int((off - a.start) >> img.scBits); uint32(firstBm)&(1<<scA) != 0 {
			lo = off
		}
		if scB := int((end - 1 - lastStart) >> img.scBits); uint32(lastBm)&(1<<scB) != 0 {
			hi = end
		}
		return lo, hi
	}
	if first&oflagCompressed != 0 {
		lo = a.start
	} else if _, ok := img.hostCluster(first); ok {
		if alloc := uint32(firstBm); alloc != 0 {
			lo = min(lo, a.start+int64(bits.TrailingZeros32(alloc))<<img.scBits)
		}
	}
	if last&oflagCompressed != 0 {
		hi = a.end
	} else if _, ok := img.hostCluster(last); ok {
		if alloc := uint32(lastBm); alloc != 0 {
			hi = max(hi, lastStart+int64(32-bits.LeadingZeros32(alloc))<<img.scBits)
		}
	}
	return lo, hi
}

// writeAllocation writes the data of a step into its allocation, merged
// with the COW head and tail into one write. The COW data is what the guest
// reads there now (the backing file, zeros, a decompressed or shared
// cluster), read through the ordinary read path: the allocation keeps
// every other writer of these clusters away meanwhile.
func (img *image) writeAllocation(co *coroutine.Co, a *allocation, data []byte, off int64) error {
	end := off + int64(len(data))
	if !a.cow(off, int64(len(data))) {
		if err := img.data.PwriteCo(co, data, a.host+(off-a.start)); err != nil {
			return fmt.Errorf("writing guest %#x to host %#x: %w", off, a.host+(off-a.start), err)
		}
		return nil
	}
	buf := img.cowBuffer(a.hi - a.lo)
	defer img.cowPool.Put(&buf)
	if err := img.readForCOW(co, buf[:off-a.lo], a.lo); err != nil {
		return err
	}
	copy(buf[off-a.lo:], data)
	if err := img.readForCOW(co, buf[end-a.lo:], end); err != nil {
		return err
	}
	host := a.host + (a.lo - a.start)
	if err := img.data.PwriteCo(co, buf, host); err != nil {
		return fmt.Errorf("writing guest %#x (with copy-on-write) to host %#x: %w", a.lo, host, err)
	}
	return nil
}

// cowBuffer returns an aligned buffer of n bytes for a COW write, reused
// from cowPool when one is large enough (most are one cluster: a partial
// write into one cluster).
func (img *image) cowBuffer(n int64) []byte {
	if b, ok := img.cowPool.Get().(*[]byte); ok && int64(cap(*b)) >= n {
		return (*b)[:n]
	}
	return aio.AlignedBuffer(int(max(n, img.clusterSize)))[:n]
}

// readForCOW fills p with the guest data at off; bytes past the end of the
// disk (in its last, partial cluster) are zeros.
func (img *image) readForCOW(co *coroutine.Co, p []byte, off int64) error {
	if len(p) == 0 {
		return nil
	}
	k := min(int64(len(p)), max(img.size.Load()-off, 0))
	clear(p[k:])
	if k == 0 {
		return nil
	}
	if _, err := img.ReadAt(co, p[:k], off); err != nil {
		return fmt.Errorf("copy-on-write read at %#x: %w", off, err)
	}
	return nil
}

// linkLocked publishes an allocation whose data is written: its L2 entries
// point at the host clusters with COPIED (refcount 1; with subclusters,
// the written subclusters become allocated and stop reading as zeros),
// then the clusters they replaced lose a reference (QEMU's
// qcow2_alloc_cluster_link_l2). The ordering rules it follows are the
// helpers refcountsBeforeL2Locked, dataBeforeL2 and releaseLocked.
func (img *image) linkLocked(co *coroutine.Co, a *allocation, cow bool) error {
	img.mu.AssertHeld(co)
	err := img.markDirtyLocked(co)
	if err == nil && a.fresh {
		err = img.refcountsBeforeL2Locked(co)
	}
	if err != nil {
		img.abortLocked(co, a)
		return err
	}
	s, err := img.sliceLocked(co, a.start, a.end-a.start, sliceUpdate)
	if err != nil {
		img.abortLocked(co, a)
		return err
	}
	defer s.close()
	if cow {
		img.dataBeforeL2()
	}
	var rel releases
	for i := range s.n {
		old, oldBm := s.entry(i)
		host := a.host + i*img.clusterSize
		var nb uint64
		if img.scPerCluster > 1 {
			scA, scB := img.touched(s.guest(i), a.lo, a.hi)
			m := scMask(scA, scB)
			if old&oflagCompressed != 0 {
				nb = uint64(m) // the whole cluster was copied
			} else {
				nb = uint64(uint32(oldBm)|m) | uint64(uint32(oldBm>>32)&^m)<<32
			}
		}
		s.set(i, uint64(host)|oflagCopied, nb)
		if !a.keep && !img.h.hasDataFile() {
			rel.add(img, old, host)
		}
	}
	s.close()
	return img.releaseLocked(co, &rel)
}

// releases collects the host clusters an L2 update stopped referencing.
type releases struct {
	ext        [][2]int64 // offset, length
	compressed bool
}

// add records what entry e referenced, unless it is the host cluster
// keep, which the new entry still references.
func (r *releases) add(img *image, e uint64, keep int64) {
	if e&oflagCompressed != 0 {
		coff, csize := img.compressedRange(e)
		r.ext = append(r.ext, [2]int64{coff, csize})
		r.compressed = true
	} else if h, ok := img.hostCluster(e); ok && h != keep {
		r.ext = append(r.ext, [2]int64{h, img.clusterSize})
	}
}

// Write ordering (qcow2.md §1.13), one helper per rule, called by the L2
// updates they protect.

// refcountsBeforeL2Locked: the refcount increase of clusters an L2 entry is
// about to point at reaches the disk before the L2 table does (the L2
// cache depends on the refcount cache). With lazy refcounts the dirty bit,
// set first (markDirtyLocked), covers them instead.
func (img *image) refcountsBeforeL2Locked(co *coroutine.Co) error {
	img.mu.AssertHeld(co)
	if img.lazy {
		return nil
	}
	return img.l2.SetDependency(co, img.rc.cache)
}

// dataBeforeL2: data copied into a new cluster (COW) is synced before the
// L2 table that points at it is written, so the table never points at a
// cluster whose copied data could be lost.
func (img *image) dataBeforeL2() { img.l2.DependOnFlush() }

// releaseLocked drops the references collected in r, after the L2 entries
// changed: rc.updateLocked makes the refcount cache depend on the L2
// cache, so the entries reach the disk before the lowered refcounts. A
// failure merely leaks the clusters (nothing references them any more).
func (img *image) releaseLocked(co *coroutine.Co, r *releases) error {
	img.mu.AssertHeld(co)
	if r.compressed {
		img.zcacheDrop()
	}
	for _, f := range r.ext {
		if err := img.rc.updateLocked(co, f[0], f[1], -1); err != nil {
			return fmt.Errorf("freeing host cluster %#x: %w", f[0], err)
		}
	}
	return nil
}

// abortLocked frees the clusters of an allocation that will not be linked.
func (img *image) abortLocked(co *coroutine.Co, a *allocation) {
	img.mu.AssertHeld(co)
	if a.fresh {
		// Nothing points at them; on failure they merely leak.
		_ = img.rc.updateLocked(co, a.host, a.end-a.start, -1)
		a.fresh = false
	}
}

// l2TableForWriteLocked returns the offset of the L2 table of L1 entry
// l1Index, making sure it is exclusively this image's (COPIED): a missing
// table is allocated zeroed, a shared one (an L1 entry without COPIED, as
// after a snapshot) is copied (QEMU's l2_allocate).
//
// Ordering: the new table's refcount is flushed, then the table itself is
// written and flushed, and only then the L1 entry is written, with a sync
// write; the old shared table loses its reference last.
func (img *image) l2TableForWriteLocked(co *coroutine.Co, l1Index int64) (int64, error) {
	img.mu.AssertHeld(co)
	if l1Index >= int64(len(img.l1)) {
		return 0, fmt.Errorf("L1 index %d past the %d-entry L1 table: %w", l1Index, len(img.l1), drivers.ErrCorrupt)
	}
	old, err := img.l2OffsetLocked(co, l1Index)
	if err != nil {
		return 0, err
	}
	if old != 0 && img.l1[l1Index]&oflagCopied != 0 {
		return int64(old), nil
	}
	if err := img.markDirtyLocked(co); err != nil {
		return 0, err
	}
	cs := img.clusterSize
	var saved []byte
	if old != 0 {
		t, err := img.l2.Get(co, int64(old))
		if err != nil {
			return 0, fmt.Errorf("L2 table at %#x: %w", old, err)
		}
		saved = make([]byte, cs)
		copy(saved, t.Bytes())
		img.l2.Put(t)
	}
	off, err := img.rc.allocLocked(co, 1)
	if err != nil {
		return 0, fmt.Errorf("allocating an L2 table: %w", err)
	}
	img.fileSize = max(img.fileSize, img.rc.end)
	fail := func(err error) (int64, error) {
		img.l2.Discard(off)
		_ = img.rc.updateLocked(co, off, cs, -1)
		return 0, err
	}
	if !img.lazy {
		if err := img.rc.flushLocked(co); err != nil {
			return fail(err)
		}
	}
	t, err := img.l2.GetEmpty(co, off)
	if err != nil {
		return fail(err)
	}
	if saved != nil {
		copy(t.Bytes(), saved)
	}
	img.l2.MarkDirty(t)
	img.l2.Put(t)
	if err := img.l2.Flush(co); err != nil {
		return fail(fmt.Errorf("writing the new L2 table at %#x: %w", off, err))
	}
	if err := img.writeL1EntryLocked(co, l1Index, uint64(off)|oflagCopied); err != nil {
		return fail(err)
	}
	if old != 0 {
		if err := img.rc.updateLocked(co, int64(old), cs, -1); err != nil {
			return 0, fmt.Errorf("releasing the shared L2 table at %#x: %w", old, err)
		}
	}
	return off, nil
}

// writeL1EntryLocked sets L1 entry i to e, on disk (sync) and in memory.
func (img *image) writeL1EntryLocked(co *coroutine.Co, i int64, e uint64) error {
	img.mu.AssertHeld(co)
	var b [8]byte
	binary.BigEndian.PutUint64(b[:], e)
	if err := img.syncWriteLocked(co, b[:], int64(img.h.L1Offset)+i*8, olActiveL1); err != nil {
		return fmt.Errorf("writing L1 entry %d: %w", i, err)
	}
	img.setL1Locked(co, i, e)
	return nil
}

// inPlaceDone ends an in-place write counted in inPlace, waking a discard
// that waits for the last one.
func (img *image) inPlaceDone() {
	if img.inPlace.Add(-1) != 0 {
		return
	}
	img.drainMu.Lock()
	d := img.drainer
	img.drainer = nil
	img.drainMu.Unlock()
	if d != nil {
		d.Wake()
	}
}

// drainInPlaceLocked waits until no in-place write is in flight. Holding
// mu keeps new ones from starting, so it ends once those already mapped
// have written their data.
func (img *image) drainInPlaceLocked(co *coroutine.Co) {
	img.mu.AssertHeld(co)
	for {
		img.drainMu.Lock()
		if img.inPlace.Load() == 0 {
			img.drainMu.Unlock()
			return
		}
		img.drainer = co
		img.drainMu.Unlock()
		co.Yield()
	}
}
