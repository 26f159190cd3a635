package vmdk

import (
	"fmt"
	"math/rand/v2"
	"sort"
	"syscall"

	"imgfuse/aio"
	"imgfuse/coroutine"
	"imgfuse/drivers"
	"imgfuse/drivers/blocktab"
)

// Format is the VMDK format, qemu-img's "vmdk".
type Format struct{}

var _ drivers.Format = Format{}

func (Format) Name() string { return "vmdk" }

// Probe: QEMU's vmdk_probe (header.go).
func (Format) Probe(in drivers.ProbeInput) int { return probe(in) }

// Open opens the VMDK image at path. It must not be called from a
// coroutine.
func (Format) Open(path string, opts drivers.OpenOptions) (drivers.Driver, error) {
	d, err := Open(path, opts)
	if err != nil {
		return nil, err
	}
	if d.wholeFile() {
		return wholeFileDriver{d}, nil
	}
	return d, nil
}

// defaultCacheBytes bounds the grain table cache (and the grain
// directory's) when OpenOptions.CacheSize is 0: 4 MiB of grain tables is
// 2048 tables of 512 entries, 64 GiB of 64 KiB grains.
const defaultCacheBytes = 4 << 20

// Extent kinds.
const (
	kindFlat = iota
	kindSparse
	kindZero
)

// extent is one extent of the disk: [start, start+size) in bytes.
type extent struct {
	// Immutable after Open.
	start, size int64
	kind        int
	readOnly    bool   // RDONLY in the descriptor, or the image's open mode
	name        string // as the descriptor names it ("" for the opened file itself)
	path        string // resolved; "" for ZERO
	f           *aio.File
	flatOff     int64 // FLAT: byte offset of the extent in f
	sp          *sparse
}

// Driver is an open VMDK image.
type Driver struct {
	// Immutable after Open.
	path       string
	readOnly   bool
	size       int64
	createType string
	desc       *descriptor
	textDesc   bool // the image file is a text descriptor
	extents    []*extent
	files      []*aio.File // every file opened, the descriptor's first
	// cidFile and cidOff locate the CID's 8 hex digits, rewritten on
	// the first write after each open as QEMU does (cidOff < 0: not
	// rewritten).
	cidFile *aio.File
	cidOff  int64
	// parent is the image a delta link names (parentFileNameHint),
	// opened read-only; parentAt its resolved path. parentErr, if set,
	// fails every read that falls through to it (a CID mismatch).
	parent    drivers.Driver
	parentAt  string
	parentErr error

	// mu is the metadata lock: it protects every sparse extent's grain
	// directory and grain table caches, its next grain and its end, and
	// cidDone. Lock order: allocMu, then mu.
	mu      coroutine.CoMutex
	cidDone bool

	// allocMu serialises grain allocations: each writes its whole grain,
	// syncs it and publishes it (GTE, then redundant GTE) before the next
	// starts. Held across data I/O; never taken by reads or by writes to
	// allocated grains.
	allocMu coroutine.CoMutex
}

var (
	_ drivers.Driver      = (*Driver)(nil)
	_ drivers.Informer    = (*Driver)(nil)
	_ drivers.Allocator   = (*Driver)(nil)
	_ drivers.FileLister  = (*Driver)(nil)
	_ drivers.LayerMapper = (*Driver)(nil)
	_ drivers.Checker     = (*Driver)(nil)
)

// Open opens the VMDK image at path: a hosted sparse extent
// (monolithicSparse, streamOptimized) or a text descriptor and its
// extents. It must not be called from a coroutine.
func Open(path string, opts drivers.OpenOptions) (*Driver, error) {
	if opts.Snapshot != "" {
		return nil, fmt.Errorf("vmdk: %s: snapshot %q: VMDK images have no internal snapshots: %w",
			path, opts.Snapshot, drivers.ErrUnsupported)
	}
	opts, err := drivers.EnterChain(path, opts)
	if err != nil {
		return nil, fmt.Errorf("vmdk: %w", err)
	}
	d := &Driver{path: path, readOnly: opts.ReadOnly, cidOff: -1}
	if err := d.open(opts); err != nil {
		d.Close()
		return nil, err
	}
	return d, nil
}

