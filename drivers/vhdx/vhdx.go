package vhdx

import (
	"crypto/rand"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync/atomic"

	"golang.org/x/sys/unix"

	"imgfuse/aio"
	"imgfuse/cache"
	"imgfuse/coroutine"
	"imgfuse/drivers"
)

// Format is the VHDX format, qemu-img's "vhdx".
type Format struct{}

var _ drivers.Format = Format{}

func (Format) Name() string { return "vhdx" }

// Probe: format.go's probe.
func (Format) Probe(in drivers.ProbeInput) int { return probe(in) }

// Open opens the VHDX image at path. It must not be called from a
// coroutine.
func (Format) Open(path string, opts drivers.OpenOptions) (drivers.Driver, error) {
	return Open(path, opts)
}

// defaultCacheBytes bounds the BAT cache (and as much again the sector
// bitmap cache of a differencing image) when OpenOptions.CacheSize is 0:
// 4 MiB of BAT is 512K entries, 4 TiB of 8 MiB blocks.
const defaultCacheBytes = 4 << 20

// BAT entry states (§4.5): bits 0–2; bits 20–63 the offset in MiB.
const (
	stateNotPresent = 0
	stateUndefined  = 1
	stateZero       = 2
	stateUnmapped   = 3
	stateUnmapped95 = 5 // the v0.95 value QEMU also reads as unmapped
	stateFull       = 6 // payload: fully present; sector bitmap: present
	statePartial    = 7
	stateMask       = 7
	offMask         = ^uint64(mib - 1)
)

// Driver is an open VHDX image: fixed, dynamic or differencing.
type Driver struct {
	// Immutable after Open.
	f        *aio.File
	path     string
	readOnly bool
	size     int64
	md       *metadata
	rg       *regions
	// reserved: where no block may be: the first MiB, the log, and every
	// region of the region table, known or not.
	reserved  []region
	blockSize int64
	cr        int64 // chunk ratio: payload blocks per sector bitmap block
	entries   int64 // BAT entries
	logOff    int64
	logLen    int64
	parent    drivers.Driver
	parentAt  string
	// overlay: the writes of a dirty log a read-only open did not replay
	// into the file, laid over every read of the file; nil otherwise.
	overlay *replay
	// replayed: a writable open replayed a dirty log (check reports it
	// as a corruption fixed, as qemu-img check -r all does).
	replayed bool
	// fileWrite is this open's FileWriteGuid, written with the first
	// header update.
	fileWrite guid

	// mu is the metadata lock: it protects bat, bitmaps, nextFree, the
	// headers (hdr, hdrSlot), the log writer (logGUID, logPos, logSeq)
	// and dataWritten. Lock order: allocMu, then mu.
	mu      coroutine.CoMutex
	bat     *cache.Cache // 4 KiB sectors of the BAT, by file offset
	bitmaps *cache.Cache // differencing: 4 KiB pages of sector bitmaps
	// nextFree is where the next block goes: a MiB boundary past every
	// block the BAT names, and past the file's end.
	nextFree int64
	hdr      *header
	hdrSlot  int // 0: header 1 is current; 1: header 2
	// logGUID is the log GUID the headers carry while this open has log
	// entries that a Flush has not yet retired; zero otherwise.
	logGUID     guid
	logPos      int64 // log-relative offset of the next entry
	logSeq      uint64
	dataWritten bool // the headers carry this open's DataWriteGuid

	// allocMu serialises allocations (and the conversion of partially
	// present blocks); held across their data I/O, never taken by reads.
	allocMu coroutine.CoMutex

	damage atomic.Pointer[drivers.DamageError]
}

var (
	_ drivers.Driver       = (*Driver)(nil)
	_ drivers.DirectReader = (*Driver)(nil)
	_ drivers.Informer     = (*Driver)(nil)
	_ drivers.Allocator    = (*Driver)(nil)
	_ drivers.FileLister   = (*Driver)(nil)
	_ drivers.LayerMapper  = (*Driver)(nil)
	_ drivers.Damaged      = (*Driver)(nil)
	_ drivers.Checker      = (*Driver)(nil)
)

