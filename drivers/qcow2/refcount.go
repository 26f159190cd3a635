package qcow2

import (
	"encoding/binary"
	"errors"
	"fmt"
	"math"

	"imgfuse/aio"
	"imgfuse/cache"
	"imgfuse/coroutine"
	"imgfuse/drivers"
)

// Refcounts (qcow2.md §1.10; QEMU qcow2-refcount.c).
//
// Every host cluster has a refcount of refcount_bits = 1<<order bits:
// 0 free, 1 owned by one table entry, more when shared with snapshots or
// holding several compressed streams. Refcounts are kept in refcount
// blocks (one cluster each); the refcount table (reftable) lists the
// blocks. Refcount blocks and the reftable are themselves clusters with a
// refcount, so every structure created here must count itself.

// maxHostClusterOffset bounds host offsets: L2 entries keep them in bits
// 9-55 (QEMU's QCOW_MAX_CLUSTER_OFFSET).
const maxHostClusterOffset = 1<<56 - 1

// errRetry says a new refcount block (or a new refcount area) was created
// while updating refcounts: it may have taken the clusters the caller
// found free, so the caller must search again (QEMU's -EAGAIN).
var errRetry = errors.New("refcount structure grew: search for free clusters again")

// maxRefblockDepth bounds the recursion of allocRefblockLocked: a refcount
// block described by another block that does not exist yet. QEMU reasons
// that it recurses at most twice; more means the reftable is damaged.
const maxRefblockDepth = 4

// maxRetries bounds the searches of one allocation or update: each retry
// follows the creation of a refcount block or a larger reftable, after
// which the same block is never missing again, so a few suffice; more
// means the structure does not hold what was just written to it.
const maxRetries = 64

// refcountCacheMin is the refcount cache size in clusters (QEMU's default
// and minimum since 2.12); refcountCacheBytes gives smaller clusters more
// tables, so a 512-byte-cluster image (64 refcounts a block at 64 bits)
// does not read a block (an O_DIRECT read) every few clusters the
// allocator scans. Measured on TestRefcountRandomModel at 64 bits: a
// 256 KiB cache spent most of its time in refcount block reads.
const (
	refcountCacheMin   = 4
	refcountCacheBytes = 1 << 20
)

// refcounts is the refcount state of an open image.
//
// All methods ending in Locked must be called by a coroutine holding *mu,
// which they assert; fields marked "protected by mu" may only be used
// under it.
type refcounts struct {
	// Immutable after openRefcounts.
	file        *aio.File
	clusterBits uint32
	clusterSize int64
	order       uint32 // refcount_order: refcounts are 1<<order bits
	max         uint64 // largest refcount: 1<<bits - 1
	blockBits   uint32 // log2 of the refcounts one block holds
	// cache holds refcount blocks, whole clusters.
	cache *cache.Cache
	// l2 is the image's L2 cache, for the write-ordering dependencies
	// (nil: no dependencies are set, for tools that touch no L2 table).
	l2 *cache.Cache

	// mu is the image's metadata lock. openRefcounts sets a private
	// mutex so that a caller who forgets to point it at the image's
	// fails the first AssertHeld rather than running unlocked.
	mu *coroutine.CoMutex

	// h is the image's header. ReftableOffset and ReftableClusters are
	// updated here when the reftable moves, so a header rewrite keeps
	// them. Protected by mu.
	h *header
	// reftable is the refcount table in memory: entries as on disk.
	// Protected by mu.
	reftable []uint64
	// blocks holds the refcount block offsets of reftable, sorted, for
	// the overlap check; rebuilt by blockSet when blocksStale (set
	// whenever reftable changes). Protected by mu.
	blocks      []int64
	blocksStale bool
	// guard is the image's overlap check, run before every write of a
	// refcount block, reftable entry, new reftable or header field (nil
	// for tools that have no image). Set by the owner.
	guard func(co *coroutine.Co, off, n int64, ign metaKind) error
	// freeClusterIndex is where the first-fit search starts: moved past
	// each allocation, lowered to any cluster freed. A free cluster below
	// it is a hole a multi-cluster allocation skipped (QEMU's
	// free_cluster_index). Protected by mu.
	freeClusterIndex int64
	// end is the file size rounded up to a cluster, raised past every
	// cluster allocated here: the file's size once everything allocated
	// is written. A partial last cluster counts as used. Protected by mu.
	end int64
}

