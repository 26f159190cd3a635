package qcow2

import (
	"encoding/binary"
	"fmt"
	"sync"

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
)

// Name implements drivers.Format.
func (Format) Name() string { return "qcow2" }

// Probe implements drivers.Format: 100 on the qcow2 magic, whatever follows
// it, so that a corrupt or unsupported qcow2 file fails to open as qcow2
// rather than being exposed as a raw disk (and its header as guest data).
func (Format) Probe(hdr []byte) int {
	if len(hdr) >= 4 && binary.BigEndian.Uint32(hdr) == magic {
		return 100
	}
	return 0
}

// Open implements drivers.Format. It must not be called from a coroutine.
// The image is opened read-only whatever opts.ReadOnly says: the write path
// does not exist yet.
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
	h        *header
	// size is the virtual disk size: the header's, or the selected
	// snapshot's.
	size        int64
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
	// backing is the next layer down, nil if none; backingSize its size.
	backing     drivers.Driver
	backingSize int64
	// snaps is the snapshot table read at open.
	snaps []snapshotEntry
	// snapshot is the snapshot being exposed, nil for the active disk.
	snapshot *snapshotEntry

	// mu is the metadata lock. It protects l1, l2 and fileSize, and is
	// held across metadata I/O (L2 table reads) but never across data
	// I/O.
	mu coroutine.CoMutex
	// l1 is the L1 table in use (the active one, or the snapshot's).
	// Protected by mu.
	l1 []uint64
	// l2 caches L2 tables, one cluster each. Protected by mu.
	l2 *cache.Cache
	// fileSize is the image file's size; host offsets at or past it are
	// corrupt. Protected by mu.
	fileSize int64

	// srcPool holds *[]byte buffers for compressed streams.
	srcPool sync.Pool

	// zmu protects zcache. Never held across a yield.
	zmu sync.Mutex
	// zcache holds recently decompressed clusters. Protected by zmu.
	zcache zcache
}

// chain carries what an open needs to know about the images above it in a
// backing chain.
type chain struct {
	depth int
	// seen holds the device and inode of every file opened so far.
	seen []fileID
}

// maxChainDepth bounds the backing chain (see the package doc).
const maxChainDepth = 64

// openImage opens the qcow2 image at path as one layer of a chain. It must
// not be called from a coroutine.
func openImage(path string, opts drivers.OpenOptions, ch *chain) (d *image, err error) {
	if err := ch.enter(path); err != nil {
		return nil, err
	}
	f, err := aio.Open(path, aio.Options{ReadOnly: true, NoDirectIO: opts.NoDirectIO, NoLock: opts.ForceShare})
	if err != nil {
		return nil, fmt.Errorf("qcow2: %w", err)
	}
	img := &image{path: path, file: f, data: f, dataPath: path}
	defer func() {
		if err != nil {
			img.Close()
		}
	}()
	if img.fileSize, err = f.Size(); err != nil {
		return nil, fmt.Errorf("qcow2: %s: %w", path, err)
	}
	buf := make([]byte, min(int64(headerReadSize), img.fileSize))
	if err := f.Pread(buf, 0); err != nil {
		return nil, fmt.Errorf("qcow2: %s: reading the header: %w", path, err)
	}
	h, err := parseHeader(buf, img.fileSize)
	if err != nil {
		return nil, fmt.Errorf("qcow2: %s: %w", path, err)
	}
	img.h = h
	img.size = int64(h.Size)
	img.clusterBits = h.ClusterBits
	img.clusterSize = h.clusterSize()
	img.l2EntryBytes = 8
	img.scPerCluster = 1
	img.scBits = h.ClusterBits
	if h.extendedL2() {
		img.l2EntryBytes = 16
		img.scPerCluster = 32
		img.scBits = h.ClusterBits - 5
	}
	img.l2Bits = h.ClusterBits - 3
	if h.extendedL2() {
		img.l2Bits = h.ClusterBits - 4
	}

	if h.NbSnapshots > 0 {
		read := func(off int64, p []byte) error { return f.Pread(p, off) }
		if img.snaps, err = readSnapshotTable(read, h); err != nil {
			return nil, fmt.Errorf("qcow2: %s: %w", path, err)
		}
	}
	l1Off, l1Size := h.L1Offset, h.L1Size
	if opts.Snapshot != "" {
		s, err := findSnapshot(img.snaps, opts.Snapshot)
		if err != nil {
			return nil, fmt.Errorf("qcow2: %s: %w", path, err)
		}
		img.snapshot = s
		l1Off, l1Size = s.L1Offset, s.L1Size
		if s.DiskSize != 0 {
			if s.DiskSize > 1<<62 {
				return nil, fmt.Errorf("qcow2: %s: snapshot %q has disk size %d: %w", path, s.Name, s.DiskSize, drivers.ErrCorrupt)
			}
			img.size = int64(s.DiskSize)
		}
	}
	if img.l1, err = img.loadL1(l1Off, l1Size); err != nil {
		return nil, fmt.Errorf("qcow2: %s: %w", path, err)
	}
	img.l2 = cache.New(path+" L2", img.l2CacheTables(), int(img.clusterSize), l2Backend{img})

	if err := img.openDataFile(opts); err != nil {
		return nil, err
	}
	if err := img.openBacking(opts, ch); err != nil {
		return nil, err
	}
	return img, nil
}