// Open opens the VHDX image at path. A differencing image opens its
// parent chain read-only. It must not be called from a coroutine.
func Open(path string, opts drivers.OpenOptions) (*Driver, error) {
	if opts.Snapshot != "" {
		return nil, fmt.Errorf("vhdx: %s: snapshot %q: VHDX images have no internal snapshots: %w",
			path, opts.Snapshot, drivers.ErrUnsupported)
	}
	// The chain of images above this one, for the parent's open to
	// refuse loops (through other formats too) and over-deep chains.
	opts, err := drivers.EnterChain(path, opts)
	if err != nil {
		return nil, fmt.Errorf("vhdx: %w", err)
	}
	f, err := aio.Open(path, aio.Options{ReadOnly: opts.ReadOnly, NoDirectIO: opts.NoDirectIO, NoLock: opts.ForceShare})
	if err != nil {
		return nil, fmt.Errorf("vhdx: %w", err)
	}
	d := &Driver{f: f, path: path, readOnly: opts.ReadOnly}
	coroutine.Run(func(co *coroutine.Co) { err = d.open(co, opts) })
	if err == nil && d.md.hasParent && !opts.NoBacking {
		err = d.openParent(opts)
	}
	if err != nil {
		f.Close()
		return nil, err
	}
	return d, nil
}

