package qcow2

import (
	"encoding/binary"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"

	"imgfuse/aio"
	"imgfuse/cache"
	"imgfuse/coroutine"
	"imgfuse/drivers"
)

// Format is the qcow2 image format.
type Format struct{}

var (
	_ drivers.Format      = Format{}
	_ drivers.Driver      = (*image)(nil)
	_ drivers.Snapshotter = (*image)(nil)
	_ drivers.Informer    = (*image)(nil)
	_ drivers.Damaged     = (*image)(nil)
	_ drivers.FileLister  = (*image)(nil)
)

// Name implements drivers.Format.
func (Format) Name() string { return "qcow2" }

// Probe implements drivers.Format: 100 on the qcow2 magic, whatever
// version follows it but 1, so that a corrupt or unsupported qcow2 file
// fails to open as qcow2 rather than being exposed as a raw disk (and its
// header as guest data). Version 1 is the older qcow format, another
// format with the same magic (QEMU's qcow2 probe wants version 2 or more,
// its qcow probe exactly 1).
func (Format) Probe(in drivers.ProbeInput) int {
	hdr := in.Head
	if len(hdr) < 4 || binary.BigEndian.Uint32(hdr) != magic {
		return 0
	}
	if len(hdr) >= 8 && binary.BigEndian.Uint32(hdr[4:]) == 1 {
		return 0
	}
	return 100
}

// Open implements drivers.Format. It must not be called from a coroutine.
// The image is opened read-write unless opts.ReadOnly is set or a snapshot
// is selected (a snapshot is always exposed read-only). Backing files are
// always opened read-only.
func (Format) Open(path string, opts drivers.OpenOptions) (drivers.Driver, error) {
	return openImage(path, opts, &chain{})
}

// headerReadSize is how much of the file the header parser is given: the
// largest cluster 0 (header, extensions and backing file name all live in
// the first cluster).
const headerReadSize = 1 << maxClusterBits

// l2CacheMax caps the L2 cache (QEMU's default on Linux).
const l2CacheMax = 32 << 20