// refcountTables returns the number of tables of the refcount cache.
func refcountTables(clusterSize int64) int {
	return int(max(refcountCacheMin, refcountCacheBytes/clusterSize))
}

// openRefcounts loads the reftable of the image described by h (plain
// reads: it must not be called from a coroutine) and sets up the refcount
// cache. fileSize is the image file's size. l2 is the L2 cache, for the
// write-ordering dependencies; it may be nil. The caller must set the
// result's mu to the image's metadata lock before calling any Locked
// method.
//
// Reftable entries are validated when used (reserved bits, alignment, past
// the end of the file), as L1 entries are.
func openRefcounts(co *coroutine.Co, f *aio.File, h *header, fileSize int64, l2 *cache.Cache) (*refcounts, error) {
	r, err := newRefcounts(f, h, fileSize, l2)
	if err != nil {
		return nil, err
	}
	n := int64(h.ReftableClusters) << h.ClusterBits
	if n > maxReftableBytes {
		return nil, corruptf("refcount table of %d clusters too large", h.ReftableClusters)
	}
	// A table cut short by the end of the file would read as zeros past
	// it: clusters in use would look free to the allocator. Tables are
	// always written whole, so this is a truncated file.
	if int64(h.ReftableOffset) > fileSize-n {
		return nil, corruptf("refcount table at %#x (%d bytes) runs past the end of the file (%d bytes)",
			h.ReftableOffset, n, fileSize)
	}
	buf := make([]byte, n)
	// co is nil at open (a plain caller); check and map call from a
	// coroutine, where only PreadCo may wait.
	read := f.Pread
	if co != nil {
		read = func(p []byte, off int64) error { return f.PreadCo(co, p, off) }
	}
	if err := read(buf, int64(h.ReftableOffset)); err != nil {
		return nil, fmt.Errorf("reading the refcount table at %#x: %w", h.ReftableOffset, err)
	}
	r.reftable = make([]uint64, n/8)
	r.blocksStale = true
	for i := range r.reftable {
		r.reftable[i] = binary.BigEndian.Uint64(buf[i*8:])
	}
	return r, nil
}

// newRefcounts is openRefcounts without the reftable.
func newRefcounts(f *aio.File, h *header, fileSize int64, l2 *cache.Cache) (*refcounts, error) {
	if h.RefcountOrder > 6 || h.ClusterBits < minClusterBits || h.ClusterBits > maxClusterBits {
		return nil, corruptf("refcount order %d with cluster bits %d", h.RefcountOrder, h.ClusterBits)
	}
	cs := h.clusterSize()
	r := &refcounts{
		file:        f,
		h:           h,
		clusterBits: h.ClusterBits,
		clusterSize: cs,
		order:       h.RefcountOrder,
		max:         math.MaxUint64 >> (64 - (1 << h.RefcountOrder)),
		blockBits:   h.ClusterBits + 3 - h.RefcountOrder,
		l2:          l2,
		mu:          new(coroutine.CoMutex),
		end:         (fileSize + cs - 1) &^ (cs - 1),
	}
	r.cache = cache.New("refcounts", refcountTables(cs), int(cs), refcountBackend{r})
	return r, nil
}

// refcountBackend does the refcount cache's I/O on the image file.
type refcountBackend struct{ r *refcounts }

func (b refcountBackend) ReadTable(co *coroutine.Co, off int64, p []byte) error {
	return b.r.file.PreadCo(co, p, off)
}

func (b refcountBackend) WriteTable(co *coroutine.Co, off int64, p []byte) error {
	if err := b.r.check(co, off, int64(len(p)), olRefcountBlock); err != nil {
		return err
	}
	return b.r.file.PwriteCo(co, p, off)
}

func (b refcountBackend) Sync(co *coroutine.Co) error { return b.r.file.FdatasyncCo(co) }

// check runs the owner's overlap check on a write of [off, off+n) (ign:
// the kinds of metadata it writes), if it has one.
func (r *refcounts) check(co *coroutine.Co, off, n int64, ign metaKind) error {
	if r.guard == nil {
		return nil
	}
	return r.guard(co, off, n, ign)
}

