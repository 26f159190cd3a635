package qcow2

import (
	"encoding/binary"
	"fmt"
	"math/bits"

	"imgfuse/cache"
	"imgfuse/coroutine"
	"imgfuse/drivers"
)

// clusterType is how a guest (sub)cluster reads (qcow2.md §1.6, §1.8;
// QEMU's QCow2SubclusterType).
type clusterType uint8

const (
	// ctUnallocated: no host cluster; reads the backing file, else zeros.
	ctUnallocated clusterType = iota
	// ctUnallocatedAlloc (extended L2 only): the host cluster exists but
	// this subcluster's bits are clear; reads like ctUnallocated.
	ctUnallocatedAlloc
	// ctZeroPlain: reads as zeros, never the backing file.
	ctZeroPlain
	// ctZeroAlloc: reads as zeros; a host cluster is preallocated but
	// must never be read.
	ctZeroAlloc
	// ctNormal: data at the host offset.
	ctNormal
	// ctCompressed: a compressed cluster (always a whole cluster).
	ctCompressed
)

var clusterTypeNames = [...]string{"unallocated", "unallocated-alloc", "zero-plain", "zero-alloc", "normal", "compressed"}

func (t clusterType) String() string {
	if int(t) < len(clusterTypeNames) {
		return clusterTypeNames[t]
	}
	return fmt.Sprintf("clusterType(%d)", t)
}

// hasHostOffset reports whether the type carries a host cluster offset
// (which must then be aligned, and contiguous along a run).
func (t clusterType) hasHostOffset() bool {
	return t == ctNormal || t == ctZeroAlloc || t == ctUnallocatedAlloc
}

// readsBacking reports whether the type reads from the backing layer.
func (t clusterType) readsBacking() bool {
	return t == ctUnallocated || t == ctUnallocatedAlloc
}

// l2Format is the cluster geometry of an image and how its L2 entries
// are laid out and decoded. It is derived from the header alone, so the
// checker, which may work from a header without an open image, decodes
// entries as the image does; the image embeds it. Immutable.
type l2Format struct {
	clusterBits uint32
	clusterSize int64
	// l2Bits is log2 of the entries per L2 table; l2EntryBytes is 8, or
	// 16 with extended L2.
	l2Bits       uint32
	l2EntryBytes int64
	// scBits is log2 of the subcluster size; scPerCluster is 32 with
	// extended L2 and 1 otherwise (a cluster is its own only subcluster).
	scBits       uint32
	scPerCluster int
	// version and dataFile are the header's: a zero flag is invalid in
	// v2, and with an external data file host offset 0 with COPIED is
	// guest cluster 0.
	version  uint32
	dataFile bool
}

func newL2Format(h *header) l2Format {
	f := l2Format{
		clusterBits: h.ClusterBits, clusterSize: h.clusterSize(),
		l2Bits: h.ClusterBits - 3, l2EntryBytes: 8,
		scBits: h.ClusterBits, scPerCluster: 1,
		version: h.Version, dataFile: h.hasDataFile(),
	}
	if h.extendedL2() {
		f.l2Bits, f.l2EntryBytes = h.ClusterBits-4, 16
		f.scBits, f.scPerCluster = h.ClusterBits-5, 32
	}
	return f
}

// l2Entry returns entry idx of an L2 table and, with extended L2, its
// subcluster bitmap.
func (f *l2Format) l2Entry(tb []byte, idx int64) (e, bitmap uint64) {
	e = binary.BigEndian.Uint64(tb[idx*f.l2EntryBytes:])
	if f.scPerCluster > 1 {
		bitmap = binary.BigEndian.Uint64(tb[idx*f.l2EntryBytes+8:])
	}
	return e, bitmap
}

// setL2Entry sets entry idx (and its bitmap with extended L2).
func (f *l2Format) setL2Entry(tb []byte, idx int64, e, bitmap uint64) {
	binary.BigEndian.PutUint64(tb[idx*f.l2EntryBytes:], e)
	if f.scPerCluster > 1 {
		binary.BigEndian.PutUint64(tb[idx*f.l2EntryBytes+8:], bitmap)
	}
}