// image is an open qcow2 image.
type image struct {
	// Immutable after open.
	path string
	file *aio.File
	// data holds guest data: file itself, or the external data file.
	data     *aio.File
	dataPath string
	// dataErr is why data is nil: the external data file could not be
	// opened and the open asked for NoDataFile (describing the image).
	dataErr error
	h       *header
	// writable: the image was opened read-write (never for a snapshot
	// view or a backing file). lazy: lazy refcounts are on for this
	// open. growable: writes past the end grow the disk.
	writable bool
	lazy     bool
	growable bool
	// staleRefcounts: a dirty image opened for a repair (QEMU's
	// BDRV_O_CHECK) whose refcounts were not rebuilt at open: the check
	// finds and fixes what the crash left, and only a repair that leaves
	// no corruption clears the dirty bit (Close keeps it). Protected by
	// mu.
	staleRefcounts bool
	// extData: the image has an external data file (a copy of the
	// header bit, which may be read without the lock).
	extData bool
	// size is the virtual disk size: the header's, or the selected
	// snapshot's. Read without the lock (Size, bounds checks); changed
	// only by a grow, under mu.
	size atomic.Int64
	// l2Format is the cluster geometry and how L2 entries decode.
	l2Format
	// backing is the next layer down, nil if none; backingSize its size.
	backing     drivers.Driver
	backingSize int64
	// snaps is the snapshot table read at open.
	snaps []snapshotEntry
	// snapshot is the snapshot being exposed, nil for the active disk.
	snapshot *snapshotEntry

	// mu is the metadata lock. It protects h (once open: L1 and
	// refcount table location, size, feature bits), l1, l2, rc, allocs
	// and fileSize, and is held across metadata I/O (table reads and
	// writes, header writes) but never across data I/O.
	mu coroutine.CoMutex
	// l1 is the L1 table in use (the active one, or the snapshot's),
	// when read whole at open (see loadL1); nil when l1c is used.
	// Protected by mu.
	l1 []uint64
	// l1c caches pieces of a large L1 table of a read-only image (a
	// backing layer, a snapshot view), read as lookups reach them;
	// l1Off and l1Size locate the table (immutable). Protected by mu.
	l1c    *cache.Cache
	l1Off  int64
	l1Size int64
	// l1Short: the L1 table of this read-only image runs past the end
	// of the file (a truncated copy); only its first l1Avail entries lie
	// inside it. The entries past them are never read: a lookup there
	// fails with ErrCorrupt. A writable image never has a short table
	// (l1Avail is then l1Size, and stale once the table grows). Immutable.
	l1Short bool
	l1Avail int64
	// damage is the first piece of metadata found past the end of the
	// file at open (bounds.go), for a read-only image; nil if none. A
	// writable open refuses such an image instead. Immutable.
	damage error
	// rc is the refcount layer; nil unless writable. Protected by mu.
	rc *refcounts
	// allocs are the allocating writes in flight: host clusters chosen,
	// L2 entries not yet written (see write.go). Protected by mu.
	allocs []*allocation
	// inPlace counts in-place data writes in flight: mapped under mu into
	// a COPIED cluster, then written without it. Before lowering the
	// refcount of clusters it unmapped, a discard waits (holding mu, so
	// no new ones start) until this is zero, so that such a write can
	// never land in a cluster already handed to another guest offset.
	inPlace atomic.Int64
	// drainMu protects drainer, the coroutine waiting for inPlace to
	// reach zero. A leaf lock, never held across a yield.
	drainMu sync.Mutex
	drainer *coroutine.Co
	// broken is set when a write found the image corrupt (and set the
	// corrupt bit): every later write, zero write, resize, flush and the
	// clean close fail; reads still work. Protected by mu.
	broken error
	// l2 caches L2 tables, one cluster each. Protected by mu.
	l2 *cache.Cache
	// fileSize is the image file's size; host offsets at or past it are
	// corrupt. Protected by mu.
	fileSize int64
	// l2Set holds the offsets of the L2 tables the L1 table in use
	// names, sorted, for the overlap checks (overlap.go): built at open
	// for a writable image, on the first checked read for a read-only
	// one whose L1 table is read whole (readMetaLocked); nil otherwise.
	// Protected by mu.
	l2Set []int64
	// readMeta: what the read-side overlap check needs is in place
	// (l2Set, roBlocks); roBlocks holds the refcount block offsets of a
	// read-only image, sorted (a writable one has rc.blockSet). Both
	// protected by mu.
	readMeta bool
	roBlocks []int64
	// readHitLogged: a read into metadata was logged (once per open
	// image). Protected by mu.
	readHitLogged bool
	// logf receives notices for the daemon's log
	// (drivers.OpenOptions.Logf); nil to drop them. Immutable.
	logf func(format string, args ...any)
	// snapTableBytes is the size of the snapshot table. Immutable.
	snapTableBytes int64
	// metaFixed is the size of the tables Allocated counts as metadata
	// whatever the image holds (header cluster, L1 table, refcount table,
	// snapshot table, snapshot L1 tables, as read at open), and
	// refBlockCover the bytes of file one refcount block covers
	// (allocated.go). Immutable.
	metaFixed, refBlockCover int64
	// l2Tables counts the L2 tables the L1 table in use names: counted at
	// open when the table is read whole, kept up to date by setL1Locked;
	// 0 (unknown) when it is read in pieces. Written under mu, read
	// without it by Allocated.
	l2Tables atomic.Int64

	// srcPool holds *[]byte buffers for compressed streams.
	srcPool sync.Pool
	// cowPool holds *[]byte buffers for writes merged with COW data.
	cowPool sync.Pool

	// zmu protects zcache. Never held across a yield.
	zmu sync.Mutex
	// zcache holds recently decompressed clusters. Protected by zmu.
	zcache zcache

	// mapPrealloc caches LayerStatus's guess whether the image has
	// metadata preallocation (mapinfo.go): 0 not made yet, 1 no, 2 yes.
	mapPrealloc atomic.Int32
}

// chain carries what an open needs to know about the images above it in a
// backing chain.
type chain struct {
	depth int
	// seen holds the device and inode of every file opened so far.
	seen []fileID
	urls []string // the remote images of the chain
	// meta is the metadata memory charged so far (charge), l2Bytes the
	// part of it in L2 caches.
	meta, l2Bytes int64
}