// loadL1 reads an L1 table. Its entries are validated when used (see
// l2OffsetLocked), so a damaged entry costs the reads it covers, not the
// whole image.
func (img *image) loadL1(off uint64, entries uint32) ([]uint64, error) {
	n := int64(entries) * 8
	if n > maxL1Bytes {
		return nil, fmt.Errorf("L1 table of %d entries is too large: %w", entries, drivers.ErrCorrupt)
	}
	if off%uint64(img.clusterSize) != 0 {
		return nil, fmt.Errorf("L1 table offset %#x is not cluster-aligned: %w", off, drivers.ErrCorrupt)
	}
	// QEMU always writes the whole table, so a table that runs past EOF
	// means a truncated file: reading its tail as zeros would silently
	// turn allocated clusters into holes.
	if n > 0 && off+uint64(n) > uint64(img.fileSize) {
		return nil, fmt.Errorf("L1 table at %#x (%d bytes) runs past the end of the file (%d bytes): truncated image: %w",
			off, n, img.fileSize, drivers.ErrCorrupt)
	}
	buf := make([]byte, n)
	if err := img.file.Pread(buf, int64(off)); err != nil {
		return nil, fmt.Errorf("reading the L1 table at %#x: %w", off, err)
	}
	l1 := make([]uint64, entries)
	for i := range l1 {
		l1[i] = binary.BigEndian.Uint64(buf[i*8:])
	}
	return l1, nil
}

// l2CacheTables sizes the L2 cache: enough tables to map the whole disk,
// at most l2CacheMax bytes, at least 2 tables.
func (img *image) l2CacheTables() int {
	perTable := img.clusterSize << img.l2Bits // guest bytes one L2 table maps
	need := (img.size + perTable - 1) / perTable
	need = min(need, l2CacheMax/img.clusterSize)
	return int(max(need, 2))
}

// l2Backend does the L2 cache's I/O on the image file.
type l2Backend struct{ img *image }

func (b l2Backend) ReadTable(co *coroutine.Co, off int64, p []byte) error {
	return b.img.file.PreadCo(co, p, off)
}

func (b l2Backend) WriteTable(co *coroutine.Co, off int64, p []byte) error {
	return fmt.Errorf("qcow2: writing L2 table at %#x: %w", off, drivers.ErrReadOnly)
}

func (b l2Backend) Sync(co *coroutine.Co) error { return nil }

// Size implements drivers.Driver.
func (img *image) Size() int64 { return img.size }

// WriteAt implements drivers.Driver; the driver is read-only.
func (img *image) WriteAt(co *coroutine.Co, p []byte, off int64) (int, error) {
	return 0, img.readOnly("write")
}

// Flush implements drivers.Driver. Nothing is ever written, so there is
// nothing to make durable.
func (img *image) Flush(co *coroutine.Co) error { return nil }

// Discard implements drivers.Driver; the driver is read-only.
func (img *image) Discard(co *coroutine.Co, off, n int64) error { return img.readOnly("discard") }

// WriteZeroes implements drivers.Driver; the driver is read-only.
func (img *image) WriteZeroes(co *coroutine.Co, off, n int64, unmap bool) error {
	return img.readOnly("write zeroes")
}

// Truncate implements drivers.Driver; the driver is read-only.
func (img *image) Truncate(co *coroutine.Co, size int64) error { return img.readOnly("truncate") }

func (img *image) readOnly(op string) error {
	return fmt.Errorf("qcow2: %s: %s: %w", img.path, op, drivers.ErrReadOnly)
}

// Close implements drivers.Driver: it closes the backing chain and the
// files. It does not flush (there is nothing to flush).
func (img *image) Close() error {
	var first error
	keep := func(err error) {
		if err != nil && first == nil {
			first = err
		}
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
	info := drivers.ImageInfo{
		Filename:       img.path,
		Format:         "qcow2",
		VirtualSize:    img.size,
		FormatSpecific: img.h.formatInfo(),
		Snapshots:      img.Snapshots(),
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
