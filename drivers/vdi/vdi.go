package vdi

import (
	"fmt"
	"sync/atomic"
	"syscall"

	"imgfuse/aio"
	"imgfuse/coroutine"
	"imgfuse/drivers"
	"imgfuse/drivers/blocktab"
)

// Format is the VDI format (VirtualBox), qemu-img's "vdi".
type Format struct{}

var _ drivers.Format = Format{}

func (Format) Name() string { return "vdi" }

// Probe: the signature at 0x40, score 100 (header.go).
func (Format) Probe(in drivers.ProbeInput) int { return probe(in) }

// Open opens the VDI image at path. It must not be called from a
// coroutine.
func (Format) Open(path string, opts drivers.OpenOptions) (drivers.Driver, error) {
	return Open(path, opts)
}

// defaultCacheBytes bounds the block map cache when OpenOptions.CacheSize
// is 0: 4 MiB of map is 1M entries, a 1 TiB disk.
const defaultCacheBytes = 4 << 20

// Driver is an open VDI image.
type Driver struct {
	// Immutable after Open.
	f        *aio.File
	path     string
	readOnly bool
	size     int64
	dataOff  int64
	blocks   int64
	static   bool // a static image: every block allocated at creation

	// mu is the metadata lock: it protects the block map cache (bmap),
	// hdr and next. Lock order: allocMu, then mu.
	mu   coroutine.CoMutex
	bmap *blocktab.Table
	hdr  *header
	// next is the index the next allocated block gets: the header's
	// count, or one past the highest index the map uses if that is more
	// (a crash between the map entry and the count; see doc.go).
	next int64

	// allocMu serialises allocations: each writes a whole block, syncs
	// it and publishes it (map entry, then count) before the next
	// starts, so a crash leaves at most the last one half done. Held
	// across data I/O; never taken by reads or writes to allocated
	// blocks.
	allocMu coroutine.CoMutex
	// blockBuf is the 1 MiB an allocation writes, made at the first one.
	// Protected by allocMu: each image has its own (a buffer shared by
	// every image of the process was written by one image's allocation
	// while another's write was reading it).
	blockBuf []byte

	// damage is the first problem the open found (drivers.Damaged).
	damage atomic.Pointer[drivers.DamageError]
}

var (
	_ drivers.Driver      = (*Driver)(nil)
	_ drivers.Informer    = (*Driver)(nil)
	_ drivers.Allocator   = (*Driver)(nil)
	_ drivers.FileLister  = (*Driver)(nil)
	_ drivers.LayerMapper = (*Driver)(nil)
	_ drivers.Checker     = (*Driver)(nil)
	_ drivers.Damaged     = (*Driver)(nil)
)

// Open opens the VDI image at path. It must not be called from a
// coroutine.
func Open(path string, opts drivers.OpenOptions) (*Driver, error) {
	if opts.Snapshot != "" {
		return nil, fmt.Errorf("vdi: %s: snapshot %q: VDI images have no internal snapshots: %w",
			path, opts.Snapshot, drivers.ErrUnsupported)
	}
	f, err := aio.Open(path, aio.Options{ReadOnly: opts.ReadOnly, NoDirectIO: opts.NoDirectIO, NoLock: opts.ForceShare})
	if err != nil {
		return nil, fmt.Errorf("vdi: %w", err)
	}
	d, err := open(f, path, opts)
	if err != nil {
		f.Close()
		return nil, err
	}
	return d, nil
}