func (d *Driver) openFile(path string, opts drivers.OpenOptions) (*aio.File, error) {
	f, err := aio.Open(path, aio.Options{ReadOnly: opts.ReadOnly, NoDirectIO: opts.NoDirectIO, NoLock: opts.ForceShare})
	if err != nil {
		return nil, err
	}
	d.files = append(d.files, f)
	return f, nil
}

func (d *Driver) open(opts drivers.OpenOptions) error {
	f, err := d.openFile(d.path, opts)
	if err != nil {
		return fmt.Errorf("vmdk: %w", err)
	}
	fileSize, err := f.Size()
	if err != nil {
		return fmt.Errorf("vmdk: %w", err)
	}
	head := aio.AlignedBuffer(headerBytes)
	if err := f.Pread(head[:min(headerBytes, fileSize)], 0); err != nil {
		return fmt.Errorf("vmdk: %w", err)
	}
	cacheBytes := opts.CacheSize
	if cacheBytes <= 0 {
		cacheBytes = defaultCacheBytes
	}
	if m := string(head[:4]); m == magicKDMV || m == magicCOWD {
		// A hosted sparse extent opened by itself: its header gives the
		// size, its embedded descriptor the CID and any parent.
		sp, err := openSparse(f, d.path, fileSize, &d.mu, cacheBytes, opts.ReadOnly)
		if err != nil {
			return fmt.Errorf("vmdk: %s: %w", d.path, err)
		}
		if sp.h.descSize > 0 {
			n := min(sp.h.descSize*sector, maxDescriptor)
			text := aio.AlignedBuffer(int(n))
			if err := f.Pread(text, sp.h.descOff*sector); err != nil {
				return fmt.Errorf("vmdk: %w", err)
			}
			if d.desc, err = parseDescriptor(text); err != nil {
				return fmt.Errorf("vmdk: %s: embedded descriptor: %w", d.path, err)
			}
			if d.desc.cidAt >= 0 {
				d.cidFile, d.cidOff = f, sp.h.descOff*sector+int64(d.desc.cidAt)
			}
		}
		d.createType = "monolithicSparse"
		if sp.h.compressed() {
			d.createType = "streamOptimized"
		}
		d.extents = []*extent{{start: 0, size: sp.h.capacity * sector, kind: kindSparse, path: d.path, f: f, sp: sp, readOnly: opts.ReadOnly}}
	} else {
		if err := d.openDescriptorFile(f, fileSize, opts, cacheBytes); err != nil {
			return err
		}
	}
	for _, e := range d.extents {
		if e.sp != nil {
			e.sp.start = e.start
		}
		d.size += e.size
		if e.sp != nil && !opts.ReadOnly && !e.sp.writable() {
			return fmt.Errorf("vmdk: %s: %s extent %s is read-only (%s): open the image read-only: %w",
				d.path, d.createType, e.path, e.sp.whyReadOnly(), drivers.ErrUnsupported)
		}
	}
	if d.desc != nil && d.desc.parentHint != "" && !(opts.NoBacking && opts.ReadOnly) {
		return d.openParent(opts)
	}
	return nil
}

