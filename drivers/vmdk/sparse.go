package vmdk

import (
	"fmt"

	"imgfuse/aio"
	"imgfuse/cache"
	"imgfuse/coroutine"
	"imgfuse/drivers"
	"imgfuse/drivers/blocktab"
)

// maxWritableGrain bounds the grain of a writable extent, which an
// allocation writes whole from one buffer (QEMU's are 64 KiB), and of a
// compressed one, whose reader takes two grains' worth at once.
const maxWritableGrain = 1 << 20

// sparse is a hosted sparse extent (KDMV): its header, grain directory
// (and redundant one) and grain tables.
type sparse struct {
	// Immutable after openSparse.
	f          *aio.File
	path       string
	h          *sparseHeader
	grainBytes int64
	gtBytes    int64 // one grain table: numGTEs × 4
	readOnly   bool
	// start is the extent's offset on the disk: where a grain left to
	// the parent is read from the parent.
	start int64
	// gd and rgd are the grain directory and its redundant copy (nil if
	// the extent has none), read through the metadata cache.
	gd, rgd *blocktab.Table
	// gts caches grain tables, keyed by their file offset.
	gts *cache.Cache

	// Protected by the image's mu.
	//
	// next is the sector of the next grain to allocate: the file's end at
	// open, rounded up to a grain (as QEMU), then past each allocation.
	next int64
	// end is the file size as known: at open, grown by allocations. A
	// read past it reads zeros, as a read past a file's end does in QEMU.
	end int64
}

// openSparse reads the header of the sparse extent f (of fileSize bytes)
// and sets up its tables. It must not be called from a coroutine.
func openSparse(f *aio.File, path string, fileSize int64, mu *coroutine.CoMutex, cacheBytes int64, readOnly bool) (*sparse, error) {
	buf := aio.AlignedBuffer(headerBytes)
	if fileSize < headerBytes {
		return nil, fmt.Errorf("sparse extent of %d bytes, shorter than its header: %w", fileSize, drivers.ErrCorrupt)
	}
	if err := f.Pread(buf, 0); err != nil {
		return nil, err
	}
	h, err := parseSparseHeader(buf, fileSize)
	if err != nil {
		return nil, err
	}
	if h.gdOff < 0 {
		// VMware's streamOptimized layout: the footer, a copy of the
		// header with the real grain directory offset, sits 1024 bytes
		// before the end, behind a footer marker and before the
		// end-of-stream marker.
		if !h.compressed() || fileSize < 3*sector {
			return nil, fmt.Errorf("grain directory at the end without a streamOptimized footer: %w", drivers.ErrCorrupt)
		}
		tail := aio.AlignedBuffer(3 * sector)
		if err := f.Pread(tail, fileSize-3*sector); err != nil {
			return nil, err
		}
		if le.Uint32(tail[12:]) != markerFooter || le.Uint32(tail[2*sector+12:]) != markerEOS {
			return nil, fmt.Errorf("no footer and end-of-stream markers at the end of the file: %w", drivers.ErrCorrupt)
		}
		if h, err = parseSparseHeader(tail[sector:2*sector], fileSize); err != nil {
			return nil, fmt.Errorf("footer: %w", err)
		}
		if h.gdOff < 0 {
			return nil, fmt.Errorf("footer without a grain directory offset: %w", drivers.ErrCorrupt)
		}
	}
	s := &sparse{f: f, path: path, h: h, grainBytes: h.grainSize * sector, gtBytes: h.numGTEs * 4, readOnly: readOnly, end: fileSize}
	if h.compressed() && s.grainBytes > maxWritableGrain {
		return nil, fmt.Errorf("compressed grains of %d bytes (at most %d): %w", s.grainBytes, maxWritableGrain, drivers.ErrUnsupported)
	}
	if !readOnly && s.grainBytes > maxWritableGrain {
		return nil, fmt.Errorf("grains of %d bytes are read-only here (at most %d written): %w", s.grainBytes, maxWritableGrain, drivers.ErrUnsupported)
	}
	n := h.gdEntries()
	s.gd = blocktab.New(f, path+" grain directory", h.gdOff*sector, n, le, cacheBytes/8, mu)
	if h.rgdOff != 0 {
		s.rgd = blocktab.New(f, path+" redundant grain directory", h.rgdOff*sector, n, le, cacheBytes/8, mu)
	}
	tableSize := (s.gtBytes + sector - 1) / sector * sector
	slots := min(max(cacheBytes/tableSize, 4), max(n, 1))
	s.gts = cache.New(path+" grain tables", int(slots), int(tableSize), gtBackend{s})
	s.next = (fileSize/sector + h.grainSize - 1) / h.grainSize * h.grainSize
	return s, nil
}