// maxChainDepth bounds the backing chain (see the package doc).
const maxChainDepth = 64

// openImage opens the qcow2 image at path as one layer of a chain. It must
// not be called from a coroutine.
func openImage(path string, opts drivers.OpenOptions, ch *chain) (d *image, err error) {
	defer func() { err = named(path, err) }()
	if err := ch.enter(path); err != nil {
		return nil, err
	}
	writable := !opts.ReadOnly && opts.Snapshot == ""
	f, err := aio.Open(path, aio.Options{ReadOnly: !writable, NoDirectIO: opts.NoDirectIO, NoLock: opts.ForceShare && !writable})
	if err != nil {
		return nil, &imageError{err: err}
	}
	img := &image{path: path, file: f, data: f, dataPath: path, writable: writable, growable: opts.Growable, logf: opts.Logf}
	defer func() {
		if err != nil {
			img.Close()
		}
	}()
	if img.fileSize, err = f.Size(); err != nil {
		return nil, err
	}
	buf := make([]byte, min(int64(headerReadSize), img.fileSize))
	if err := f.Pread(buf, 0); err != nil {
		return nil, fmt.Errorf("reading the header: %w", err)
	}
	h, err := parseHeader(buf, img.fileSize)
	if err != nil {
		return nil, err
	}
	img.h = h
	img.extData = h.hasDataFile()
	img.size.Store(int64(h.Size))
	img.l2Format = newL2Format(h)

	if h.NbSnapshots > 0 {
		read := func(off int64, p []byte) error { return f.Pread(p, off) }
		if img.snaps, err = readSnapshotTable(read, h); err != nil {
			return nil, err
		}
		img.snapTableBytes = snapshotTableBytes(img.snaps)
	}
	l1Off, l1Size := h.L1Offset, h.L1Size
	if opts.Snapshot != "" {
		s, err := findSnapshot(img.snaps, opts.Snapshot)
		if err != nil {
			return nil, err
		}
		img.snapshot = s
		l1Off, l1Size = s.L1Offset, s.L1Size
		if s.DiskSize != 0 {
			if s.DiskSize > 1<<62 {
				return nil, fmt.Errorf("snapshot %q has disk size %d: %w", s.Name, s.DiskSize, drivers.ErrCorrupt)
			}
			img.size.Store(int64(s.DiskSize))
		}
	}
	if err := img.openL1(l1Off, l1Size); err != nil {
		return nil, err
	}
	// A writable open of an image whose metadata points past the end of
	// the file is refused before anything is written; a read-only one
	// goes on and reports it (Damage). A repair open goes on too: the
	// check and its repairs are the way to deal with it.
	if dmg := img.checkBounds(); dmg != nil {
		img.damage = &drivers.DamageError{Format: "qcow2", Path: path, Err: dmg}
		if writable && !opts.Repair {
			return nil, img.damage
		}
	}
	img.initAllocated()
	l2Tables := ch.l2Share(img.l2CacheTables(opts.CacheSize), img.clusterSize, opts.CacheSize)
	img.l2 = cache.New("L2", l2Tables, int(img.clusterSize), l2Backend{img})
	if opts.CacheSize > 0 && img.logf != nil {
		// The bound in force can differ from the one asked for (at
		// least two tables, whole tables, the chain's share): say it.
		img.logf("qcow2: %s: the L2 cache holds at most %d tables of %d bytes (%d bytes asked for)",
			path, l2Tables, img.clusterSize, opts.CacheSize)
	}
	if err := ch.charge(img, l2Tables); err != nil {
		return nil, err
	}

	if err := img.openDataFile(opts); err != nil {
		return nil, err
	}
	if err := img.openBacking(opts, ch); err != nil {
		return nil, err
	}
	if writable {
		if err := img.openWritable(opts); err != nil {
			return nil, err
		}
	}
	return img, nil
}