// open reads and checks the headers, the log (replayed into the file, or
// held as an overlay when read-only), the region table, the metadata and,
// in one streamed pass, the BAT.
func (d *Driver) open(co *coroutine.Co, opts drivers.OpenOptions) error {
	fileSize, err := d.f.Size()
	if err != nil {
		return fmt.Errorf("vhdx: %w", err)
	}
	buf := aio.AlignedBuffer(regionSize)
	if err := d.f.PreadCo(co, buf[:8], 0); err != nil {
		return fmt.Errorf("vhdx: %w", err)
	}
	if string(buf[:8]) != "vhdxfile" {
		return fmt.Errorf("vhdx: %s: no file type identifier \"vhdxfile\": %w", d.path, drivers.ErrCorrupt)
	}
	h2 := aio.AlignedBuffer(headerSize)
	if err := d.f.PreadCo(co, buf[:headerSize], header1Off); err != nil {
		return fmt.Errorf("vhdx: %w", err)
	}
	if err := d.f.PreadCo(co, h2, header2Off); err != nil {
		return fmt.Errorf("vhdx: %w", err)
	}
	d.hdr, d.hdrSlot, err = pickHeader(buf[:headerSize], h2)
	if err != nil {
		return fmt.Errorf("vhdx: %s: %w", d.path, err)
	}
	d.logOff, d.logLen = d.hdr.logOffset, d.hdr.logLength
	if d.logLen > 0 && d.logOff+d.logLen > fileSize {
		return fmt.Errorf("vhdx: %s: log [%#x, +%#x) past the end of the file (%d bytes): %w", d.path, d.logOff, d.logLen, fileSize, drivers.ErrCorrupt)
	}
	if _, err := rand.Read(d.fileWrite[:]); err != nil {
		return fmt.Errorf("vhdx: %w", err)
	}
	d.logSeq = 1
	if !d.hdr.logGUID.zero() && d.logLen > 0 {
		if d.logLen > maxLogLength {
			return fmt.Errorf("vhdx: %s: a log of %d bytes to replay (at most %d): %w", d.path, d.logLen, maxLogLength, drivers.ErrUnsupported)
		}
		rp, err := scanLog(co, d.f, d.logOff, d.logLen, d.hdr.logGUID, fileSize)
		if err != nil {
			return fmt.Errorf("vhdx: %s: log: %w", d.path, err)
		}
		if rp != nil {
			d.logSeq, d.logPos = rp.maxSeq+1, rp.nextWrite
		}
		switch {
		case d.readOnly:
			if rp != nil && len(rp.ops) > 0 {
				d.overlay = rp
				// The file as the replay would leave it: extended to the
				// last entry's LastFileOffset, so that the blocks the log
				// places there are no truncation.
				fileSize = max(fileSize, (rp.last+mib-1)/mib*mib)
				if opts.Logf != nil {
					opts.Logf("vhdx: %s: the log holds writes not yet in the file: read through them in memory (the file is left as it is)", d.path)
				}
			}
		default:
			if rp != nil {
				if err := rp.apply(co, d.f); err != nil {
					return fmt.Errorf("vhdx: %s: replaying the log: %w", d.path, err)
				}
				d.replayed = true
			}
			d.mu.Lock(co)
			err := d.updateHeadersLocked(co, func(h []byte) { clear(h[hLogGUID : hLogGUID+16]) })
			d.mu.Unlock(co)
			if err != nil {
				return err
			}
			if fileSize, err = d.f.Size(); err != nil {
				return fmt.Errorf("vhdx: %w", err)
			}
		}
	}
	// The region table: the first copy, or the second if the first is
	// damaged.
	if err := d.readFile(co, buf, region1Off); err != nil {
		return err
	}
	rg, err := parseRegions(buf, fileSize, d.logOff, d.logLen)
	if err != nil {
		if err2 := d.readFile(co, buf, region2Off); err2 != nil {
			return err2
		}
		if rg2, err2 := parseRegions(buf, fileSize, d.logOff, d.logLen); err2 == nil {
			rg, err = rg2, nil
		}
	}
	if err != nil {
		return fmt.Errorf("vhdx: %s: region table: %w", d.path, err)
	}
	d.rg = rg
	d.reserved = append([]region{{0, mib}, {d.logOff, d.logLen}, rg.bat, rg.meta}, rg.others...)
	mbuf := aio.AlignedBuffer(int(min(rg.meta.length, 2*mib)))
	if err := d.readFile(co, mbuf, rg.meta.off); err != nil {
		return err
	}
	md, err := parseMetadata(mbuf)
	if err != nil {
		return fmt.Errorf("vhdx: %s: metadata: %w", d.path, err)
	}
	d.md, d.size, d.blockSize = md, md.diskSize, md.blockSize
	d.cr = (1 << 23) * md.logicalSS / md.blockSize
	payload := (d.size + d.blockSize - 1) / d.blockSize
	switch {
	case md.hasParent:
		d.entries = (payload + d.cr - 1) / d.cr * (d.cr + 1)
	case payload > 0:
		d.entries = payload + (payload-1)/d.cr
	}
	if d.entries*8 > rg.bat.length {
		return fmt.Errorf("vhdx: %s: %d BAT entries do not fit the BAT region of %d bytes: %w", d.path, d.entries, rg.bat.length, drivers.ErrCorrupt)
	}
	cacheBytes := opts.CacheSize
	if cacheBytes <= 0 {
		cacheBytes = defaultCacheBytes
	}
	sectors := (d.entries*8 + sectorSize - 1) / sectorSize
	d.bat = cache.New(d.path+" BAT", int(min(max(cacheBytes/sectorSize, 4), max(sectors, 1))), sectorSize, tableBackend{d, rg.bat.off + rg.bat.length})
	if md.hasParent {
		d.bitmaps = cache.New(d.path+" bitmaps", int(min(max(cacheBytes/sectorSize, 4), 4096)), sectorSize, tableBackend{d, 1 << 62})
	}
	return d.scanBAT(co, fileSize)
}