// Stream markers (streamOptimized): u64 sectors, u32 size (0 for a
// metadata marker), u32 type.
const (
	markerEOS    = 0
	markerFooter = 3
)

// writable reports whether QEMU would write the extent: not a compressed
// (streamOptimized) one, whose grains QEMU only appends whole, and not a
// version 3 one without compression (changed-block tracking).
func (s *sparse) writable() bool { return !s.h.compressed() && s.h.version < 3 }

func (s *sparse) whyReadOnly() string {
	if s.h.compressed() {
		return "compressed grains, as in QEMU"
	}
	return "version 3 without compression, as in QEMU"
}

// gtBackend reads grain tables for the cache: numGTEs × 4 bytes, the rest
// of the slot zeros. Entries are written through (setGTELocked); tables
// are never dirty.
type gtBackend struct{ s *sparse }

func (b gtBackend) ReadTable(co *coroutine.Co, off int64, p []byte) error {
	clear(p[b.s.gtBytes:])
	return b.s.f.PreadCo(co, p[:b.s.gtBytes], off)
}

func (b gtBackend) WriteTable(co *coroutine.Co, off int64, p []byte) error {
	return fmt.Errorf("grain table at %#x written back: tables are never dirty", off)
}

func (b gtBackend) Sync(co *coroutine.Co) error { return b.s.f.FdatasyncCo(co) }

// grainRef is where a grain's entry lives and what it says.
type grainRef struct {
	gtOff int64  // file offset of its grain table; 0 if the GD entry is 0
	gte   uint32 // the entry: 0 unallocated, gteZeroed, or a sector
}

// gtOffLocked returns the file offset of grain table i of directory gd, 0
// if the entry is 0, after checking the table lies inside the file.
func (s *sparse) gtOffLocked(co *coroutine.Co, gd *blocktab.Table, i int64) (int64, error) {
	v, err := gd.GetLocked(co, i)
	if err != nil {
		return 0, fmt.Errorf("vmdk: %s: grain directory: %w", s.path, err)
	}
	if v == 0 {
		return 0, nil
	}
	off := int64(v) * sector
	if off+s.gtBytes > s.end {
		return 0, fmt.Errorf("vmdk: %s: grain table %d at sector %d past the end of the file: %w", s.path, i, v, drivers.ErrCorrupt)
	}
	return off, nil
}

// lookupLocked returns grain g's entry. On entry the caller holds mu.
func (s *sparse) lookupLocked(co *coroutine.Co, g int64) (grainRef, error) {
	gtOff, err := s.gtOffLocked(co, s.gd, g/s.h.numGTEs)
	if err != nil || gtOff == 0 {
		return grainRef{}, err
	}
	t, err := s.gts.Get(co, gtOff)
	if err != nil {
		return grainRef{}, fmt.Errorf("vmdk: %s: grain table at %#x: %w", s.path, gtOff, err)
	}
	gte := le.Uint32(t.Bytes()[g%s.h.numGTEs*4:])
	s.gts.Put(t)
	return grainRef{gtOff: gtOff, gte: gte}, nil
}

// zeroed reports whether the entry is a zeroed grain.
func (s *sparse) zeroed(gte uint32) bool {
	return gte == gteZeroed && s.h.flags&flagZeroedGrain != 0
}

// hostLocked returns the file offset of an allocated, uncompressed grain,
// -1 if it reads as zeros (unallocated or zeroed). A grain starting past
// the end of the file is corrupt (qemu-img check's one test).
func (s *sparse) hostLocked(r grainRef) (int64, error) {
	if r.gte == 0 || s.zeroed(r.gte) {
		return -1, nil
	}
	off := int64(r.gte) * sector
	if off >= s.end || off < s.h.overHead*sector && !s.h.compressed() {
		return 0, fmt.Errorf("vmdk: %s: grain at sector %d outside the grain area of the file (%d bytes): %w",
			s.path, r.gte, s.end, drivers.ErrCorrupt)
	}
	return off, nil
}

func (d *Driver) lookup(co *coroutine.Co, s *sparse, g int64) (grainRef, int64, int64, error) {
	d.mu.Lock(co)
	defer d.mu.Unlock(co)
	r, err := s.lookupLocked(co, g)
	if err != nil {
		return r, 0, 0, err
	}
	host, err := s.hostLocked(r)
	return r, host, s.end, err
}