// openL1 validates the location of the L1 table in use and reads it
// whole (loadL1) or, for a read-only image with a table larger than
// l1LoadMax, sets up l1c to read it in pieces on demand. Its entries are
// validated when used (see l2OffsetLocked), so a damaged entry costs the
// reads it covers, not the whole image.
func (img *image) openL1(off uint64, entries uint32) error {
	n := int64(entries) * 8
	if n > maxL1Bytes {
		return fmt.Errorf("L1 table of %d entries is too large: %w", entries, drivers.ErrCorrupt)
	}
	if off%uint64(img.clusterSize) != 0 {
		return fmt.Errorf("L1 table offset %#x is not cluster-aligned: %w", off, drivers.ErrCorrupt)
	}
	img.l1Off, img.l1Size, img.l1Avail = int64(off), int64(entries), int64(entries)
	// QEMU always writes the whole table, so a table that runs past EOF
	// means a truncated file: reading its tail as zeros would silently
	// turn allocated clusters into holes. A writable open refuses it; a
	// read-only one uses the entries the file holds and fails lookups
	// past them (l1Avail), and checkBounds reports the table.
	if n > 0 && pastEOF(off, uint64(n), img.fileSize) {
		if img.writable {
			return l1PastEOF("L1 table", off, n, img.fileSize)
		}
		img.l1Short, img.l1Avail = true, 0
		if off < uint64(img.fileSize) {
			img.l1Avail = (img.fileSize - int64(off)) / 8
		}
	}
	if !img.writable && n > l1LoadMax {
		img.l1c = cache.New("L1", l1CacheChunks, l1Chunk, l1Backend{img})
		return nil
	}
	var err error
	img.l1, err = img.loadL1()
	return err
}

// loadL1 reads the whole L1 table, decoding it through a small buffer so
// that the table is in memory once.
func (img *image) loadL1() ([]uint64, error) {
	l1 := make([]uint64, img.l1Size)
	buf := make([]byte, min(img.l1Avail*8, 64<<10))
	for i := int64(0); i < img.l1Avail; {
		k := min(img.l1Avail-i, int64(len(buf))/8)
		if err := img.file.Pread(buf[:k*8], img.l1Off+i*8); err != nil {
			return nil, fmt.Errorf("reading the L1 table at %#x: %w", img.l1Off, err)
		}
		for j := range k {
			l1[i+j] = binary.BigEndian.Uint64(buf[j*8:])
		}
		i += k
	}
	return l1, nil
}

// L1 tables larger than l1LoadMax bytes (a 64 TiB disk with 64 KiB
// clusters, 512 GiB with 512-byte ones) of read-only images are read in
// l1Chunk pieces, at most l1CacheChunks of them kept (see the package doc).
const (
	l1LoadMax     = 1 << 20
	l1Chunk       = 4096
	l1CacheChunks = 64
)

// l1Backend reads pieces of a lazily read L1 table; bytes past its end
// read as zeros (never used).
type l1Backend struct{ img *image }

func (b l1Backend) ReadTable(co *coroutine.Co, off int64, p []byte) error {
	n := min(int64(len(p)), b.img.l1Off+b.img.l1Size*8-off)
	clear(p[n:])
	return b.img.file.PreadCo(co, p[:n], off)
}

func (b l1Backend) WriteTable(co *coroutine.Co, off int64, p []byte) error {
	return fmt.Errorf("writing the L1 table at %#x: %w", off, drivers.ErrReadOnly)
}

func (b l1Backend) Sync(co *coroutine.Co) error { return nil }

// l1EntryLocked returns L1 entry i (< l1Entries()).
func (img *image) l1EntryLocked(co *coroutine.Co, i int64) (uint64, error) {
	img.mu.AssertHeld(co)
	if img.l1c == nil {
		return img.l1[i], nil
	}
	chunk := (i * 8) &^ (l1Chunk - 1)
	t, err := img.l1c.Get(co, img.l1Off+chunk)
	if err != nil {
		return 0, fmt.Errorf("L1 table at %#x: %w", img.l1Off, err)
	}
	e := binary.BigEndian.Uint64(t.Bytes()[i*8-chunk:])
	img.l1c.Put(t)
	return e, nil
}

// l1Entries returns the number of L1 entries.
func (img *image) l1Entries() int64 {
	if img.l1c == nil {
		return int64(len(img.l1))
	}
	return img.l1Size
}