// hostRun is the result of a lookup: a run of guest bytes with one type.
type hostRun struct {
	typ clusterType
	// n is the run length in bytes.
	n int64
	// host is the host offset of the run's first byte, in the data file,
	// for the types with hasHostOffset.
	host int64
	// l2e is the L2 entry of a ctCompressed cluster.
	l2e uint64
	// l2Off is the L2 table the run was mapped from (0: none), for the
	// read-side overlap check.
	l2Off int64
}

// mapLocked translates guest offset off (QEMU's qcow2_get_host_offset).
// On entry, n > 0 is the most bytes the caller wants from off and
// off+n <= the disk size; on exit, run.n (0 < run.n <= n) is the length
// from off that has the same type and, where the type has host offsets,
// contiguous ones. A run never crosses an L2 table, and a compressed run
// never crosses its cluster. Corruption in the metadata that off needs is
// an error wrapping drivers.ErrCorrupt; corruption further on merely ends
// the run before it, to be reported when (if) a read reaches it.
func (img *image) mapLocked(co *coroutine.Co, off, n int64) (hostRun, error) {
	img.mu.AssertHeld(co)
	s, err := img.sliceLocked(co, off, n, sliceRead)
	if err != nil {
		return hostRun{}, err
	}
	defer s.close()
	n = s.end - off // a run stops at the end of the L2 table
	if s.tb == nil {
		return hostRun{typ: ctUnallocated, n: n}, nil
	}
	cs := img.clusterSize
	inCluster := off & (cs - 1)
	var (
		run   = hostRun{l2Off: s.l2Off}
		count int64 // subclusters in the run so far
	)
	for i := range s.n {
		sc := 0
		if i == 0 {
			sc = int(inCluster >> img.scBits)
		}
		typ, same, host, err := s.typeAt(i, sc)
		if err != nil {
			if i == 0 {
				return hostRun{}, err
			}
			break // reported when a read gets there
		}
		if i == 0 {
			run.typ = typ
			if typ == ctCompressed {
				e, _ := s.entry(0)
				if coff, _ := img.compressedRange(e); coff >= img.fileSize {
					return hostRun{}, s.errorf(0, fmt.Errorf("compressed data at %#x is past the end of the file (%d bytes): %w",
						coff, img.fileSize, drivers.ErrCorrupt))
				}
				return hostRun{typ: ctCompressed, n: min(n, cs-inCluster), l2e: e, l2Off: s.l2Off}, nil
			}
			if typ.hasHostOffset() {
				run.host = int64(host) + inCluster
			}
		} else if typ != run.typ || (typ.hasHostOffset() && int64(host) != run.host-inCluster+i*cs) {
			break
		}
		count += int64(same)
		if sc+same < img.scPerCluster {
			break // the type changes inside this cluster
		}
	}
	scSize := int64(1) << img.scBits
	runBytes := count*scSize - (inCluster & (scSize - 1))
	run.n = min(n, runBytes)
	return run, nil
}

// l2Slice is a cursor over the L2 entries that one step of an operation
// covers: the clusters touching [off, end), all in one L2 table (QEMU's
// l2_slice with get_l2_entry, get_l2_bitmap and
// qcow2_get_subcluster_range_type). It pins the table once; the caller
// defers close. mapLocked, planWriteLocked, zeroStepLocked and linkLocked
// all walk L2 through it, and so do the check (tableSlice) and its repairs
// (tableSliceLocked), so entries are decoded, validated and reported in
// one way.
type l2Slice struct {
	// img is the image the table belongs to; nil for a table the
	// checker read itself (l2Format.tableSlice), whose cursor only
	// decodes: entry and guest, not typeAt, set or touched.
	img *image
	f   *l2Format
	// t is the pinned table, nil when the L1 entry has none (every entry
	// then reads as 0) or the table is not the cache's; tb is its bytes.
	t     *cache.Table
	tb    []byte
	l2Off int64
	// first is the table index of the slice's cluster 0, whose guest
	// offset is cstart.
	first, cstart int64
	// off and end are the guest bytes of the step, inside the table.
	off, end int64
	// n is the number of clusters touching [off, end).
	n int64
	// mode is how the slice was opened.
	mode sliceMode
}

// sliceMode says what a walk over L2 is for.
type sliceMode uint8