// getRefcount returns entry i of a refcount block of the given order.
// Orders 0-2 pack several entries per byte, entry 0 in the least
// significant bits; orders 4-6 are big-endian.
func getRefcount(b []byte, order uint32, i int64) uint64 {
	switch order {
	case 0, 1, 2:
		shift := uint(i&(1<<(3-order)-1)) << order
		return uint64(b[i>>(3-order)]>>shift) & (1<<(1<<order) - 1)
	case 3:
		return uint64(b[i])
	case 4:
		return uint64(binary.BigEndian.Uint16(b[i*2:]))
	case 5:
		return uint64(binary.BigEndian.Uint32(b[i*4:]))
	default:
		return binary.BigEndian.Uint64(b[i*8:])
	}
}

// setRefcount sets entry i of a refcount block of the given order to v,
// which the caller has checked is at most the order's maximum.
func setRefcount(b []byte, order uint32, i int64, v uint64) {
	switch order {
	case 0, 1, 2:
		shift := uint(i&(1<<(3-order)-1)) << order
		mask := byte(1<<(1<<order)-1) << shift
		p := &b[i>>(3-order)]
		*p = *p&^mask | byte(v)<<shift&mask
	case 3:
		b[i] = byte(v)
	case 4:
		binary.BigEndian.PutUint16(b[i*2:], uint16(v))
	case 5:
		binary.BigEndian.PutUint32(b[i*4:], uint32(v))
	default:
		binary.BigEndian.PutUint64(b[i*8:], v)
	}
}

// blockOffsetLocked returns the offset of refcount block ti, 0 if the
// block does not exist (all its refcounts are 0).
func (r *refcounts) blockOffsetLocked(co *coroutine.Co, ti int64) (int64, error) {
	r.mu.AssertHeld(co)
	if ti >= int64(len(r.reftable)) {
		return 0, nil
	}
	e := r.reftable[ti]
	if e&^reftOffsetMask != 0 {
		return 0, fmt.Errorf("refcount table entry %d (%#x) has reserved bits set: %w", ti, e, drivers.ErrCorrupt)
	}
	if e == 0 {
		return 0, nil
	}
	if e&uint64(r.clusterSize-1) != 0 || e > maxHostClusterOffset {
		return 0, fmt.Errorf("refcount block %d at %#x is not a valid cluster offset: %w", ti, e, drivers.ErrCorrupt)
	}
	// A block past the end of the file would read as zeros and make
	// used clusters look free. Blocks created here are written before
	// the reftable points at them, so end covers them too.
	if int64(e) >= r.end {
		return 0, fmt.Errorf("refcount block %d at %#x is past the end of the file (%d bytes): %w",
			ti, e, r.end, drivers.ErrCorrupt)
	}
	return int64(e), nil
}

// getLocked returns the refcount of host cluster (an index, not an
// offset). Clusters no refcount block covers have refcount 0.
func (r *refcounts) getLocked(co *coroutine.Co, cluster int64) (uint64, error) {
	r.mu.AssertHeld(co)
	if cluster < 0 {
		return 0, fmt.Errorf("refcount of cluster %d: %w", cluster, drivers.ErrCorrupt)
	}
	off, err := r.blockOffsetLocked(co, cluster>>r.blockBits)
	if err != nil || off == 0 {
		return 0, err
	}
	t, err := r.cache.Get(co, off)
	if err != nil {
		return 0, fmt.Errorf("refcount block at %#x: %w", off, err)
	}
	v := getRefcount(t.Bytes(), r.order, cluster&(1<<r.blockBits-1))
	r.cache.Put(t)
	return v, nil
}