// readSparse fills q from offset in of the extent, grain by grain; each
// grain is looked up under mu and read without it.
func (d *Driver) readSparse(co *coroutine.Co, s *sparse, q []byte, in int64) error {
	return blocktab.Split(in, int64(len(q)), s.grainBytes, func(pc blocktab.Piece) error {
		p := q[pc.Pos : pc.Pos+pc.Len]
		r, host, end, err := d.lookup(co, s, pc.Block)
		if err != nil {
			return err
		}
		if host < 0 && r.gte == 0 {
			// Unallocated: the parent's (zeros without one).
			return d.readParent(co, p, s.start+pc.Block*s.grainBytes+pc.In)
		}
		if host < 0 {
			clear(p)
			return nil
		}
		if s.h.compressed() {
			return s.readCompressed(co, p, host, end, pc)
		}
		at := host + pc.In
		n := max(min(int64(len(p)), end-at), 0)
		clear(p[n:])
		if n == 0 {
			return nil
		}
		if err := s.f.PreadCo(co, p[:n], at); err != nil {
			return fmt.Errorf("vmdk: %w", err)
		}
		return nil
	})
}

// writeSparse writes q at offset in of the extent, grain by grain: in
// place into allocated grains, through allocate into the others.
func (d *Driver) writeSparse(co *coroutine.Co, s *sparse, q []byte, in int64) error {
	return blocktab.Split(in, int64(len(q)), s.grainBytes, func(pc blocktab.Piece) error {
		p := q[pc.Pos : pc.Pos+pc.Len]
		_, host, _, err := d.lookup(co, s, pc.Block)
		if err != nil {
			return err
		}
		if host < 0 {
			if host, err = d.allocate(co, s, p, pc); err != nil || host < 0 {
				return err
			}
		}
		if err := s.f.PwriteCo(co, p, host+pc.In); err != nil {
			return fmt.Errorf("vmdk: %w", err)
		}
		return nil
	})
}

// allocate gives grain pc.Block a grain of the file and writes p into it,
// in QEMU's order with the flush QEMU lacks (docs/formats.md §2.7):
//
//  1. the whole grain at the next grain sector, past every grain in
//     use: p, and around it what the grain read as before, QEMU's
//     copy-on-write (get_whole_cluster): the parent's bytes for an
//     unallocated grain of a delta link, zeros for a zeroed grain or
//     without a parent;
//  2. fdatasync: the data is on disk before anything points at it;
//  3. the grain table entry;
//  4. the redundant grain table entry.
//
// A crash before 3 leaves the entry as it was and the grain leaked past
// the old end (the next open allocates after it: space lost, never a
// stale byte shown); one between 3 and 4 leaves the redundant table one
// entry behind, which QEMU never reads. A grain whose grain table does not
// exist (a GD entry of 0; QEMU preallocates every table) is refused: QEMU
// writes such a grain over the header (docs/formats.md §7). It returns -1
// when the grain was allocated with p, or the host offset of the grain if
// another writer allocated it meanwhile (the caller writes p in place).
func (d *Driver) allocate(co *coroutine.Co, s *sparse, p []byte, pc blocktab.Piece) (int64, error) {
	d.allocMu.Lock(co)
	defer d.allocMu.Unlock(co)
	d.mu.Lock(co)
	r, err := s.lookupLocked(co, pc.Block)
	var host int64 = -1
	if err == nil {
		host, err = s.hostLocked(r)
	}
	at := s.next
	d.mu.Unlock(co)
	if err != nil || host >= 0 {
		return host, err
	}
	if r.gtOff == 0 {
		return 0, fmt.Errorf("vmdk: %s: grain %d has no grain table (grain directory entry 0); creating grain tables is not supported: %w",
			s.path, pc.Block, drivers.ErrUnsupported)
	}
	if at+s.h.grainSize > maxExtentSectors {
		return 0, fmt.Errorf("vmdk: %s: the extent file is full (grain entries address 2 TiB): %w", s.path, drivers.ErrNoSpace)
	}
	buf := aio.AlignedBuffer(int(s.grainBytes))
	if r.gte == 0 && d.parent != nil && int64(len(p)) < s.grainBytes {
		// The grain's part of the disk: the last grain of an extent may
		// be cut by the extent's end (the rest of it stays zeros).
		gStart := pc.Block * s.grainBytes
		n := min(s.grainBytes, s.h.capacity*sector-gStart)
		if err := d.readParent(co, buf[:n], s.start+gStart); err != nil {
			return 0, err
		}
	}
	copy(buf[pc.In:], p)
	if err := s.f.PwriteCo(co, buf, at*sector); err != nil {
		return 0, fmt.Errorf("vmdk: %w", err)
	}
	if err := s.f.FdatasyncCo(co); err != nil {
		return 0, fmt.Errorf("vmdk: %w", err)
	}
	d.mu.Lock(co)
	defer d.mu.Unlock(co)
	s.next = at + s.h.grainSize
	s.end = max(s.end, s.next*sector)
	if err := s.setGTELocked(co, pc.Block, r.gtOff, uint32(at)); err != nil {
		return 0, err
	}
	return -1, nil
}