// openDescriptorFile opens the extents a text descriptor lists. Relative
// file names resolve against the descriptor's directory, as QEMU's
// path_combine does.
func (d *Driver) openDescriptorFile(f *aio.File, fileSize int64, opts drivers.OpenOptions, cacheBytes int64) error {
	if fileSize >= maxDescriptor {
		return fmt.Errorf("vmdk: %s: not a sparse extent, and too large (%d bytes) for a descriptor: %w", d.path, fileSize, drivers.ErrCorrupt)
	}
	text := aio.AlignedBuffer(int(fileSize))
	if err := f.Pread(text, 0); err != nil {
		return fmt.Errorf("vmdk: %w", err)
	}
	desc, err := parseDescriptor(text)
	if err != nil {
		return fmt.Errorf("vmdk: %s: %w", d.path, err)
	}
	d.desc, d.createType, d.textDesc = desc, desc.createType, true
	if desc.cidAt >= 0 {
		d.cidFile, d.cidOff = f, int64(desc.cidAt)
	}
	switch desc.createType {
	case "monolithicFlat", "twoGbMaxExtentFlat", "twoGbMaxExtentSparse", "vmfs", "monolithicSparse":
	default:
		return fmt.Errorf("vmdk: %s: create type %q (monolithicFlat, twoGbMaxExtentFlat, twoGbMaxExtentSparse and vmfs descriptors are supported): %w",
			d.path, desc.createType, drivers.ErrUnsupported)
	}
	if len(desc.extents) == 0 {
		return fmt.Errorf("vmdk: %s: a descriptor without extents: %w", d.path, drivers.ErrCorrupt)
	}
	var start int64
	for _, l := range desc.extents {
		e := &extent{start: start, size: l.sectors * sector, name: l.file, readOnly: opts.ReadOnly || l.access == "RDONLY"}
		if l.access == "NOACCESS" {
			return fmt.Errorf("vmdk: %s: a NOACCESS extent (%q): %w", d.path, l.file, drivers.ErrUnsupported)
		}
		if l.typ != "ZERO" {
			// Relative to the descriptor, as QEMU's path_combine (and a
			// remote descriptor's extents are fetched beside it).
			e.path = drivers.JoinParent(d.path, l.file)
		}
		switch l.typ {
		case "ZERO":
			e.kind = kindZero
			e.readOnly = true
		case "FLAT", "VMFS":
			e.kind = kindFlat
			ef, err := d.openFile(e.path, drivers.OpenOptions{ReadOnly: e.readOnly, NoDirectIO: opts.NoDirectIO, ForceShare: opts.ForceShare})
			if err != nil {
				return fmt.Errorf("vmdk: %s: extent: %w", d.path, err)
			}
			sz, err := ef.Size()
			if err != nil {
				return fmt.Errorf("vmdk: %w", err)
			}
			e.f, e.flatOff = ef, l.offset*sector
			if e.flatOff+e.size > sz {
				return fmt.Errorf("vmdk: %s: flat extent %s [%#x, +%#x) past the end of its file (%d bytes): %w",
					d.path, e.path, e.flatOff, e.size, sz, drivers.ErrCorrupt)
			}
		case "SPARSE":
			e.kind = kindSparse
			ef, err := d.openFile(e.path, drivers.OpenOptions{ReadOnly: e.readOnly, NoDirectIO: opts.NoDirectIO, ForceShare: opts.ForceShare})
			if err != nil {
				return fmt.Errorf("vmdk: %s: extent: %w", d.path, err)
			}
			sz, err := ef.Size()
			if err != nil {
				return fmt.Errorf("vmdk: %w", err)
			}
			if e.sp, err = openSparse(ef, e.path, sz, &d.mu, cacheBytes, e.readOnly); err != nil {
				return fmt.Errorf("vmdk: %s: extent %s: %w", d.path, e.path, err)
			}
			e.f = ef
			if e.sp.h.capacity < l.sectors {
				return fmt.Errorf("vmdk: %s: sparse extent %s holds %d sectors, the descriptor says %d: %w",
					d.path, e.path, e.sp.h.capacity, l.sectors, drivers.ErrCorrupt)
			}
		default:
			return fmt.Errorf("vmdk: %s: %s extents (%q): %w", d.path, l.typ, l.file, drivers.ErrUnsupported)
		}
		if !opts.ReadOnly && l.access != "RW" {
			return fmt.Errorf("vmdk: %s: extent %q is %s %s: open the image read-only: %w", d.path, l.file, l.access, l.typ, drivers.ErrUnsupported)
		}
		d.extents = append(d.extents, e)
		start += e.size
		if start > 1<<62 {
			return fmt.Errorf("vmdk: %s: extents add up past 2^62 bytes: %w", d.path, drivers.ErrCorrupt)
		}
	}
	return nil
}

// Size is the disk size: the extents' sizes added up.
func (d *Driver) Size() int64 { return d.size }