// scanBAT is the open-time pass over the BAT (QEMU's open does the same):
// where the next block goes, and blocks that overlap the headers, the log
// or the regions, or start past the end of the file, which a writable
// open refuses and a read-only one reports (drivers.Damaged).
func (d *Driver) scanBAT(co *coroutine.Co, fileSize int64) error {
	const chunk = 64 << 10
	buf := aio.AlignedBuffer(chunk)
	next := (fileSize + mib - 1) / mib * mib
	var bad error
	for first := int64(0); first < d.entries; first += chunk / 8 {
		cnt := min(d.entries-first, chunk/8)
		p := buf[:cnt*8]
		if err := d.readFile(co, p, d.rg.bat.off+first*8); err != nil {
			return fmt.Errorf("vhdx: %s: reading the BAT: %w", d.path, err)
		}
		for k := int64(0); k < cnt; k++ {
			i := first + k
			v := le.Uint64(p[k*8:])
			isBitmap := (i+1)%(d.cr+1) == 0
			st := v & stateMask
			if st != stateFull && !(st == statePartial && !isBitmap) {
				continue
			}
			off := int64(v & offMask)
			length := d.blockSize
			if isBitmap {
				length = mib
			}
			if err := d.checkPlace(off, length); err != nil && bad == nil {
				bad = fmt.Errorf("BAT entry %d: %w", i, err)
			}
			if off >= fileSize && bad == nil {
				bad = fmt.Errorf("BAT entry %d: block at %#x past the end of the file (%d bytes): the image has been truncated: %w", i, off, fileSize, drivers.ErrCorrupt)
			}
			next = max(next, off+length)
		}
	}
	if bad != nil {
		if !d.readOnly {
			return fmt.Errorf("vhdx: %s: %w", d.path, bad)
		}
		d.damage.Store(&drivers.DamageError{Format: "vhdx", Path: d.path, Err: bad})
	}
	d.nextFree = (next + mib - 1) / mib * mib
	return nil
}

// checkPlace refuses a block (or sector bitmap) at [off, off+n) that
// overlaps the first MiB (headers, region tables), the log, the BAT or
// the metadata region, or whose end overflows.
func (d *Driver) checkPlace(off, n int64) error {
	if off > 1<<52 {
		return fmt.Errorf("block at %#x: %w", off, drivers.ErrCorrupt)
	}
	for _, r := range d.reserved {
		if off < r.off+r.length && r.off < off+n {
			return fmt.Errorf("block [%#x, +%#x) overlaps the headers, the log or a region at [%#x, +%#x): %w", off, n, r.off, r.length, drivers.ErrCorrupt)
		}
	}
	return nil
}

// readFile reads the file at off into p, through the overlay of a dirty
// log on a read-only open.
func (d *Driver) readFile(co *coroutine.Co, p []byte, off int64) error {
	if err := d.f.PreadCo(co, p, off); err != nil {
		return fmt.Errorf("vhdx: %w", err)
	}
	if d.overlay != nil {
		if err := d.overlay.patch(co, d.f, p, off); err != nil {
			return fmt.Errorf("vhdx: %s: reading through the log: %w", d.path, err)
		}
	}
	return nil
}

// tableBackend reads 4 KiB sectors of the BAT or of sector bitmaps for a
// cache, through the log overlay; bytes at or past end (the BAT region's
// end) read as zeros. They are written through the log (setEntriesLocked),
// never back.
type tableBackend struct {
	d   *Driver
	end int64
}

func (b tableBackend) ReadTable(co *coroutine.Co, off int64, p []byte) error {
	n := max(min(int64(len(p)), b.end-off), 0)
	clear(p[n:])
	return b.d.readFile(co, p[:n], off)
}

func (b tableBackend) WriteTable(co *coroutine.Co, off int64, p []byte) error {
	return fmt.Errorf("vhdx: table sector at %#x written back: sectors are never dirty", off)
}

func (b tableBackend) Sync(co *coroutine.Co) error { return b.d.f.FdatasyncCo(co) }