// setGTELocked sets grain g's entry to v: the primary table (cache and
// file), then the redundant one if the extent has it. The caller holds
// mu.
func (s *sparse) setGTELocked(co *coroutine.Co, g, gtOff int64, v uint32) error {
	t, err := s.gts.Get(co, gtOff)
	if err != nil {
		return fmt.Errorf("vmdk: %s: grain table at %#x: %w", s.path, gtOff, err)
	}
	defer s.gts.Put(t)
	var b [4]byte
	le.PutUint32(b[:], v)
	in := g % s.h.numGTEs * 4
	if err := s.f.PwriteCo(co, b[:], gtOff+in); err != nil {
		return fmt.Errorf("vmdk: %s: grain table entry: %w", s.path, err)
	}
	copy(t.Bytes()[in:], b[:])
	if s.rgd == nil {
		return nil
	}
	rgtOff, err := s.gtOffLocked(co, s.rgd, g/s.h.numGTEs)
	if err != nil || rgtOff == 0 {
		return err
	}
	if err := s.f.PwriteCo(co, b[:], rgtOff+in); err != nil {
		return fmt.Errorf("vmdk: %s: redundant grain table entry: %w", s.path, err)
	}
	return nil
}

// zeroSparse makes [in, in+n) of the extent read as zeros: a whole grain
// becomes a zeroed grain if the extent has them (its old grain leaks, as
// in QEMU); otherwise an allocated grain gets zeros written, an
// unallocated one of a delta link is allocated with zeros (QEMU's block
// layer writes zeros when the driver cannot record them), and an
// unallocated one without a parent or a zeroed one is left alone.
func (d *Driver) zeroSparse(co *coroutine.Co, s *sparse, in, n int64) error {
	return blocktab.Split(in, n, s.grainBytes, func(pc blocktab.Piece) error {
		if pc.Len == s.grainBytes && s.h.flags&flagZeroedGrain != 0 {
			d.mu.Lock(co)
			defer d.mu.Unlock(co)
			r, err := s.lookupLocked(co, pc.Block)
			if err != nil || r.gtOff == 0 || s.zeroed(r.gte) {
				return err
			}
			return s.setGTELocked(co, pc.Block, r.gtOff, gteZeroed)
		}
		r, host, _, err := d.lookup(co, s, pc.Block)
		if err != nil {
			return err
		}
		if host < 0 && r.gte == 0 && d.parent != nil {
			return d.writeSparse(co, s, make([]byte, pc.Len), pc.Block*s.grainBytes+pc.In)
		}
		if host < 0 {
			return nil
		}
		return writeZeros(co, s.f, host+pc.In, pc.Len)
	})
}

// zeroChunk bounds one write of zeros.
const zeroChunk = 1 << 20

func writeZeros(co *coroutine.Co, f *aio.File, off, n int64) error {
	z := aio.AlignedBuffer(int(min(n, zeroChunk)))
	for done := int64(0); done < n; {
		c := min(n-done, zeroChunk)
		if err := f.PwriteCo(co, z[:c], off+done); err != nil {
			return fmt.Errorf("vmdk: %w", err)
		}
		done += c
	}
	return nil
}

// statusRun bounds how many grains one block status answer covers.
const statusRun = 1024

// sparseStatus describes the extent from offset in (size bytes long): a
// run of grains of one kind (unallocated, zeroed, data at consecutive
// offsets, compressed).
func (d *Driver) sparseStatus(co *coroutine.Co, s *sparse, in, size int64) (drivers.LayerStatus, error) {
	d.mu.Lock(co)
	defer d.mu.Unlock(co)
	kind := func(g int64) (int, int64, error) {
		r, err := s.lookupLocked(co, g)
		if err != nil {
			return 0, 0, err
		}
		host, err := s.hostLocked(r)
		switch {
		case err != nil:
			return 0, 0, err
		case r.gte == 0:
			return 0, 0, nil
		case host < 0:
			return 1, 0, nil
		case s.h.compressed():
			return 2, 0, nil
		}
		return 3, host, nil
	}
	g := in / s.grainBytes
	k, host, err := kind(g)
	if err != nil {
		return drivers.LayerStatus{}, err
	}
	end := (g + 1) * s.grainBytes
	for i := int64(1); i < statusRun && end < size; i++ {
		k2, h2, err := kind(g + i)
		if err != nil || k2 != k || (k == 3 && h2 != host+i*s.grainBytes) {
			break
		}
		end += s.grainBytes
	}
	st := drivers.LayerStatus{Len: min(end, size) - in}
	switch k {
	case 1:
		st.Zero = true
	case 2:
		st.Data = true
	case 3:
		st.Data, st.HasOffset, st.Offset = true, true, host+in%s.grainBytes
	}
	return st, nil
}