// findFreeLocked finds n contiguous clusters with refcount 0, first-fit
// from freeClusterIndex, never cluster 0 (QEMU's alloc_clusters_noref). It
// does not claim them: the caller raises their refcounts. Like QEMU it
// moves freeClusterIndex past the clusters found, so a hole too small for
// n is skipped until a free lowers the index again; rescanning it on every
// multi-cluster allocation would make allocation cost grow with the file.
func (r *refcounts) findFreeLocked(co *coroutine.Co, n int64) (int64, error) {
	r.mu.AssertHeld(co)
	limit := int64(maxHostClusterOffset>>r.clusterBits) + 1
	start := max(r.freeClusterIndex, 1)
	found := int64(0) // free clusters from start
	for found < n {
		if start+n > limit {
			return 0, fmt.Errorf("no room for %d clusters below the largest host offset: %w", n, drivers.ErrNoSpace)
		}
		c := start + found
		ti := c >> r.blockBits
		blockEnd := (ti + 1) << r.blockBits
		off, err := r.blockOffsetLocked(co, ti)
		if err != nil {
			return 0, err
		}
		if off == 0 {
			// No block: every refcount in its range is 0.
			found += min(blockEnd-c, n-found)
			continue
		}
		t, err := r.cache.Get(co, off)
		if err != nil {
			return 0, fmt.Errorf("refcount block at %#x: %w", off, err)
		}
		b := t.Bytes()
		for ; c < blockEnd && found < n; c++ {
			if getRefcount(b, r.order, c&(1<<r.blockBits-1)) != 0 {
				start, found = c+1, 0
			} else {
				found++
			}
		}
		r.cache.Put(t)
	}
	r.freeClusterIndex = start + n
	return start << r.clusterBits, nil
}

// allocLocked allocates n > 0 contiguous free clusters, sets their
// refcounts to 1 in the refcount cache and returns the host offset of the
// first. The clusters may lie past the end of the file, which grows when
// they are written.
//
// The clusters pass the overlap check before they are counted.
//
// Ordering is the caller's: an L2 entry pointing at the clusters follows
// refcountsBeforeL2Locked; an L1 entry or header field (written directly,
// not through a cache) is written only after the refcount cache has been
// flushed.
func (r *refcounts) allocLocked(co *coroutine.Co, n int64) (int64, error) {
	r.mu.AssertHeld(co)
	if n <= 0 || n > maxHostClusterOffset>>r.clusterBits {
		return 0, fmt.Errorf("allocating %d clusters: invalid count", n)
	}
	for try := 0; ; try++ {
		off, err := r.findFreeLocked(co, n)
		if err != nil {
			return 0, err
		}
		// Clusters with refcount 0 may still be metadata of a damaged
		// image: never hand them out (whatever they are for, data or
		// a new table, nothing may be written there).
		if err := r.check(co, off, n<<r.clusterBits, 0); err != nil {
			return 0, err
		}
		err = r.updateDepthLocked(co, off, n<<r.clusterBits, 1, 0)
		if errors.Is(err, errRetry) && try < maxRetries {
			continue
		}
		if err != nil {
			return 0, err
		}
		if off == 0 {
			// Unreachable: the search starts at cluster 1. Kept so
			// no path can ever publish host offset 0.
			return 0, fmt.Errorf("allocation at offset 0: %w", drivers.ErrCorrupt)
		}
		r.end = max(r.end, off+n<<r.clusterBits)
		return off, nil
	}
}

// updateLocked adds delta to the refcount of every cluster touching
// [off, off+length): for compressed data, every host cluster its byte
// range touches. A refcount that would pass refcount_max fails with
// drivers.ErrUnsupported (shared too often for this refcount width); one
// that would go below 0 fails with drivers.ErrCorrupt (the image frees a
// cluster it does not own). On failure no refcount has changed.
//
// A decrease makes the refcount cache depend on the L2 cache: the L2
// entries dropping the references reach the disk before the refcounts
// do. A cluster whose refcount drops to 0 becomes free and is dropped from
// both caches (it is no longer a table); the caller must not hold it
// pinned.
func (r *refcounts) updateLocked(co *coroutine.Co, off, length int64, delta int64) error {
	r.mu.AssertHeld(co)
	for try := 0; ; try++ {
		err := r.updateDepthLocked(co, off, length, delta, 0)
		// errRetry only concerns allocators: the clusters being
		// counted are already in use, so nothing else can take them.
		if !errors.Is(err, errRetry) || try >= maxRetries {
			return err
		}
	}
}