// openParent finds and opens the parent of a differencing image,
// read-only, and checks that it is the parent the image was made on: its
// DataWriteGuid must be the locator's parent_linkage.
func (d *Driver) openParent(opts drivers.OpenOptions) error {
	cands := d.md.locator.paths(filepath.Dir(d.path))
	for _, p := range cands {
		if _, err := os.Stat(p); err != nil {
			continue
		}
		pd, _, err := drivers.OpenParent(p, "vhdx", Format{}, opts)
		if err != nil {
			return fmt.Errorf("vhdx: %s: parent: %w", d.path, err)
		}
		parent, ok := pd.(*Driver)
		if !ok {
			pd.Close()
			return fmt.Errorf("vhdx: %s: parent %s did not open as a VHDX: %w", d.path, p, drivers.ErrUnsupported)
		}
		if !d.md.locator.linkage(parent.hdr.dataWrite) {
			parent.Close()
			return fmt.Errorf("vhdx: %s: parent %s has DataWriteGuid %s, the image was made on %s: %w",
				d.path, p, parent.hdr.dataWrite, d.md.locator.entries["parent_linkage"], drivers.ErrCorrupt)
		}
		d.parent, d.parentAt = parent, p
		return nil
	}
	return fmt.Errorf("vhdx: %s: parent not found (looked at %q): %w", d.path, cands, os.ErrNotExist)
}

// newGUID returns a random (version 4) GUID.
func newGUID() (guid, error) {
	var g guid
	if _, err := rand.Read(g[:]); err != nil {
		return g, err
	}
	g[7] = g[7]&0x0f | 0x40
	g[8] = g[8]&0x3f | 0x80
	return g, nil
}

// updateHeadersLocked writes the headers as the spec and QEMU do: the
// inactive slot gets the current header with the next sequence number,
// this open's FileWriteGuid and what change sets, is written and synced
// and becomes current; twice, so both slots end up valid and current.
func (d *Driver) updateHeadersLocked(co *coroutine.Co, change func(h []byte)) error {
	d.mu.AssertHeld(co)
	for range 2 {
		b := aio.AlignedBuffer(headerSize)
		copy(b, d.hdr.raw)
		le.PutUint64(b[hSeq:], d.hdr.seq+1)
		copy(b[hFileWrite:], d.fileWrite[:])
		change(b)
		le.PutUint32(b[hChecksum:], crcOf(b, hChecksum))
		h, err := parseHeader(b)
		if err != nil {
			return fmt.Errorf("vhdx: %s: header update: %w", d.path, err)
		}
		slot := 1 - d.hdrSlot
		if err := d.f.PwriteCo(co, b, int64(header1Off+slot*(header2Off-header1Off))); err != nil {
			return fmt.Errorf("vhdx: %w", err)
		}
		if err := d.f.FdatasyncCo(co); err != nil {
			return fmt.Errorf("vhdx: %w", err)
		}
		d.hdr, d.hdrSlot = h, slot
	}
	return nil
}

// Size is the virtual disk size.
func (d *Driver) Size() int64 { return d.size }

// Files implements drivers.FileLister: the image, then its parents.
func (d *Driver) Files() []drivers.ChainFile {
	return drivers.LayerFiles(d.path, []drivers.ChainFile{{Path: d.path, Role: "image"}}, d.parent)
}

// Damage implements drivers.Damaged, for the chain.
func (d *Driver) Damage() error { return drivers.LayerDamage(d.damage.Load(), d.parent) }

// Info describes the image as qemu-img info does: the block size as the
// cluster size; a differencing image names its parent as its backing
// file (qemu-img cannot open one).
func (d *Driver) Info() drivers.ImageInfo {
	info := drivers.ImageInfo{Filename: d.path, Format: "vhdx", VirtualSize: d.size, ClusterSize: d.blockSize}
	info.FileSize = drivers.DiskUsage(d.path)
	if d.parent != nil {
		info.SetBacking(d.parentAt, "vhdx", d.parent)
	}
	return info
}

// Allocated implements drivers.Allocator: the file's allocated bytes,
// less what the headers, log and regions occupy of it, plus the parent's,
// clamped. Those regions are mostly holes in a fresh image (qemu-img
// reserves 1 MiB each for the log and the metadata and writes a few
// pages): subtracting their lengths instead hid the first megabytes of
// data written (st_blocks 0 after writes).
func (d *Driver) Allocated() int64 {
	a, err := d.f.Allocated()
	if err != nil {
		return d.size
	}
	for _, r := range [...]region{{0, mib}, {d.logOff, d.logLen}, d.rg.bat, d.rg.meta} {
		a -= d.allocatedIn(r)
	}
	if d.parent != nil {
		a += drivers.AllocatedOf(d.parent)
	}
	return min(max(a, 0), d.size)
}