func open(f *aio.File, path string, opts drivers.OpenOptions) (*Driver, error) {
	fileSize, err := f.Size()
	if err != nil {
		return nil, fmt.Errorf("vdi: %w", err)
	}
	buf := aio.AlignedBuffer(headerBytes)
	if err := f.Pread(buf, 0); err != nil {
		return nil, fmt.Errorf("vdi: %w", err)
	}
	h, err := parseHeader(buf, fileSize)
	if err != nil {
		return nil, fmt.Errorf("vdi: %s: %w", path, err)
	}
	d := &Driver{f: f, path: path, readOnly: opts.ReadOnly, size: h.diskSize, dataOff: h.dataOff, blocks: h.blocks, hdr: h, static: h.imageType == typeStatic}
	cacheBytes := opts.CacheSize
	if cacheBytes <= 0 {
		cacheBytes = defaultCacheBytes
	}
	d.bmap = blocktab.New(f, path+" block map", h.bmapOff, h.blocks, le, cacheBytes, &d.mu)

	// One pass over the map: the highest index in use (where the next
	// block goes) and entries that point outside the image's blocks.
	maxIdx, used := int64(-1), int64(0)
	var bad error
	err = d.bmap.ScanAll(func(i int64, v uint32) error {
		if v >= firstSpecialEnt {
			return nil
		}
		used++
		if int64(v) >= h.blocks {
			if bad == nil {
				bad = fmt.Errorf("block %d maps to index %d, past the image's %d blocks: %w", i, v, h.blocks, drivers.ErrCorrupt)
			}
			return nil
		}
		maxIdx = max(maxIdx, int64(v))
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("vdi: %s: reading the block map: %w", path, err)
	}
	if bad != nil {
		if !opts.ReadOnly {
			return nil, fmt.Errorf("vdi: %s: %w", path, bad)
		}
		d.damage.Store(&drivers.DamageError{Format: "vdi", Path: path, Err: bad})
	}
	d.next = max(h.allocated, maxIdx+1)
	if !opts.ReadOnly && opts.Repair {
		return d, nil // a check reports the count as it is
	}
	if !opts.ReadOnly && h.allocated < maxIdx+1 && used == maxIdx+1 {
		// A crash between a map entry and the count: the map is whole
		// and dense, the count one step behind. Bring it up to date.
		h.setAllocated(maxIdx + 1)
		if err := f.Pwrite(h.raw[:], 0); err != nil {
			return nil, fmt.Errorf("vdi: %s: updating the allocated count: %w", path, err)
		}
		if opts.Logf != nil {
			opts.Logf("vdi: %s: allocated count raised to %d to match the block map", path, maxIdx+1)
		}
	}
	return d, nil
}

// Size is the disk size: the header's, rounded up to 512 bytes.
func (d *Driver) Size() int64 { return d.size }

// Files implements drivers.FileLister.
func (d *Driver) Files() []drivers.ChainFile {
	return []drivers.ChainFile{{Path: d.path, Role: "image"}}
}

// Damage implements drivers.Damaged.
func (d *Driver) Damage() error { return drivers.LayerDamage(d.damage.Load(), nil) }

// check keeps [off, off+n) inside the disk.
func (d *Driver) check(op string, off, n int64) error {
	return drivers.InDisk("vdi", d.path, op, off, n, d.size, syscall.EINVAL)
}

// checkWrite keeps a write inside the disk, which never grows.
func (d *Driver) checkWrite(op string, off, n int64) error {
	return drivers.InDisk("vdi", d.path, op, off, n, d.size, drivers.ErrNoSpace)
}

// lookup returns block b's host offset, or -1 if it reads as zeros.
func (d *Driver) lookup(co *coroutine.Co, b int64) (int64, error) {
	d.mu.Lock(co)
	defer d.mu.Unlock(co)
	return d.lookupLocked(co, b)
}

func (d *Driver) lookupLocked(co *coroutine.Co, b int64) (int64, error) {
	v, err := d.bmap.GetLocked(co, b)
	if err != nil {
		return 0, fmt.Errorf("vdi: %s: block map: %w", d.path, err)
	}
	if v >= firstSpecialEnt {
		return -1, nil
	}
	if int64(v) >= d.blocks {
		return 0, fmt.Errorf("vdi: %s: block %d maps to index %d, past the image's %d blocks: %w",
			d.path, b, v, d.blocks, drivers.ErrCorrupt)
	}
	return d.dataOff + int64(v)*blockSize, nil
}

// ReadAt fills p from off; [off, off+len(p)) must lie inside the disk.
// Each block is looked up under mu and read without it.
func (d *Driver) ReadAt(co *coroutine.Co, p []byte, off int64) (int, error) {
	if err := d.check("read", off, int64(len(p))); err != nil {
		return 0, err
	}
	err := blocktab.Split(off, int64(len(p)), blockSize, func(pc blocktab.Piece) error {
		q := p[pc.Pos : pc.Pos+pc.Len]
		host, err := d.lookup(co, pc.Block)
		if err != nil {
			return err
		}
		if host < 0 {
			clear(q)
			return nil
		}
		if err := d.f.PreadCo(co, q, host+pc.In); err != nil {
			return fmt.Errorf("vdi: %w", err)
		}
		return nil
	})
	if err != nil {
		return 0, err
	}
	return len(p), nil
}

// WriteAt writes p at off, inside the disk. A write into an allocated
// block goes in place; one into an unallocated block allocates it
// (allocate).
func (d *Driver) WriteAt(co *coroutine.Co, p []byte, off int64) (int, error) {
	if d.readOnly {
		return 0, fmt.Errorf("vdi: %s: %w", d.path, drivers.ErrReadOnly)
	}
	if err := d.checkWrite("write", off, int64(len(p))); err != nil {
		return 0, err
	}
	err := blocktab.Split(off, int64(len(p)), blockSize, func(pc blocktab.Piece) error {
		return d.writePiece(co, p[pc.Pos:pc.Pos+pc.Len], pc)
	})
	if err != nil {
		return 0, err
	}
	return len(p), nil
}

func (d *Driver) writePiece(co *coroutine.Co, q []byte, pc blocktab.Piece) error {
	host, err := d.lookup(co, pc.Block)
	if err != nil {
		return err
	}
	if host < 0 {
		host, err = d.allocate(co, q, pc)
		if err != nil || host < 0 {
			return err // allocated with q in it, or failed
		}
	}
	if err := d.f.PwriteCo(co, q, host+pc.In); err != nil {
		return fmt.Errorf("vdi: %w", err)
	}
	return nil
}

// allocate gives block pc.Block a new index and writes q into it, as
// QEMU's vdi_co_pwritev does but in an order that survives a crash:
//
//  1. the whole block, q zero-padded, at the index the header's count
//     names (past every block in use);
//  2. fdatasync: the data is on disk before anything points at it;
//  3. the map entry;
//  4. the header with the count raised.
//
// A crash before 3 leaves the map as it was (the next allocation reuses
// the index and writes the whole block again); one between 3 and 4 leaves
// the count one behind the map, which the next writable open repairs. It
// returns -1 when the block was allocated (with q), or the host offset of
// the block if another writer allocated it meanwhile (the caller then
// writes q in place).
func (d *Driver) allocate(co *coroutine.Co, q []byte, pc blocktab.Piece) (int64, error) {
	d.allocMu.Lock(co)
	defer d.allocMu.Unlock(co)
	d.mu.Lock(co)
	host, err := d.lookupLocked(co, pc.Block)
	idx := d.next
	d.mu.Unlock(co)
	if err != nil || host >= 0 {
		return host, err
	}
	if idx >= d.blocks {
		return 0, fmt.Errorf("vdi: %s: no free block index (%d blocks in use): %w", d.path, idx, drivers.ErrCorrupt)
	}
	if d.blockBuf == nil {
		d.blockBuf = aio.AlignedBuffer(blockSize)
	}
	buf := d.blockBuf
	clear(buf)
	copy(buf[pc.In:], q)
	host = d.dataOff + idx*blockSize
	if err := d.f.PwriteCo(co, buf, host); err != nil {
		return 0, fmt.Errorf("vdi: %w", err)
	}
	if err := d.f.FdatasyncCo(co); err != nil {
		return 0, fmt.Errorf("vdi: %w", err)
	}
	d.mu.Lock(co)
	defer d.mu.Unlock(co)
	if err := d.bmap.SetLocked(co, pc.Block, uint32(idx)); err != nil {
		return 0, fmt.Errorf("vdi: %s: block map entry %d: %w", d.path, pc.Block, err)
	}
	d.next = idx + 1
	d.hdr.setAllocated(d.next)
	if err := d.f.PwriteCo(co, d.hdr.raw[:], 0); err != nil {
		return 0, fmt.Errorf("vdi: %s: header: %w", d.path, err)
	}
	return -1, nil
}

// Flush makes every write durable: data and map entries are already
// written (entries are written through), so an fdatasync is all.
func (d *Driver) Flush(co *coroutine.Co) error {
	if d.readOnly {
		return nil
	}
	if err := d.f.FdatasyncCo(co); err != nil {
		return fmt.Errorf("vdi: %w", err)
	}
	return nil
}

// Discard makes [off, off+n) read as zeros. VDI has no way to record a
// discard QEMU reads back (the discarded entry, 0xFFFFFFFE, would leak the
// block; QEMU never writes it), so allocated blocks get zeros written and
// unallocated ones, already zeros, are left alone.
func (d *Driver) Discard(co *coroutine.Co, off, n int64) error {
	return d.WriteZeroes(co, off, n, true)
}

// WriteZeroes makes [off, off+n) read as zeros, as Discard does.
func (d *Driver) WriteZeroes(co *coroutine.Co, off, n int64, unmap bool) error {
	if d.readOnly {
		return fmt.Errorf("vdi: %s: %w", d.path, drivers.ErrReadOnly)
	}
	if err := d.checkWrite("zero", off, n); err != nil {
		return err
	}
	return blocktab.Split(off, n, blockSize, func(pc blocktab.Piece) error {
		host, err := d.lookup(co, pc.Block)
		if err != nil || host < 0 {
			return err
		}
		return blocktab.WriteZeros(host+pc.In, pc.Len, func(z []byte, at int64) error {
			if err := d.f.PwriteCo(co, z, at); err != nil {
				return fmt.Errorf("vdi: %w", err)
			}
			return nil
		})
	})
}

// statusRun bounds how many blocks one BlockStatus answer covers.
const statusRun = 1024

// LayerStatus implements drivers.LayerMapper as QEMU's vdi_co_block_status
// does: an allocated block is data at its offset in the file, an
// unallocated one reads as zeros. Runs of blocks with the same status and
// contiguous offsets are joined.
func (d *Driver) LayerStatus(co *coroutine.Co, off int64) (drivers.LayerStatus, error) {
	if off < 0 || off >= d.size {
		return drivers.LayerStatus{}, fmt.Errorf("vdi: %s: block status at %#x outside the disk (size %#x): %w",
			d.path, off, d.size, syscall.EINVAL)
	}
	d.mu.Lock(co)
	defer d.mu.Unlock(co)
	b := off / blockSize
	host, err := d.lookupLocked(co, b)
	if err != nil {
		return drivers.LayerStatus{}, err
	}
	end := (b + 1) * blockSize
	for k := int64(1); k < statusRun && end < d.size; k++ {
		h, err := d.lookupLocked(co, b+k)
		if err != nil || (h < 0) != (host < 0) || (host >= 0 && h != host+k*blockSize) {
			break
		}
		end += blockSize
	}
	st := drivers.LayerStatus{Off: off, Len: min(end, d.size) - off}
	if host < 0 {
		st.Zero = true
		return st, nil
	}
	st.Data, st.HasOffset, st.Offset = true, true, host+off%blockSize
	return st, nil
}

// HostStatus implements drivers.HostMapper: under a static image's blocks
// qemu-img map reports the holes of the file as zeros (QEMU's vdi sets
// BDRV_BLOCK_RECURSE for static images); a dynamic image's blocks are data
// throughout, as QEMU reports them.
func (d *Driver) HostStatus(st drivers.LayerStatus) (zero bool, n int64) {
	if !d.static {
		return false, st.Len
	}
	return blocktab.HostStatus(d.f, st.Offset, st.Len)
}

// BackingLayer implements drivers.LayerMapper: VDI images have none here.
func (d *Driver) BackingLayer() drivers.Driver { return nil }

// BlockStatus describes the disk from off (LayerStatus).
func (d *Driver) BlockStatus(co *coroutine.Co, off int64) (drivers.Extent, error) {
	return drivers.BlockStatusOf(co, d, off)
}

// Truncate refuses any change of size, as QEMU's vdi driver (which has no
// truncate) does; the current size is accepted.
func (d *Driver) Truncate(co *coroutine.Co, size int64) error {
	if size == d.size {
		return nil
	}
	if d.readOnly {
		return fmt.Errorf("vdi: %s: %w", d.path, drivers.ErrReadOnly)
	}
	return fmt.Errorf("vdi: %s: resizing VDI images is not supported: %w", d.path, drivers.ErrUnsupported)
}

// Info describes the image as qemu-img info does: the block size as the
// cluster size, the file's allocated bytes as its size.
func (d *Driver) Info() drivers.ImageInfo {
	info := drivers.ImageInfo{Filename: d.path, Format: "vdi", VirtualSize: d.size, ClusterSize: blockSize}
	info.FileSize = drivers.DiskUsage(d.path)
	return info
}

// Allocated implements drivers.Allocator: the file's allocated bytes less
// the header and map, clamped to the disk (one fstat).
func (d *Driver) Allocated() int64 {
	a, err := d.f.Allocated()
	if err != nil {
		return d.size
	}
	return min(max(a-d.dataOff, 0), d.size)
}

// Close closes the image file after in-flight I/O. It does not flush.
func (d *Driver) Close() error {
	if err := d.f.Close(); err != nil {
		return fmt.Errorf("vdi: %w", err)
	}
	return nil
}

// Check implements drivers.Checker as QEMU's vdi_co_check does: every map
// entry must name an index below the block count, no two the same index,
// and the header's count must be the number in use. Each problem is one
// corruption. Repair is refused, as qemu-img check -r refuses it for VDI.
func (d *Driver) Check(mode drivers.CheckMode, progress func(done, total int64)) (drivers.CheckResult, error) {
	var res drivers.CheckResult
	if mode != drivers.CheckOnly {
		return res, fmt.Errorf("vdi: %s: repair is not supported (qemu-img cannot repair VDI images either): %w",
			d.path, drivers.ErrUnsupported)
	}
	seen := make([]uint64, (d.blocks+63)/64) // one bit per index: at most 64 MiB
	var used int64
	err := d.bmap.ScanAll(func(i int64, v uint32) error {
		if progress != nil && i%65536 == 0 {
			progress(i, d.blocks)
		}
		if v >= firstSpecialEnt {
			return nil
		}
		if int64(v) >= d.blocks {
			res.Corruptions++
			addMessage(&res, fmt.Sprintf("ERROR: block index %d too large, is %d", i, v))
			return nil
		}
		used++
		if seen[v/64]&(1<<(v%64)) != 0 {
			res.Corruptions++
			addMessage(&res, fmt.Sprintf("ERROR: block index %d also used by %d", v, i))
			return nil
		}
		seen[v/64] |= 1 << (v % 64)
		return nil
	})
	if err != nil {
		res.CheckErrors++
		return res, fmt.Errorf("vdi: %s: reading the block map: %w", d.path, err)
	}
	if used != d.hdr.allocated {
		res.Corruptions++
		addMessage(&res, fmt.Sprintf("ERROR: allocated blocks mismatch, is %d, should be %d", used, d.hdr.allocated))
	}
	return res, nil
}

// maxMessages bounds the messages a check keeps.
const maxMessages = 65536

func addMessage(r *drivers.CheckResult, m string) {
	if len(r.Messages) < maxMessages {
		r.Messages = append(r.Messages, m)
	}
}