// Files implements drivers.FileLister: the image file and its extents,
// then the parent's.
func (d *Driver) Files() []drivers.ChainFile {
	out := []drivers.ChainFile{{Path: d.path, Role: "image"}}
	for _, e := range d.extents {
		if e.path != "" && e.path != d.path {
			out = append(out, drivers.ChainFile{Path: e.path, Role: "extent"})
		}
	}
	return drivers.LayerFiles(d.path, out, d.parent)
}

// piece is the part of a request inside one extent.
type piece struct {
	e       *extent
	in, pos int64 // offset inside the extent, inside the request
	n       int64
}

// split calls fn for each extent's piece of [off, off+n), in order.
func (d *Driver) split(off, n int64, fn func(piece) error) error {
	i := sort.Search(len(d.extents), func(i int) bool { return d.extents[i].start+d.extents[i].size > off })
	for pos := int64(0); pos < n && i < len(d.extents); i++ {
		e := d.extents[i]
		in := off + pos - e.start
		l := min(n-pos, e.size-in)
		if err := fn(piece{e: e, in: in, pos: pos, n: l}); err != nil {
			return err
		}
		pos += l
	}
	return nil
}

func (d *Driver) check(op string, off, n int64, errNo error) error {
	return drivers.InDisk("vmdk", d.path, op, off, n, d.size, errNo)
}

// ReadAt fills p from off; [off, off+len(p)) must lie inside the disk.
func (d *Driver) ReadAt(co *coroutine.Co, p []byte, off int64) (int, error) {
	if err := d.check("read", off, int64(len(p)), syscall.EINVAL); err != nil {
		return 0, err
	}
	err := d.split(off, int64(len(p)), func(pc piece) error {
		q := p[pc.pos : pc.pos+pc.n]
		switch pc.e.kind {
		case kindZero:
			clear(q)
			return nil
		case kindFlat:
			if err := pc.e.f.PreadCo(co, q, pc.e.flatOff+pc.in); err != nil {
				return fmt.Errorf("vmdk: %w", err)
			}
			return nil
		}
		return d.readSparse(co, pc.e.sp, q, pc.in)
	})
	if err != nil {
		return 0, err
	}
	return len(p), nil
}

// WriteAt writes p at off, inside the disk.
func (d *Driver) WriteAt(co *coroutine.Co, p []byte, off int64) (int, error) {
	if d.readOnly {
		return 0, fmt.Errorf("vmdk: %s: %w", d.path, drivers.ErrReadOnly)
	}
	if err := d.check("write", off, int64(len(p)), drivers.ErrNoSpace); err != nil {
		return 0, err
	}
	if err := d.touch(co); err != nil {
		return 0, err
	}
	err := d.split(off, int64(len(p)), func(pc piece) error {
		q := p[pc.pos : pc.pos+pc.n]
		if pc.e.readOnly {
			return fmt.Errorf("vmdk: %s: extent %s: %w", d.path, pc.e.name, drivers.ErrReadOnly)
		}
		if pc.e.kind == kindFlat {
			if err := pc.e.f.PwriteCo(co, q, pc.e.flatOff+pc.in); err != nil {
				return fmt.Errorf("vmdk: %w", err)
			}
			return nil
		}
		return d.writeSparse(co, pc.e.sp, q, pc.in)
	})
	if err != nil {
		return 0, err
	}
	return len(p), nil
}

// touch gives the image a new CID on the first write after open, as
// QEMU's vmdk_write_cid does: a child linked to this image (its parentCID)
// then sees that its parent changed. The 8 hex digits are rewritten in
// place and synced before the write goes on.
func (d *Driver) touch(co *coroutine.Co) error {
	d.mu.Lock(co)
	defer d.mu.Unlock(co)
	if d.cidDone || d.cidOff < 0 {
		return nil
	}
	cid := []byte(fmt.Sprintf("%08x", rand.Uint32()))
	if err := d.cidFile.PwriteCo(co, cid, d.cidOff); err != nil {
		return fmt.Errorf("vmdk: %s: updating the CID: %w", d.path, err)
	}
	if err := d.cidFile.FdatasyncCo(co); err != nil {
		return fmt.Errorf("vmdk: %w", err)
	}
	d.cidDone = true
	return nil
}