// l2CacheTables sizes the L2 cache: enough tables to map the whole disk,
// at most limit bytes (l2CacheMax if limit is 0), at least 2 tables.
func (img *image) l2CacheTables(limit int64) int {
	if limit <= 0 {
		limit = l2CacheMax
	}
	perTable := img.clusterSize << img.l2Bits // guest bytes one L2 table maps
	need := (img.size.Load() + perTable - 1) / perTable
	need = min(need, limit/img.clusterSize)
	return int(max(need, 2))
}

// l2Backend does the L2 cache's I/O on the image file.
type l2Backend struct{ img *image }

func (b l2Backend) ReadTable(co *coroutine.Co, off int64, p []byte) error {
	return b.img.file.PreadCo(co, p, off)
}

func (b l2Backend) WriteTable(co *coroutine.Co, off int64, p []byte) error {
	if !b.img.writable {
		return fmt.Errorf("writing L2 table at %#x: %w", off, drivers.ErrReadOnly)
	}
	// Called under mu (the cache is only used with it held).
	if err := b.img.guardLocked(co, off, int64(len(p)), olActiveL2); err != nil {
		return err
	}
	return b.img.file.PwriteCo(co, p, off)
}

func (b l2Backend) Sync(co *coroutine.Co) error {
	if !b.img.writable {
		return nil
	}
	return b.img.file.FdatasyncCo(co)
}

// Size implements drivers.Driver.
func (img *image) Size() int64 { return img.size.Load() }

func (img *image) readOnly(op string) error {
	return fmt.Errorf("%s: %w", op, drivers.ErrReadOnly)
}

// Close implements drivers.Driver: it closes the backing chain and the
// files. The Driver contract does not ask Close to flush, but a writable
// image is flushed completely here anyway (L2 tables, refcount blocks, even
// in lazy mode, fdatasync) and only then is its dirty bit cleared: a close
// that did not flush must not mark the image clean, and flushing here
// makes that decision safe whatever the caller did before. Callers must
// not have requests in flight.
func (img *image) Close() (err error) {
	defer img.nameErr(&err)
	var first error
	keep := func(err error) {
		if err != nil && first == nil {
			first = err
		}
	}
	if img.writable && img.rc != nil && img.file != nil {
		coroutine.Run(func(co *coroutine.Co) { keep(img.closeClean(co)) })
		img.rc = nil
	}
	if img.backing != nil {
		keep(img.backing.Close())
		img.backing = nil
	}
	if img.data != nil && img.data != img.file {
		keep(img.data.Close())
	}
	img.data = nil
	if img.file != nil {
		keep(img.file.Close())
		img.file = nil
	}
	return first
}

// Snapshots implements drivers.Snapshotter.
func (img *image) Snapshots() []drivers.Snapshot {
	out := make([]drivers.Snapshot, 0, len(img.snaps))
	for i := range img.snaps {
		info := img.snaps[i].info()
		if info.DiskSize == 0 {
			// v2 entries carry no disk size: the snapshot has the
			// image's size, as QEMU assumes.
			info.DiskSize = int64(img.h.Size)
		}
		out = append(out, info)
	}
	return out
}

// Info implements drivers.Informer.
func (img *image) Info() drivers.ImageInfo {
	fi := img.h.formatInfo()
	info := drivers.ImageInfo{
		Filename:        img.path,
		Format:          "qcow2",
		VirtualSize:     img.size.Load(),
		ClusterSize:     img.clusterSize,
		Dirty:           fi.Dirty,
		BackingFilename: img.h.BackingFile,
		BackingFormat:   img.h.BackingFormat,
		DataFile:        fi.DataFile,
		FormatSpecific:  &drivers.FormatSpecific{Type: "qcow2", Data: img.qemuSpecific()},
		Extra:           fi,
		Snapshots:       img.Snapshots(),
	}
	if sz, err := img.file.Size(); err == nil {
		info.FileSize = sz
	}
	if in, ok := img.backing.(drivers.Informer); ok {
		b := in.Info()
		info.Backing = &b
	}
	return info
}