const (
	// sliceRead: a lookup for reading; a missing table reads as zeros
	// and a host cluster past the end of the file is corrupt.
	sliceRead sliceMode = iota
	// slicePlan: a lookup that plans a write; host clusters past the
	// end of the file are allowed (the write grows the file).
	slicePlan
	// sliceUpdate: the entries are about to change: the table is made
	// writable first (allocated or copied, l2TableForWriteLocked).
	sliceUpdate
)

// sliceLocked returns a cursor over the clusters touching [off, off+n),
// n cut at the end of the L2 table. With sliceUpdate the table is first
// made writable; otherwise a missing table gives a cursor whose entries
// are all 0.
func (img *image) sliceLocked(co *coroutine.Co, off, n int64, mode sliceMode) (l2Slice, error) {
	img.mu.AssertHeld(co)
	l1Index, l2Index, n := img.l2Slot(off, n)
	inCluster := off & (img.clusterSize - 1)
	s := l2Slice{img: img, f: &img.l2Format, first: l2Index, cstart: off - inCluster, off: off, end: off + n,
		n: (inCluster + n + img.clusterSize - 1) >> img.clusterBits, mode: mode}
	var l2Off uint64
	var err error
	if mode == sliceUpdate {
		var o int64
		o, err = img.l2TableForWriteLocked(co, l1Index)
		l2Off = uint64(o)
	} else {
		l2Off, err = img.l2OffsetLocked(co, l1Index)
	}
	if err != nil || l2Off == 0 {
		return s, err
	}
	s.l2Off = int64(l2Off)
	if s.t, err = img.l2.Get(co, s.l2Off); err != nil {
		return s, fmt.Errorf("L2 table at %#x: %w", l2Off, err)
	}
	s.tb = s.t.Bytes()
	return s, nil
}

// tableSlice returns a cursor over every entry of the L2 table of L1
// entry l1Index, at l2Off, whose bytes the caller read into tb itself:
// the checker's walk over the tables of the active and the snapshot L1
// tables, which reads the file, not the cache, and may have no image.
func (f *l2Format) tableSlice(l1Index, l2Off int64, tb []byte) l2Slice {
	n := int64(1) << f.l2Bits
	cstart := l1Index << (f.clusterBits + f.l2Bits)
	return l2Slice{f: f, tb: tb, l2Off: l2Off, cstart: cstart, off: cstart, end: cstart + n<<f.clusterBits, n: n, mode: sliceRead}
}

// tableSliceLocked returns a cursor over every entry of the L2 table of
// L1 entry l1Index, at l2Off, pinned in the L2 cache: for the repairs,
// which change entries with set and leave the writing to the cache, that
// is to the overlap-checked write of every L2 table (l2Backend). The
// caller has validated l2Off; the caller defers close.
func (img *image) tableSliceLocked(co *coroutine.Co, l1Index, l2Off int64) (l2Slice, error) {
	img.mu.AssertHeld(co)
	s := img.l2Format.tableSlice(l1Index, l2Off, nil)
	s.img, s.mode = img, sliceUpdate
	t, err := img.l2.Get(co, l2Off)
	if err != nil {
		return s, fmt.Errorf("L2 table at %#x: %w", l2Off, err)
	}
	s.t, s.tb = t, t.Bytes()
	return s, nil
}

// close unpins the table.
func (s *l2Slice) close() {
	if s.t != nil {
		s.img.l2.Put(s.t)
		s.t, s.tb = nil, nil
	}
}

// entry returns the L2 entry of cluster i of the slice and, with extended
// L2, its subcluster bitmap.
func (s *l2Slice) entry(i int64) (e, bitmap uint64) {
	if s.tb == nil {
		return 0, 0
	}
	return s.f.l2Entry(s.tb, s.first+i)
}

// set sets the entry (and bitmap) of cluster i and marks the table dirty.
// The slice was opened for a write, so the table exists in the cache.
func (s *l2Slice) set(i int64, e, bitmap uint64) {
	s.f.setL2Entry(s.tb, s.first+i, e, bitmap)
	s.img.l2.MarkDirty(s.t)
}

// guest returns the guest offset of cluster i.
func (s *l2Slice) guest(i int64) int64 { return s.cstart + i<<s.f.clusterBits }