// Flush makes every write durable: grain table entries are written
// through when their request completes, so an fdatasync of each file is
// all.
func (d *Driver) Flush(co *coroutine.Co) error {
	if d.readOnly {
		return nil
	}
	for _, f := range d.files {
		if err := f.FdatasyncCo(co); err != nil {
			return fmt.Errorf("vmdk: %w", err)
		}
	}
	return nil
}

// Discard makes [off, off+n) read as zeros (WriteZeroes).
func (d *Driver) Discard(co *coroutine.Co, off, n int64) error {
	return d.WriteZeroes(co, off, n, true)
}

// WriteZeroes makes [off, off+n) read as zeros. Whole grains of a sparse
// extent with zeroed-grain entries become zeroed grains (their old grain
// leaks, as in QEMU); elsewhere allocated grains and flat extents get
// zeros written, and unallocated grains, already zeros, are left alone.
func (d *Driver) WriteZeroes(co *coroutine.Co, off, n int64, unmap bool) error {
	if d.readOnly {
		return fmt.Errorf("vmdk: %s: %w", d.path, drivers.ErrReadOnly)
	}
	if err := d.check("zero", off, n, drivers.ErrNoSpace); err != nil {
		return err
	}
	if err := d.touch(co); err != nil {
		return err
	}
	return d.split(off, n, func(pc piece) error {
		if pc.e.readOnly {
			return fmt.Errorf("vmdk: %s: extent %s: %w", d.path, pc.e.name, drivers.ErrReadOnly)
		}
		if pc.e.kind == kindFlat {
			return writeZeros(co, pc.e.f, pc.e.flatOff+pc.in, pc.n)
		}
		return d.zeroSparse(co, pc.e.sp, pc.in, pc.n)
	})
}

// LayerStatus implements drivers.LayerMapper as QEMU's
// vmdk_co_block_status does: a flat extent is data at its offset; in a
// sparse extent an allocated grain is data at its offset (a compressed
// one without an offset), a zeroed grain reads as zeros, an unallocated
// one is left to the layer below (none: zeros). ZERO extents are zeros.
func (d *Driver) LayerStatus(co *coroutine.Co, off int64) (drivers.LayerStatus, error) {
	if off < 0 || off >= d.size {
		return drivers.LayerStatus{}, fmt.Errorf("vmdk: %s: block status at %#x outside the disk (size %#x): %w",
			d.path, off, d.size, syscall.EINVAL)
	}
	var st drivers.LayerStatus
	err := d.split(off, 1, func(pc piece) error {
		e := pc.e
		switch e.kind {
		case kindZero:
			st = drivers.LayerStatus{Off: off, Len: e.size - pc.in, Zero: true}
		case kindFlat:
			st = drivers.LayerStatus{Off: off, Len: e.size - pc.in, Data: true, HasOffset: true, Offset: e.flatOff + pc.in}
		default:
			var err error
			st, err = d.sparseStatus(co, e.sp, pc.in, e.size)
			st.Off = off
			return err
		}
		return nil
	})
	return st, err
}

// HostStatus implements drivers.HostMapper: under a flat extent qemu-img
// map reports the holes of its file as zeros (QEMU's vmdk sets
// BDRV_BLOCK_RECURSE for flat extents); sparse extents' grains are data
// throughout, as QEMU reports them.
func (d *Driver) HostStatus(st drivers.LayerStatus) (zero bool, n int64) {
	zero, n = false, st.Len
	d.split(st.Off, 1, func(pc piece) error {
		if pc.e.kind == kindFlat && pc.e.f != nil {
			zero, n = blocktab.HostStatus(pc.e.f, st.Offset, st.Len)
		}
		return nil
	})
	return zero, n
}

// MapFile implements drivers.FileMapper: the extent file holding off.
func (d *Driver) MapFile(off int64) string {
	var name string
	d.split(off, 1, func(pc piece) error {
		name = pc.e.path
		return nil
	})
	return name
}

// BackingLayer implements drivers.LayerMapper: the parent, if any.
func (d *Driver) BackingLayer() drivers.Driver { return d.parent }