// openWritable prepares an image opened read-write (QEMU's qcow2_do_open
// for a writable node): it refuses what must not be written, loads the
// refcounts, repairs a dirty image, and clears unknown autoclear bits. It
// must not be called from a coroutine.
func (img *image) openWritable(opts drivers.OpenOptions) error {
	h := img.h
	if h.Incompatible&incompatCorrupt != 0 && !opts.Repair {
		return fmt.Errorf("the image is marked corrupt; it can only be opened read-only (repair it with imgfuse check -r all): %w", drivers.ErrCorrupt)
	}
	if h.HasBitmaps {
		// Writing without maintaining the bitmaps means clearing
		// autoclear bit 0, after which QEMU drops them and their
		// clusters leak (qemu-img check then reports leaks). Refusing
		// keeps both the bitmaps and a clean image.
		return fmt.Errorf("the image has persistent dirty bitmaps, which imgfuse does not maintain; open it read-only, or remove them first (qemu-img bitmap --remove): %w",
			drivers.ErrUnsupported)
	}
	img.lazy = h.Compatible&compatLazyRefcounts != 0 || opts.LazyRefcounts
	if opts.LazyRefcounts && h.Version < 3 {
		return fmt.Errorf("lazy refcounts need a version 3 image (compat=1.1): %w", drivers.ErrUnsupported)
	}
	rc, err := openRefcounts(nil, img.file, h, img.fileSize, img.l2)
	if err != nil {
		return err
	}
	rc.mu = &img.mu
	rc.guard = img.guardLocked
	img.l2Set = buildL2Set(img.l1)
	img.rc = rc
	coroutine.Run(func(co *coroutine.Co) {
		img.mu.Lock(co)
		defer img.mu.Unlock(co)
		if h.Incompatible&incompatDirty != 0 {
			if opts.Repair {
				// As qemu-img check -r: the check reports and
				// repairs the refcounts itself.
				img.staleRefcounts = true
			} else if err = img.repairLocked(co); err != nil {
				return
			}
		}
		// Unknown autoclear bits describe structures this writer does
		// not maintain: clear them before the first write (and rewrite
		// the whole header, as QEMU does; unknown extensions and
		// compatible bits are kept).
		if unknown := h.Autoclear &^ (autoclearBitmaps | autoclearDataFileRaw); unknown != 0 {
			h.Autoclear &^= unknown
			err = img.writeHeaderLocked(co)
		}
	})
	if err != nil {
		img.rc = nil
		return err
	}
	return nil
}

// repairLocked rebuilds the refcounts of a dirty image from its tables
// (the refcounts may be stale after a crash with lazy refcounts) and clears
// the dirty bit.
func (img *image) repairLocked(co *coroutine.Co) error {
	img.mu.AssertHeld(co)
	if err := img.rebuildRefcountsLocked(co); err != nil {
		return fmt.Errorf("rebuilding the refcounts of a dirty image: %w", err)
	}
	img.fileSize = max(img.fileSize, img.rc.end)
	return img.setIncompatibleLocked(co, img.h.Incompatible&^incompatDirty)
}

// setIncompatibleLocked writes the incompatible feature word v with a sync
// write (the dirty bit protocol needs it on disk before what follows).
func (img *image) setIncompatibleLocked(co *coroutine.Co, v uint64) error {
	img.mu.AssertHeld(co)
	if v == img.h.Incompatible {
		return nil
	}
	var b [8]byte
	binary.BigEndian.PutUint64(b[:], v)
	if err := img.syncWriteLocked(co, b[:], 72, olHeader); err != nil {
		return fmt.Errorf("writing the incompatible feature bits: %w", err)
	}
	img.h.Incompatible = v
	return nil
}

// markDirtyLocked sets the dirty bit, synchronously, before the first L2
// or L1 update of a lazy-refcounts image (QEMU's qcow2_mark_dirty).
func (img *image) markDirtyLocked(co *coroutine.Co) error {
	img.mu.AssertHeld(co)
	if !img.lazy || img.h.Incompatible&incompatDirty != 0 {
		return nil
	}
	return img.setIncompatibleLocked(co, img.h.Incompatible|incompatDirty)
}