// touched returns the subclusters [scA, scB) of cluster i inside the step.
func (s *l2Slice) touched(i int64) (int, int) { return s.img.touched(s.guest(i), s.off, s.end) }

// typeAt classifies subcluster sc of cluster i (entryRange) and validates
// its host offset: the type, how many subclusters from sc share it, and
// the host cluster for the types with one.
func (s *l2Slice) typeAt(i int64, sc int) (clusterType, int, uint64, error) {
	e, bm := s.entry(i)
	typ, span, err := s.img.entryRange(e, bm, sc)
	host := e & l2eOffsetMask
	if err == nil && typ.hasHostOffset() {
		err = s.img.checkHostCluster(typ, host, s.guest(i), s.mode == sliceRead)
	}
	if err != nil {
		return 0, 0, 0, s.errorf(i, err)
	}
	return typ, span, host, nil
}

// errorf names the entry of cluster i in err.
func (s *l2Slice) errorf(i int64, err error) error {
	return fmt.Errorf("L2 table at %#x, entry %d (guest offset %#x): %w", s.l2Off, s.first+i, s.guest(i), err)
}

// l2OffsetLocked returns the L2 table offset of L1 entry l1Index, 0 if the
// entry is unallocated or past the end of L1.
func (img *image) l2OffsetLocked(co *coroutine.Co, l1Index int64) (uint64, error) {
	img.mu.AssertHeld(co)
	if l1Index >= img.l1Entries() {
		return 0, nil
	}
	if img.l1Short && l1Index >= img.l1Avail {
		return 0, fmt.Errorf("L1 entry %d lies past the end of the file (%d bytes): truncated image: %w", l1Index, img.fileSize, drivers.ErrCorrupt)
	}
	e, err := img.l1EntryLocked(co, l1Index)
	if err != nil {
		return 0, err
	}
	if e&l1eReservedMask != 0 {
		return 0, fmt.Errorf("L1 entry %d (%#x) has reserved bits set: %w", l1Index, e, drivers.ErrCorrupt)
	}
	off := e & l1eOffsetMask
	if off == 0 {
		return 0, nil
	}
	if off&uint64(img.clusterSize-1) != 0 {
		return 0, fmt.Errorf("L1 entry %d: L2 table offset %#x is not cluster-aligned: %w", l1Index, off, drivers.ErrCorrupt)
	}
	if pastEOF(off, uint64(img.clusterSize), img.fileSize) {
		return 0, fmt.Errorf("%w", l2PastEOF(l1Index, off, img.fileSize))
	}
	return off, nil
}

// checkHostCluster validates the host cluster offset of a type that has
// one: aligned; equal to the guest offset in an external data file; and,
// with eof, for data read from the image file itself, inside the file.
func (img *image) checkHostCluster(typ clusterType, host uint64, guest int64, eof bool) error {
	if host&uint64(img.clusterSize-1) != 0 {
		return fmt.Errorf("host cluster offset %#x is not cluster-aligned: %w", host, drivers.ErrCorrupt)
	}
	if img.h.hasDataFile() {
		if host != uint64(guest) {
			return fmt.Errorf("external data file host offset %#x differs from the guest offset %#x: %w",
				host, guest, drivers.ErrCorrupt)
		}
		return nil
	}
	if eof && typ == ctNormal && host >= uint64(img.fileSize) {
		return fmt.Errorf("host cluster offset %#x is past the end of the file (%d bytes): %w",
			host, img.fileSize, drivers.ErrCorrupt)
	}
	return nil
}