// updateDepthLocked is updateLocked one level of refcount-block recursion
// down; it may fail with errRetry when it created a refcount block, having
// undone its own changes.
func (r *refcounts) updateDepthLocked(co *coroutine.Co, off, length, delta int64, depth int) (err error) {
	r.mu.AssertHeld(co)
	if length == 0 || delta == 0 {
		return nil
	}
	if off < 0 || length < 0 || off > maxHostClusterOffset || length > maxHostClusterOffset-off+1 {
		return fmt.Errorf("refcount update of [%#x, +%#x): invalid range", off, length)
	}
	if delta < 0 && r.l2 != nil {
		if err := r.cache.SetDependency(co, r.l2); err != nil {
			return err
		}
	}
	first := off >> r.clusterBits
	last := (off + length - 1) >> r.clusterBits
	var (
		t       *cache.Table
		tIndex  int64 = -1
		c       int64
		changed bool
	)
	defer func() {
		if t != nil {
			r.cache.Put(t)
		}
		if err != nil && changed && c > first {
			// Undo [first, c) so the caller sees no change (this may
			// fail too, e.g. on an I/O error: the cluster then stays
			// leaked or over-counted, never under-counted for long).
			_ = r.updateDepthLocked(co, first<<r.clusterBits, (c-first)<<r.clusterBits, -delta, depth)
		}
		if errors.Is(err, errRetry) && first < r.freeClusterIndex {
			// The clusters from first on were free a moment ago
			// (if this was an allocation): look there first.
			r.freeClusterIndex = first
		}
	}()
	for c = first; c <= last; c++ {
		ti := c >> r.blockBits
		if t == nil || ti != tIndex {
			if t != nil {
				r.cache.Put(t)
				t = nil
			}
			t, err = r.blockLocked(co, c, delta > 0, depth)
			if err != nil {
				return err
			}
			tIndex = ti
		}
		i := c & (1<<r.blockBits - 1)
		old := getRefcount(t.Bytes(), r.order, i)
		var v uint64
		if delta < 0 {
			if uint64(-delta) > old {
				return fmt.Errorf("refcount of cluster %#x is %d, cannot decrease it by %d: %w",
					c<<r.clusterBits, old, -delta, drivers.ErrCorrupt)
			}
			v = old - uint64(-delta)
		} else {
			if uint64(delta) > r.max-old {
				return fmt.Errorf("refcount of cluster %#x is %d, cannot raise it by %d past %d: %w",
					c<<r.clusterBits, old, delta, r.max, drivers.ErrUnsupported)
			}
			v = old + uint64(delta)
		}
		setRefcount(t.Bytes(), r.order, i, v)
		r.cache.MarkDirty(t)
		changed = true
		if v == 0 {
			if c < r.freeClusterIndex {
				r.freeClusterIndex = c
			}
			coff := c << r.clusterBits
			if r.l2 != nil {
				r.l2.Discard(coff)
			}
			if t.Offset() == coff {
				// A block describing itself is being freed (the
				// reftable must already have dropped it).
				r.cache.Put(t)
				t, tIndex = nil, -1
			}
			r.cache.Discard(coff)
		}
	}
	return nil
}

// blockLocked returns the refcount block covering cluster c, pinned. If
// there is none, every refcount in its range is 0: without create that is
// an error (a decrease needs a refcount); with create it allocates the
// block (growing the reftable if needed) and fails with errRetry, the
// block then being in place for the retry.
func (r *refcounts) blockLocked(co *coroutine.Co, c int64, create bool, depth int) (*cache.Table, error) {
	r.mu.AssertHeld(co)
	ti := c >> r.blockBits
	off, err := r.blockOffsetLocked(co, ti)
	if err != nil {
		return nil, err
	}
	if off != 0 {
		t, err := r.cache.Get(co, off)
		if err != nil {
			return nil, fmt.Errorf("refcount block at %#x: %w", off, err)
		}
		return t, nil
	}
	if !create {
		return nil, fmt.Errorf("cluster %#x has no refcount block (refcount 0), cannot decrease it: %w",
			c<<r.clusterBits, drivers.ErrCorrupt)
	}
	if depth >= maxRefblockDepth {
		return nil, fmt.Errorf("refcount block allocation recursed %d times: %w", depth, drivers.ErrCorrupt)
	}
	if ti >= int64(len(r.reftable)) {
		// Everything from block ti's range on is free: build new
		// blocks and a larger reftable there, covering themselves.
		if err := r.growLocked(co, ti); err != nil {
			return nil, err
		}
		return nil, errRetry
	}
	if err := r.newBlockLocked(co, ti, depth); err != nil {
		return nil, err
	}
	return nil, errRetry
}

