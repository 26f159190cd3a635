package vpc

import (
	"fmt"
	"os"
	"sync/atomic"

	"imgfuse/aio"
	"imgfuse/cache"
	"imgfuse/coroutine"
	"imgfuse/drivers"
	"imgfuse/drivers/blocktab"
)

// Format is the VHD format, qemu-img's "vpc".
type Format struct{}

var _ drivers.Format = Format{}

func (Format) Name() string { return "vpc" }

// Probe: footer.go's probe.
func (Format) Probe(in drivers.ProbeInput) int { return probe(in) }

// Open opens the VHD image at path. It must not be called from a
// coroutine.
func (Format) Open(path string, opts drivers.OpenOptions) (drivers.Driver, error) {
	return Open(path, opts)
}

// defaultCacheBytes bounds the BAT cache (and as much again the bitmap
// cache of a differencing image) when OpenOptions.CacheSize is 0: 4 MiB
// of BAT is 1M entries, 2 TiB of 2 MiB blocks.
const defaultCacheBytes = 4 << 20

// Driver is an open VHD image: fixed, dynamic or differencing.
type Driver struct {
	// Immutable after Open.
	f        *aio.File
	path     string
	readOnly bool
	ft       *footer
	size     int64
	// Dynamic and differencing only.
	hdr       *dynHeader
	blockSize int64
	bmSize    int64
	metaEnd   int64 // blocks must start at or after this
	parent    drivers.Driver
	parentAt  string

	// mu is the metadata lock: it protects bat, bitmaps and nextFree.
	// Lock order: allocMu, then cowMu, then mu.
	mu      coroutine.CoMutex
	bat     *blocktab.Table
	bitmaps *cache.Cache // differencing: sector bitmaps, by file offset
	// nextFree is where the next block's bitmap goes: past the last
	// block the BAT names, and past the file's data (the footer's
	// place).
	nextFree int64

	// allocMu serialises allocations (alloc.go); held across their data
	// I/O, never taken by reads.
	allocMu coroutine.CoMutex
	// cowMu serialises writes that set bits of a differencing block's
	// bitmap (their partial sectors are merged with what the disk read).
	cowMu coroutine.CoMutex

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
)