// maxRegionExtents bounds the lseek calls allocatedIn makes per region:
// Allocated runs on every GETATTR. The headers, log and metadata regions
// hold a few runs of data; past the bound the rest counts as allocated.
const maxRegionExtents = 8

// allocatedIn is how much of r the file has allocated, found with
// SEEK_DATA/SEEK_HOLE (all of r where the file system cannot tell).
func (d *Driver) allocatedIn(r region) int64 {
	var n int64
	end := r.off + r.length
	for off, i := r.off, 0; off < end; i++ {
		if i == maxRegionExtents {
			return n + end - off
		}
		data, err := d.f.Seek(off, unix.SEEK_DATA)
		if errors.Is(err, unix.ENXIO) || (err == nil && data >= end) {
			return n
		}
		if err != nil {
			return n + end - off
		}
		hole, err := d.f.Seek(data, unix.SEEK_HOLE)
		if err != nil {
			return n + end - data
		}
		hole = min(hole, end)
		n += hole - data
		off = hole
	}
	return n
}

// BackingLayer implements drivers.LayerMapper: the parent, if any.
func (d *Driver) BackingLayer() drivers.Driver { return d.parent }

// Close closes the image and its parents. It does not flush.
func (d *Driver) Close() error {
	err := d.f.Close()
	if d.parent != nil {
		if perr := d.parent.Close(); err == nil {
			err = perr
		}
	}
	if err != nil {
		return fmt.Errorf("vhdx: %w", err)
	}
	return nil
}

// Check implements drivers.Checker as QEMU's vhdx_co_check does: a log
// replayed by this (writable) open is one corruption fixed; every present
// block must lie inside the file and off the headers, log and regions.
// A read-only check of an image with a dirty log fails, as qemu-img's
// does (the log must be replayed: check -r all). As QEMU's, it counts
// no clusters and no image end, so the output is qemu-img's.
func (d *Driver) Check(mode drivers.CheckMode, progress func(done, total int64)) (drivers.CheckResult, error) {
	var res drivers.CheckResult
	if d.overlay != nil {
		return res, fmt.Errorf("vhdx: %s: the image contains a log that needs to be replayed (check -r all replays it): %w", d.path, drivers.ErrCorrupt)
	}
	if d.replayed {
		res.CorruptionsFixed++
	}
	fileSize, err := d.f.Size()
	if err != nil {
		return res, fmt.Errorf("vhdx: %w", err)
	}
	coroutine.Run(func(co *coroutine.Co) {
		buf := aio.AlignedBuffer(64 << 10)
		for first := int64(0); first < d.entries && err == nil; first += int64(len(buf)) / 8 {
			if progress != nil {
				progress(first, d.entries)
			}
			cnt := min(d.entries-first, int64(len(buf))/8)
			if err = d.readFile(co, buf[:cnt*8], d.rg.bat.off+first*8); err != nil {
				res.CheckErrors++
				return
			}
			for k := int64(0); k < cnt; k++ {
				i := first + k
				v := le.Uint64(buf[k*8:])
				isBitmap := (i+1)%(d.cr+1) == 0
				if v&stateMask != stateFull && !(v&stateMask == statePartial && !isBitmap) {
					continue
				}
				off, n := int64(v&offMask), d.blockSize
				if isBitmap {
					n = mib
				}
				if e := d.checkPlace(off, n); e != nil {
					res.Corruptions++
					addMessage(&res, fmt.Sprintf("ERROR: BAT entry %d: %v", i, e))
				} else if off+n > fileSize && off >= fileSize {
					res.Corruptions++
					addMessage(&res, fmt.Sprintf("ERROR: BAT entry %d: block at %#x past the end of the file", i, off))
				}
			}
		}
	})
	if err != nil {
		return res, fmt.Errorf("vhdx: %s: reading the BAT: %w", d.path, err)
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