// newBlockLocked creates refcount block ti, inside the current reftable
// (QEMU's alloc_refcount_block): allocate a cluster, count it (in itself
// when it falls in its own range, else through the normal path), write
// and flush the block, then point the reftable at it with a sync write.
func (r *refcounts) newBlockLocked(co *coroutine.Co, ti int64, depth int) error {
	r.mu.AssertHeld(co)
	// The new block becomes live with the reftable write below; any
	// pending L2 writes the refcount cache depends on go first.
	if r.l2 != nil {
		if err := r.l2.Flush(co); err != nil {
			return err
		}
	}
	bOff, err := r.findFreeLocked(co, 1)
	if err != nil {
		return err
	}
	// A cluster found free may be metadata of a damaged image.
	if err := r.check(co, bOff, r.clusterSize, 0); err != nil {
		return err
	}
	bCluster := bOff >> r.clusterBits
	var t *cache.Table
	if bCluster>>r.blockBits == ti {
		if t, err = r.cache.GetEmpty(co, bOff); err != nil {
			return err
		}
		setRefcount(t.Bytes(), r.order, bCluster&(1<<r.blockBits-1), 1)
	} else {
		if err := r.updateDepthLocked(co, bOff, r.clusterSize, 1, depth+1); err != nil {
			return err
		}
		if err := r.cache.Flush(co); err != nil {
			return err
		}
		if t, err = r.cache.GetEmpty(co, bOff); err != nil {
			return err
		}
	}
	r.end = max(r.end, bOff+r.clusterSize)
	r.cache.MarkDirty(t)
	r.cache.Put(t)
	if err := r.cache.Flush(co); err != nil {
		// Never let a stale copy be written over the cluster later.
		r.cache.Discard(bOff)
		return err
	}
	var e [8]byte
	binary.BigEndian.PutUint64(e[:], uint64(bOff))
	if err := r.syncWriteLocked(co, e[:], int64(r.h.ReftableOffset)+ti*8, olRefcountTable); err != nil {
		r.cache.Discard(bOff)
		return fmt.Errorf("writing refcount table entry %d: %w", ti, err)
	}
	r.reftable[ti] = uint64(bOff)
	r.blocksStale = true
	return nil
}

// syncWriteLocked writes p at off and fdatasyncs the file, after the
// overlap check (ign: the kinds of metadata it writes).
func (r *refcounts) syncWriteLocked(co *coroutine.Co, p []byte, off int64, ign metaKind) error {
	r.mu.AssertHeld(co)
	if err := r.check(co, off, int64(len(p)), ign); err != nil {
		return err
	}
	if err := r.file.PwriteCo(co, p, off); err != nil {
		return err
	}
	return r.file.FdatasyncCo(co)
}

// growLocked makes room in the reftable for block ti, which lies past its
// end (QEMU's qcow2_refcount_area). Every cluster from block ti's range on
// has refcount 0, so it lays out there, in one go, the new refcount blocks
// from ti on and a new reftable 1.5 times the size needed, such that the
// new blocks cover themselves and the new table. It writes and flushes the
// blocks, writes and syncs the table, switches the header to it (bytes
// 48-59, one 12-byte sync write), and only then frees the old table, so a
// crash leaves either structure whole.
func (r *refcounts) growLocked(co *coroutine.Co, ti int64) error {
	r.mu.AssertHeld(co)
	perBlock := int64(1) << r.blockBits
	startCluster := ti << r.blockBits // first cluster of block ti
	oldLen := int64(len(r.reftable))

	total, tableEntries, endCluster, err := r.areaLayout(startCluster, ti, oldLen)
	if err != nil {
		return err
	}
	newBlocks := total - ti
	tableCluster := startCluster + newBlocks
	// Every cluster from startCluster on has refcount 0: in a damaged
	// image that may still be metadata.
	if err := r.check(co, startCluster<<r.clusterBits, (endCluster-startCluster)<<r.clusterBits, 0); err != nil {
		return err
	}
	newTable := make([]uint64, tableEntries)
	copy(newTable, r.reftable)

	// The new blocks: block ti+k at cluster startCluster+k. Each counts
	// the clusters of the new structures in its range.
	discardNew := func() {
		for k := range newBlocks {
			r.cache.Discard((startCluster + k) << r.clusterBits)
		}
	}
	for k := range newBlocks {
		bi := ti + k
		bOff := (startCluster + k) << r.clusterBits
		t, err := r.cache.GetEmpty(co, bOff)
		if err != nil {
			discardNew()
			return err
		}
		lo := max(startCluster, bi*perBlock)
		hi := min(endCluster, (bi+1)*perBlock)
		for c := lo; c < hi; c++ {
			setRefcount(t.Bytes(), r.order, c-bi*perBlock, 1)
		}
		r.cache.MarkDirty(t)
		r.cache.Put(t)
		newTable[bi] = uint64(bOff)
	}
	r.end = max(r.end, endCluster<<r.clusterBits)
	if err := r.cache.Flush(co); err != nil {
		discardNew()
		return err
	}
	oldOff, oldClusters := int64(r.h.ReftableOffset), int64(r.h.ReftableClusters)
	if err := r.switchReftableLocked(co, newTable, tableCluster<<r.clusterBits); err != nil {
		// The header may or may not point at the new table: both are
		// whole. Keep using the old one, which is a subset.
		discardNew()
		return err
	}
	// On failure the old table is merely leaked: the new structure is
	// in place and consistent, which is what the caller retries on.
	_ = r.updateDepthLocked(co, oldOff, oldClusters<<r.clusterBits, -1, 0)
	return nil
}