// Open opens the VHD image at path. A differencing image opens its parent
// chain read-only. It must not be called from a coroutine.
func Open(path string, opts drivers.OpenOptions) (*Driver, error) {
	if opts.Snapshot != "" {
		return nil, fmt.Errorf("vpc: %s: snapshot %q: VHD images have no internal snapshots: %w",
			path, opts.Snapshot, drivers.ErrUnsupported)
	}
	// The chain of images above this one, for the parent's open to
	// refuse loops (through other formats too) and over-deep chains.
	opts, err := drivers.EnterChain(path, opts)
	if err != nil {
		return nil, fmt.Errorf("vpc: %w", err)
	}
	f, err := aio.Open(path, aio.Options{ReadOnly: opts.ReadOnly, NoDirectIO: opts.NoDirectIO, NoLock: opts.ForceShare})
	if err != nil {
		return nil, fmt.Errorf("vpc: %w", err)
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
		return nil, fmt.Errorf("vpc: %w", err)
	}
	buf := aio.AlignedBuffer(dynHeaderSize)
	// The footer: its copy at 0 (dynamic and differencing disks), else
	// the one at the end (fixed disks; a dynamic disk whose copy is
	// damaged).
	if err := f.Pread(buf[:footerSize], 0); err != nil {
		return nil, fmt.Errorf("vpc: %w", err)
	}
	ft, err := parseFooter(buf[:footerSize])
	if err != nil && fileSize >= footerSize {
		if err2 := f.Pread(buf[:footerSize], fileSize-footerSize); err2 != nil {
			return nil, fmt.Errorf("vpc: %w", err2)
		}
		if ft2, err2 := parseFooter(buf[:footerSize]); err2 == nil {
			ft, err = ft2, nil
		}
	}
	if err != nil {
		return nil, fmt.Errorf("vpc: %s: %w", path, err)
	}
	d := &Driver{f: f, path: path, readOnly: opts.ReadOnly, ft: ft, size: ft.size}
	if ft.diskType == typeFixed {
		if d.size > fileSize-footerSize {
			return nil, fmt.Errorf("vpc: %s: fixed disk of %d bytes in a file of %d: %w", path, d.size, fileSize, drivers.ErrCorrupt)
		}
		return d, nil
	}
	if ft.dataOff >= 1<<62 || ft.dataOff%512 != 0 || int64(ft.dataOff)+dynHeaderSize > fileSize {
		return nil, fmt.Errorf("vpc: %s: dynamic header at %#x outside the file: %w", path, ft.dataOff, drivers.ErrCorrupt)
	}
	if err := f.Pread(buf, int64(ft.dataOff)); err != nil {
		return nil, fmt.Errorf("vpc: %w", err)
	}
	h, err := parseDynHeader(buf, d.size, fileSize)
	if err != nil {
		return nil, fmt.Errorf("vpc: %s: %w", path, err)
	}
	d.hdr, d.blockSize, d.bmSize = h, h.blockSize, bitmapSize(h.blockSize)
	d.metaEnd = max(int64(ft.dataOff)+dynHeaderSize, h.batOff+4*h.entries)
	cacheBytes := opts.CacheSize
	if cacheBytes <= 0 {
		cacheBytes = defaultCacheBytes
	}
	d.bat = blocktab.New(f, path+" BAT", h.batOff, h.entries, be, cacheBytes, &d.mu)

	// One pass over the BAT (QEMU's open does the same): where the next
	// block goes, and blocks that overlap the metadata or the end.
	next := (d.metaEnd + 511) &^ 511
	var bad error
	err = d.bat.ScanAll(func(i int64, v uint32) error {
		if v == unallocated {
			return nil
		}
		start := int64(v) * 512
		end := start + d.bmSize + d.blockSize
		if start < d.metaEnd && bad == nil {
			bad = fmt.Errorf("block %d at %#x overlaps the headers or the BAT: %w", i, start, drivers.ErrCorrupt)
		}
		next = max(next, end)
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("vpc: %s: reading the BAT: %w", path, err)
	}
	if next > fileSize && bad == nil {
		bad = fmt.Errorf("a block ends at %#x, past the end of the file (%d bytes): the image has been truncated: %w", next, fileSize, drivers.ErrCorrupt)
	}
	if bad != nil {
		if !opts.ReadOnly {
			return nil, fmt.Errorf("vpc: %s: %w", path, bad)
		}
		d.damage.Store(&drivers.DamageError{Format: "vpc", Path: path, Err: bad})
	}
	// Past the file's data too: what follows the last block may be a
	// block a crash left unpublished, or a parent locator's data.
	d.nextFree = max(next, (fileSize-footerSize)&^511)

	if ft.diskType == typeDiff {
		d.bitmaps = cache.New(path+" bitmaps", int(min(max(cacheBytes/d.bmSize, 4), 1024)), int(d.bmSize), bitmapBackend{d})
		if !opts.NoBacking {
			if err := d.openParent(opts); err != nil {
				return nil, err
			}
		}
	}
	return d, nil
}

// candidates lists the paths the parent may be at, in order: the
// relative and absolute Windows locators, the parent name, the other
// locators; relative paths are relative to the image's path
// (drivers.JoinParent).
func (d *Driver) candidates() []string {
	var out []string
	add := func(p string) {
		if p == "" {
			return
		}
		out = append(out, drivers.JoinParent(d.path, p))
	}
	read := func(l locator) string {
		if l.length <= 0 || l.length > maxLocatorBytes {
			return ""
		}
		b := make([]byte, l.length)
		if err := d.f.Pread(b, l.off); err != nil {
			return ""
		}
		return decodeLocator(l.code, b)
	}
	for _, code := range []string{"W2ru", "W2ku"} {
		for _, l := range d.hdr.locators {
			if l.code == code {
				add(read(l))
			}
		}
	}
	add(windowsToSlash(d.hdr.parentName))
	for _, l := range d.hdr.locators {
		if l.code != "W2ru" && l.code != "W2ku" {
			add(read(l))
		}
	}
	return out
}

// openParent finds and opens the parent of a differencing image,
// read-only, as a VHD (drivers.OpenParent, which refuses loops and
// over-deep chains), and checks that it is the parent the image was made
// on (its unique id).
func (d *Driver) openParent(opts drivers.OpenOptions) error {
	cands := d.candidates()
	for _, p := range cands {
		if _, err := os.Stat(p); err != nil {
			continue
		}
		pd, _, err := drivers.OpenParent(p, "vpc", Format{}, opts)
		if err != nil {
			return fmt.Errorf("vpc: %s: parent: %w", d.path, err)
		}
		parent, ok := pd.(*Driver)
		if !ok {
			pd.Close()
			return fmt.Errorf("vpc: %s: parent %s did not open as a VHD: %w", d.path, p, drivers.ErrUnsupported)
		}
		if parent.ft.uniqueID != d.hdr.parentUUID {
			parent.Close()
			return fmt.Errorf("vpc: %s: parent %s has unique id %x, the image was made on %x: %w",
				d.path, p, parent.ft.uniqueID, d.hdr.parentUUID, drivers.ErrCorrupt)
		}
		d.parent, d.parentAt = parent, p
		return nil
	}
	return fmt.Errorf("vpc: %s: parent %q not found (looked at %q): %w", d.path, d.hdr.parentName, cands, os.ErrNotExist)
}

// bitmapBackend reads sector bitmaps for the cache; they are written
// through (setBitsLocked), never back.
type bitmapBackend struct{ d *Driver }

func (b bitmapBackend) ReadTable(co *coroutine.Co, off int64, p []byte) error {
	return b.d.f.PreadCo(co, p, off)
}

func (b bitmapBackend) WriteTable(co *coroutine.Co, off int64, p []byte) error {
	return fmt.Errorf("vpc: bitmap at %#x written back: bitmaps are never dirty", off)
}

func (b bitmapBackend) Sync(co *coroutine.Co) error { return b.d.f.FdatasyncCo(co) }

// Size is the disk size (footer.go's diskSize).
func (d *Driver) Size() int64 { return d.size }

// Files implements drivers.FileLister: the image, then its parents.
func (d *Driver) Files() []drivers.ChainFile {
	return drivers.LayerFiles(d.path, []drivers.ChainFile{{Path: d.path, Role: "image"}}, d.parent)
}

// Damage implements drivers.Damaged, for the chain.
func (d *Driver) Damage() error { return drivers.LayerDamage(d.damage.Load(), d.parent) }

// Info describes the image as qemu-img info does (the block size as the
// cluster size, none for a fixed disk); a differencing image names its
// parent as its backing file, which qemu-img, reading such an image as
// dynamic, does not.
func (d *Driver) Info() drivers.ImageInfo {
	info := drivers.ImageInfo{Filename: d.path, Format: "vpc", VirtualSize: d.size, ClusterSize: d.blockSize}
	info.FileSize = drivers.DiskUsage(d.path)
	if d.parent != nil {
		info.SetBacking(d.parentAt, "vpc", d.parent)
	}
	return info
}

// Allocated implements drivers.Allocator: the file's allocated bytes
// (less the metadata in front of the blocks) plus the parent's, clamped.
func (d *Driver) Allocated() int64 {
	a, err := d.f.Allocated()
	if err != nil {
		return d.size
	}
	a -= d.metaEnd
	if d.parent != nil {
		a += drivers.AllocatedOf(d.parent)
	}
	return min(max(a, 0), d.size)
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
		return fmt.Errorf("vpc: %w", err)
	}
	return nil
}