// syncWriteLocked writes p at off in the image file and fdatasyncs it,
// after the overlap check (ign: the kinds of metadata it writes).
func (img *image) syncWriteLocked(co *coroutine.Co, p []byte, off int64, ign metaKind) error {
	img.mu.AssertHeld(co)
	if err := img.checkWriteLocked(co, off, int64(len(p)), ign); err != nil {
		return err
	}
	if err := img.file.PwriteCo(co, p, off); err != nil {
		return err
	}
	return img.file.FdatasyncCo(co)
}

// writeHeaderLocked rewrites cluster 0 from img.h (unknown fields,
// extensions and compatible bits preserved) with a sync write.
func (img *image) writeHeaderLocked(co *coroutine.Co) error {
	img.mu.AssertHeld(co)
	buf, err := marshalHeaderCluster(img.h)
	if err != nil {
		return err
	}
	if err := img.syncWriteLocked(co, buf, 0, olHeader); err != nil {
		return fmt.Errorf("writing the header: %w", err)
	}
	return nil
}

// Flush implements drivers.Driver: dirty L2 tables are written (after the
// refcount blocks they depend on), then the refcount blocks unless the
// dirty bit makes them optional (lazy refcounts), then the image file and
// the data file are fdatasynced. Header updates are always synchronous, so
// nothing else is pending.
func (img *image) Flush(co *coroutine.Co) (err error) {
	defer img.nameErr(&err)
	if !img.writable {
		return nil
	}
	img.mu.Lock(co)
	err = img.broken
	if err == nil {
		err = img.l2.Write(co)
	}
	if err == nil && img.h.Incompatible&incompatDirty == 0 {
		err = img.rc.writeLocked(co)
	}
	img.mu.Unlock(co)
	if err != nil {
		return fmt.Errorf("flush: %w", err)
	}
	return img.syncFiles(co)
}

// syncFiles fdatasyncs the image file and the data file.
func (img *image) syncFiles(co *coroutine.Co) error {
	if err := img.file.FdatasyncCo(co); err != nil {
		return fmt.Errorf("flush: %w", err)
	}
	if img.data != img.file {
		if err := img.data.FdatasyncCo(co); err != nil {
			return fmt.Errorf("flush: %w", err)
		}
	}
	return nil
}

// closeClean flushes everything, refcounts included, and then clears the
// dirty bit: only a fully flushed image may be marked clean.
func (img *image) closeClean(co *coroutine.Co) error {
	img.mu.Lock(co)
	defer img.mu.Unlock(co)
	if img.broken != nil {
		return img.broken
	}
	err := img.l2.Flush(co)
	if err == nil {
		err = img.rc.flushLocked(co)
	}
	if err == nil && img.data != img.file {
		err = img.data.FdatasyncCo(co)
	}
	if err == nil {
		err = img.file.FdatasyncCo(co)
	}
	if err == nil && !img.staleRefcounts {
		err = img.setIncompatibleLocked(co, img.h.Incompatible&^incompatDirty)
	}
	if err != nil {
		return fmt.Errorf("close: %w", err)
	}
	return nil
}

// rebuildRefcountsLocked recomputes the refcounts from the image's tables.
func (img *image) rebuildRefcountsLocked(co *coroutine.Co) error {
	img.mu.AssertHeld(co)
	read := func(off int64, p []byte) error { return img.file.PreadCo(co, p, off) }
	return img.rc.rebuildLocked(co, read, img.snaps)
}

// signalCorruptionLocked handles an error of a metadata update: if it says
// the image is corrupt, the corrupt bit is set (best effort, QEMU's
// qcow2_signal_corruption) and every later write, zero write, resize and
// the clean close fail, so nothing builds on the damage; reads go on. It
// returns err.
func (img *image) signalCorruptionLocked(co *coroutine.Co, err error) error {
	img.mu.AssertHeld(co)
	if err == nil || !errors.Is(err, drivers.ErrCorrupt) || img.broken != nil {
		return err
	}
	img.broken = fmt.Errorf("the image was marked corrupt and is no longer written: %w", err)
	_ = img.setIncompatibleLocked(co, img.h.Incompatible|incompatCorrupt)
	return err
}