// areaLayout sizes a refcount area laid out from startCluster (every
// cluster from there on free): new refcount blocks for block indexes
// [firstBlock, total), then a reftable for all total blocks with half as
// much again of headroom, rounded to clusters and at least minEntries long.
// It is the fixed point at which blocks [0, total) cover the area itself.
func (r *refcounts) areaLayout(startCluster, firstBlock, minEntries int64) (total, tableEntries, endCluster int64, err error) {
	perBlock := int64(1) << r.blockBits
	perTableCluster := r.clusterSize / 8
	roundUp := func(n int64) int64 { return (n + perTableCluster - 1) / perTableCluster * perTableCluster }
	total = firstBlock + 1
	for {
		tableEntries = max(roundUp(total+(total+1)/2), roundUp(minEntries))
		endCluster = startCluster + (total - firstBlock) + tableEntries/perTableCluster
		if endCluster <= total*perBlock {
			break
		}
		total = (endCluster + perBlock - 1) / perBlock
	}
	if tableEntries*8 > maxReftableBytes {
		return 0, 0, 0, fmt.Errorf("refcount table would need %d bytes (limit %d): %w",
			tableEntries*8, maxReftableBytes, drivers.ErrNoSpace)
	}
	if endCluster > maxHostClusterOffset>>r.clusterBits {
		return 0, 0, 0, fmt.Errorf("refcount structures would pass the largest host offset: %w", drivers.ErrNoSpace)
	}
	return total, tableEntries, endCluster, nil
}

// switchReftableLocked writes table at tableOff and syncs it, then points
// the header at it (bytes 48-59, reftable offset and clusters, in one
// 12-byte sync write, so a crash sees the old table or the new one) and
// starts using it. The refcount blocks it names must be on disk already.
func (r *refcounts) switchReftableLocked(co *coroutine.Co, table []uint64, tableOff int64) error {
	r.mu.AssertHeld(co)
	buf := make([]byte, len(table)*8)
	for i, e := range table {
		binary.BigEndian.PutUint64(buf[i*8:], e)
	}
	if err := r.syncWriteLocked(co, buf, tableOff, 0); err != nil {
		return fmt.Errorf("writing the new refcount table at %#x: %w", tableOff, err)
	}
	clusters := uint32(int64(len(buf)) >> r.clusterBits)
	var hdr [12]byte
	binary.BigEndian.PutUint64(hdr[0:], uint64(tableOff))
	binary.BigEndian.PutUint32(hdr[8:], clusters)
	if err := r.syncWriteLocked(co, hdr[:], 48, olHeader); err != nil {
		return fmt.Errorf("switching the header to the new refcount table: %w", err)
	}
	r.reftable = table
	r.blocksStale = true
	r.h.ReftableOffset = uint64(tableOff)
	r.h.ReftableClusters = clusters
	return nil
}

// flushLocked writes back every dirty refcount block (after whatever they
// depend on) and syncs the file.
func (r *refcounts) flushLocked(co *coroutine.Co) error {
	r.mu.AssertHeld(co)
	return r.cache.Flush(co)
}

// writeLocked writes back every dirty refcount block without a sync.
func (r *refcounts) writeLocked(co *coroutine.Co) error {
	r.mu.AssertHeld(co)
	return r.cache.Write(co)
}