// BlockStatus describes the disk from off (LayerStatus): what the image
// leaves to its parent is the parent's status (zeros past its end or
// without a parent).
func (d *Driver) BlockStatus(co *coroutine.Co, off int64) (drivers.Extent, error) {
	st, err := d.LayerStatus(co, off)
	if err != nil {
		return drivers.Extent{}, err
	}
	return drivers.LayerBlockStatus(co, st, off, d.parent)
}

// Truncate refuses any change of size (QEMU's vmdk driver cannot resize
// either); the current size is accepted.
func (d *Driver) Truncate(co *coroutine.Co, size int64) error {
	if size == d.size {
		return nil
	}
	if d.readOnly {
		return fmt.Errorf("vmdk: %s: %w", d.path, drivers.ErrReadOnly)
	}
	return fmt.Errorf("vmdk: %s: resizing VMDK images is not supported: %w", d.path, drivers.ErrUnsupported)
}

// Allocated implements drivers.Allocator: the files' allocated bytes
// (and the parent's), clamped to the disk.
func (d *Driver) Allocated() int64 {
	var a int64
	if d.parent != nil {
		a = drivers.AllocatedOf(d.parent)
	}
	for _, f := range d.files {
		n, err := f.Allocated()
		if err != nil {
			return d.size
		}
		a += n
	}
	return min(a, d.size)
}

// Close closes every file after in-flight I/O. It does not flush.
func (d *Driver) Close() error {
	var first error
	for _, f := range d.files {
		if err := f.Close(); err != nil && first == nil {
			first = fmt.Errorf("vmdk: %w", err)
		}
	}
	d.files = nil
	if d.parent != nil {
		if err := d.parent.Close(); err != nil && first == nil {
			first = err
		}
		d.parent = nil
	}
	return first
}

// vmdkInfo is QEMU's ImageInfoSpecificVmdk.
type vmdkInfo struct {
	CID        uint32       `json:"cid"`
	ParentCID  uint32       `json:"parent-cid"`
	CreateType string       `json:"create-type"`
	Extents    []extentInfo `json:"extents"`
}

type extentInfo struct {
	Compressed  bool   `json:"compressed,omitempty"`
	VirtualSize int64  `json:"virtual-size"`
	Filename    string `json:"filename"`
	ClusterSize int64  `json:"cluster-size,omitempty"`
	Format      string `json:"format"`
}

// Info describes the image as qemu-img info does, with the vmdk
// format-specific block (CID, create type, extents).
func (d *Driver) Info() drivers.ImageInfo {
	info := drivers.ImageInfo{Filename: d.path, Format: "vmdk", VirtualSize: d.size}
	vi := vmdkInfo{ParentCID: 0xffffffff, CreateType: d.createType}
	if d.desc != nil {
		vi.CID, vi.ParentCID = d.desc.cid, d.desc.parentCID
	}
	for i, e := range d.extents {
		x := extentInfo{VirtualSize: e.size, Filename: e.path}
		if d.textDesc {
			x.Format = d.desc.extents[i].typ
		}
		if e.sp != nil {
			x.ClusterSize = e.sp.grainBytes
			x.Compressed = e.sp.h.compressed()
			if info.ClusterSize == 0 {
				info.ClusterSize = e.sp.grainBytes
			}
		}
		vi.Extents = append(vi.Extents, x)
	}
	// As vmdk_get_allocated_file_size: the descriptor and every extent.
	info.FileSize = drivers.DiskUsage(append([]string{d.path}, extentPaths(d.extents)...)...)
	info.AllocatedSize = info.FileSize
	if d.desc != nil && d.desc.parentHint != "" {
		// As QEMU's vmdk_parent_open: the hint as written, format vmdk.
		info.SetBacking(d.desc.parentHint, "vmdk", d.parent)
	}
	info.FormatSpecific = &drivers.FormatSpecific{Type: "vmdk", Data: vi}
	return info
}

// extentPaths lists the extent files other than the image file.
func extentPaths(es []*extent) []string {
	var out []string
	seen := map[string]bool{}
	for _, e := range es {
		if e.path != "" && e.name != "" && !seen[e.path] {
			seen[e.path] = true
			out = append(out, e.path)
		}
	}
	return out
}