// entryRange classifies subcluster sc of the cluster described by L2 entry
// e and, with extended L2, its bitmap (QEMU's
// qcow2_get_subcluster_range_type). It returns the type and how many
// subclusters from sc to the end of the cluster have that type (at least
// 1). Without extended L2 a cluster is a single subcluster.
func (f *l2Format) entryRange(e, bitmap uint64, sc int) (clusterType, int, error) {
	extL2 := f.scPerCluster > 1
	rest := f.scPerCluster - sc
	if e&oflagCompressed != 0 {
		if f.dataFile {
			return 0, 0, fmt.Errorf("compressed cluster %#x in an image with an external data file: %w",
				e, drivers.ErrCorrupt)
		}
		if bitmap != 0 {
			return 0, 0, fmt.Errorf("compressed cluster %#x has a subcluster bitmap %#x: %w",
				e, bitmap, drivers.ErrCorrupt)
		}
		return ctCompressed, rest, nil
	}
	if e&l2eStdReservedMk != 0 {
		return 0, 0, fmt.Errorf("L2 entry %#x has reserved bits set: %w", e, drivers.ErrCorrupt)
	}
	host := e & l2eOffsetMask
	// Offset 0 is ambiguous with an external data file, where guest
	// cluster 0 lives at host offset 0; there every allocated cluster has
	// refcount 1, so COPIED tells them apart.
	unallocated := host == 0 && !(f.dataFile && e&oflagCopied != 0)
	if e&oflagZero != 0 {
		// "With version 2 or with extended L2 entries, this is always 0."
		if f.version < 3 || extL2 {
			return 0, 0, fmt.Errorf("L2 entry %#x has the zero flag, invalid in this image (v%d, extended L2 %t): %w",
				e, f.version, extL2, drivers.ErrCorrupt)
		}
		if host != 0 {
			return ctZeroAlloc, 1, nil
		}
		return ctZeroPlain, 1, nil
	}
	if !extL2 {
		if unallocated {
			return ctUnallocated, 1, nil
		}
		return ctNormal, 1, nil
	}

	// Extended L2: bits 0-31 of the bitmap say "allocated" and bits
	// 32-63 "reads as zero", for subclusters 0-31, LSB first.
	alloc, zero := uint32(bitmap), uint32(bitmap>>32)
	if unallocated {
		if alloc != 0 {
			return 0, 0, fmt.Errorf("unallocated cluster has allocation bitmap %#x: %w", alloc, drivers.ErrCorrupt)
		}
		if zero&(1<<sc) != 0 {
			return ctZeroPlain, onesFrom(zero, sc), nil
		}
		return ctUnallocated, zerosFrom(zero, sc), nil
	}
	if alloc&zero != 0 {
		return 0, 0, fmt.Errorf("subclusters %#x are both allocated and zero: %w", alloc&zero, drivers.ErrCorrupt)
	}
	switch {
	case zero&(1<<sc) != 0:
		return ctZeroAlloc, onesFrom(zero, sc), nil
	case alloc&(1<<sc) != 0:
		return ctNormal, onesFrom(alloc, sc), nil
	default:
		return ctUnallocatedAlloc, zerosFrom(alloc|zero, sc), nil
	}
}

// onesFrom counts consecutive set bits of b from bit i up (at most 32-i).
func onesFrom(b uint32, i int) int { return min(bits.TrailingZeros32(^(b >> i)), 32-i) }

// zerosFrom counts consecutive clear bits of b from bit i up (at most 32-i).
func zerosFrom(b uint32, i int) int { return min(bits.TrailingZeros32(b>>i), 32-i) }

// compressedRange decodes a compressed cluster descriptor (qcow2.md §1.7):
// the host byte offset of the compressed stream and how many bytes to read
// from it. The stream need not fill them: the tail sector may hold the next
// cluster's stream, and the range may run past the end of the file.
func (f *l2Format) compressedRange(e uint64) (coff, csize int64) {
	x := 62 - (f.clusterBits - 8) // bits 0..x-1: offset; x..61: sectors-1
	coff = int64(e & (1<<x - 1))
	sectors := int64((e>>x)&(1<<(f.clusterBits-8)-1)) + 1
	csize = sectors*512 - coff&511
	return coff, csize
}

// l2Slot locates guest offset off in the mapping tables: the L1 index of
// its L2 table, its index in that table, and n cut so that [off, off+n)
// stays inside the one L2 table (a step of any operation never crosses it).
func (img *image) l2Slot(off, n int64) (l1Index, l2Index, clamped int64) {
	l2Entries := int64(1) << img.l2Bits
	l2Index = (off >> img.clusterBits) & (l2Entries - 1)
	l1Index = off >> (img.clusterBits + img.l2Bits)
	inCluster := off & (img.clusterSize - 1)
	return l1Index, l2Index, min(n, (l2Entries-l2Index)<<img.clusterBits-inCluster)
}
