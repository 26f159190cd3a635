package fusefs

import (
	"fmt"
	"log"
	"math"
	"math/bits"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/hanwen/go-fuse/v2/fuse"
	"golang.org/x/sys/unix"

	"imgfuse/coroutine"
	"imgfuse/drivers"
	"imgfuse/partition"
)

// Inode numbers: either the root directory (FUSE_ROOT_ID) holding the
// disk (diskDirIno) and its partitions (from firstPartIno on, each range a
// new number: see newPartTable), or the root is the disk.
const (
	diskDirIno   = 2
	firstPartIno = 3
)

// cacheTimeout is how long the kernel may trust entries and attributes. The
// tree changes only when the partition table does, and then we invalidate
// what the kernel cached (settleTable); the size only changes through
// SETATTR, whose reply updates the kernel's copy. So a long timeout only
// saves round trips.
const cacheTimeout = 24 * time.Hour

// siblingTimeout is the attribute timeout of the disk and partition files
// of a directory mount with partitions: a write through one of them
// changes the others' st_blocks (package doc, "Allocation"), which the
// kernel cannot know, so their attributes are asked again after this long.
const siblingTimeout = time.Second

// Handle flags kept in OpenOut.Fh.
const fhWrite = 1 // the handle was opened for writing

// blockSize is st_blksize and the statfs block size.
const blockSize = 4096

// diskFS serves one disk through the raw FUSE protocol. Its fields are
// immutable after newDiskFS but for the partition table (table,
// tableDirty, nextIno: see the package doc, "Partitions follow the
// table"); the rest of the mutable state lives in the driver, which
// serialises what it must. Handlers run concurrently, one goroutine per
// request in flight.
type diskFS struct {
	fuse.RawFileSystem

	d drivers.Driver
	// direct is d's fast path for reads, or nil.
	direct drivers.DirectReader

	// backingID is the kernel's ID of the image file registered for FUSE
	// passthrough, or 0 when passthrough is off. Set by Mount before the
	// first request is served.
	backingID int32

	name     string
	readOnly bool
	growable bool
	dirMode  bool
	diskIno  uint64
	modTime  time.Time
	uid, gid uint32

	logger *log.Logger

	// notify tells the kernel to drop cached entries and attributes;
	// nil in unit tests without a mount. Set by Mount before serving.
	notify notifier

	// table is the partition table served (in a directory mount; empty
	// otherwise), replaced whole by settleTable. Partition I/O holds
	// ioMu for reading from loading it to the end of the driver call,
	// and settleTable takes it for writing to publish a new table, so no
	// request that found an old range is still running once a new table
	// is out.
	table atomic.Pointer[partTable]
	ioMu  sync.RWMutex
	// tableDirty is set when a write touched the table's footprint.
	tableDirty atomic.Bool
	// refreshMu serialises re-reads; it protects nextIno, the next inode
	// number never handed out.
	refreshMu sync.Mutex
	nextIno   uint64

	// errs counts the I/O errors returned (fail); it synchronises
	// itself.
	errs *ioErrors
}

var _ fuse.RawFileSystem = (*diskFS)(nil)

// newDiskFS serves d, with the partitions parts in a directory mount
// (Mount reads them with readTable instead, which also learns where the
// table lies).
func newDiskFS(d drivers.Driver, opts Options, dirMode bool, parts []partition.Partition) *diskFS {
	fs := &diskFS{
		RawFileSystem: fuse.NewDefaultRawFileSystem(),
		d:             d,
		name:          opts.Name,
		readOnly:      opts.ReadOnly,
		growable:      opts.Growable,
		dirMode:       dirMode,
		diskIno:       fuse.FUSE_ROOT_ID,
		modTime:       opts.ModTime,
		uid:           uint32(os.Getuid()),
		gid:           uint32(os.Getgid()),
		logger:        opts.Logger,
		nextIno:       firstPartIno,
		errs:          newIOErrors(opts.Logger),
	}
	if fs.logger == nil {
		fs.logger = log.Default()
	}
	if dirMode {
		fs.diskIno = diskDirIno
	} else {
		parts = nil
	}
	fs.table.Store(newPartTable(opts.Name, fs.diskIno, nil, parts, nil, &fs.nextIno))
	if dr, ok := d.(drivers.DirectReader); ok {
		fs.direct = dr
	}
	return fs
}

func (fs *diskFS) String() string { return "imgfuse" }

func partName(number int) string { return fmt.Sprintf("part%d", number) }

// part returns the partition file of inode ino in the current table, or
// nil.
func (fs *diskFS) part(ino uint64) *partFile {
	if ino < firstPartIno {
		return nil
	}
	return fs.table.Load().byIno[ino]
}

// stale reports whether ino was a partition file of an earlier table.
func (fs *diskFS) stale(ino uint64) bool {
	return fs.dirMode && ino >= firstPartIno && fs.part(ino) == nil
}

// notFile is the answer to an I/O request on an inode that is no file:
// ESTALE for a partition whose range changed or vanished, EISDIR for the
// directory.
func (fs *diskFS) notFile(ino uint64) fuse.Status {
	if fs.stale(ino) {
		return fuse.Status(syscall.ESTALE)
	}
	return fuse.EISDIR
}

// window is the byte range of the disk that inode ino shows: the whole
// disk, or a partition clamped to the disk's current size (a disk
// truncated while mounted may have cut it). grow says writes past end grow
// the disk. ok is false for an inode that is not a file (or no longer:
// a stale partition).
//
// For a partition, window takes ioMu for reading and says so (locked):
// the caller unlocks it once its driver calls are done (see diskFS.table).
// It never blocks the loop: while a new table is being published the read
// lock is waited for by a worker (a coroutine holding it for reading may be
// suspended on this very loop, and the writer waits for it).
func (fs *diskFS) window(co *coroutine.Co, ino uint64) (base, end int64, grow, ok, locked bool) {
	if ino == fs.diskIno {
		return 0, fs.d.Size(), fs.growable, true, false
	}
	if ino < firstPartIno {
		return 0, 0, false, false, false
	}
	if !fs.ioMu.TryRLock() {
		coroutine.RunInWorker(co, fs.ioMu.RLock)
	}
	p := fs.part(ino)
	if p == nil {
		fs.ioMu.RUnlock()
		return 0, 0, false, false, false
	}
	return p.Start, max(p.Start, min(p.Start+p.Size, fs.d.Size())), false, true, true
}

// fillAttr describes inode ino; ok is false for an unknown inode.
func (fs *diskFS) fillAttr(ino uint64, a *fuse.Attr) (ok bool) {
	return fs.fillAttrOf(ino, fs.part(ino), a)
}

// fillAttrOf describes inode ino, which is partition p when p is not nil:
// a caller that found ino in a table passes its file, since a re-read may
// replace the table meanwhile.
func (fs *diskFS) fillAttrOf(ino uint64, p *partFile, a *fuse.Attr) (ok bool) {
	*a = fuse.Attr{Ino: ino, Owner: fuse.Owner{Uid: fs.uid, Gid: fs.gid}, Blksize: blockSize}
	t := fs.modTime
	a.SetTimes(&t, &t, &t)
	switch {
	case ino == fs.diskIno:
		size := fs.d.Size()
		a.Mode = syscall.S_IFREG | 0o644
		if fs.readOnly {
			a.Mode = syscall.S_IFREG | 0o444
		}
		a.Nlink = 1
		a.Size = uint64(size)
		a.Blocks = blocks(drivers.AllocatedOf(fs.d))
	case p != nil:
		size := p.Size
		a.Mode = syscall.S_IFREG | 0o644
		if fs.readOnly {
			a.Mode = syscall.S_IFREG | 0o444
		}
		a.Nlink = 1
		a.Size = uint64(size)
		a.Blocks = blocks(share(drivers.AllocatedOf(fs.d), fs.d.Size(), size))
	case fs.dirMode && ino == fuse.FUSE_ROOT_ID:
		a.Mode = syscall.S_IFDIR | 0o755
		if fs.readOnly {
			a.Mode = syscall.S_IFDIR | 0o555
		}
		a.Nlink = 2
		a.Size = blockSize
		a.Blocks = blockSize / 512
	default:
		return false
	}
	return true
}

// blocks is st_blocks for n allocated bytes: 512-byte units, rounded up.
func blocks(n int64) uint64 { return (uint64(max(n, 0)) + 511) / 512 }

// share is a partition's part of the disk's allocation: allocated bytes of
// a disk of diskSize spread evenly, the part falling in partSize bytes
// (see the package doc), never more than partSize.
func share(allocated, diskSize, partSize int64) int64 {
	if diskSize <= 0 || partSize <= 0 || allocated <= 0 {
		return 0
	}
	allocated = min(allocated, diskSize)
	// allocated*partSize/diskSize without overflow: the quotient is at
	// most partSize, so the high word is below diskSize.
	hi, lo := bits.Mul64(uint64(allocated), uint64(partSize))
	if hi >= uint64(diskSize) {
		return partSize
	}
	q, _ := bits.Div64(hi, lo, uint64(diskSize))
	return min(int64(q), partSize)
}

// attrTimeout is how long the kernel may trust inode ino's attributes.
func (fs *diskFS) attrTimeout(ino uint64) time.Duration {
	if len(fs.table.Load().parts) > 0 && ino != fuse.FUSE_ROOT_ID {
		return siblingTimeout
	}
	return cacheTimeout
}

// fillEntry answers a lookup of inode ino, partition p (or nil) of the
// table the name was found in.
func (fs *diskFS) fillEntry(ino uint64, p *partFile, out *fuse.EntryOut) {
	out.NodeId = ino
	out.Generation = 1
	out.SetEntryTimeout(cacheTimeout)
	out.SetAttrTimeout(fs.attrTimeout(ino))
	fs.fillAttrOf(ino, p, &out.Attr)
}

func (fs *reqFS) Lookup(cancel <-chan struct{}, h *fuse.InHeader, name string, out *fuse.EntryOut) fuse.Status {
	co := fs.co // before anything yields: the next request reuses fs
	if !fs.dirMode || h.NodeId != fuse.FUSE_ROOT_ID {
		return fuse.ENOTDIR
	}
	fs.settle(co, false)
	t := fs.table.Load()
	ino, ok := t.byName[name]
	if !ok {
		// A negative entry the kernel may cache: NodeId 0 with a timeout.
		*out = fuse.EntryOut{}
		out.SetEntryTimeout(cacheTimeout)
		return fuse.OK
	}
	fs.fillEntry(ino, t.byIno[ino], out)
	return fuse.OK
}

// Forget: nothing is kept per inode, nothing to release.
func (fs *diskFS) Forget(nodeid, nlookup uint64) {}

func (fs *diskFS) GetAttr(cancel <-chan struct{}, in *fuse.GetAttrIn, out *fuse.AttrOut) fuse.Status {
	if !fs.fillAttr(in.NodeId, &out.Attr) {
		return fs.gone(in.NodeId)
	}
	out.SetTimeout(fs.attrTimeout(in.NodeId))
	return fuse.OK
}

// gone answers a request on an inode we do not know: ESTALE for a
// partition whose range changed or vanished (on a GETATTR the kernel then
// looks the path up again), ENOENT otherwise.
func (fs *diskFS) gone(ino uint64) fuse.Status {
	if fs.stale(ino) {
		return fuse.Status(syscall.ESTALE)
	}
	return fuse.ENOENT
}

func (fs *reqFS) SetAttr(cancel <-chan struct{}, in *fuse.SetAttrIn, out *fuse.AttrOut) fuse.Status {
	co := fs.co // before anything yields: the next request reuses fs
	// A partition's size is the table's: it neither grows nor shrinks.
	if p := fs.part(in.NodeId); p != nil && in.Valid&fuse.FATTR_SIZE != 0 && int64(in.Size) != p.Size {
		return fs.refuse()
	}
	if in.NodeId == fs.diskIno && in.Valid&fuse.FATTR_SIZE != 0 && int64(in.Size) != fs.d.Size() {
		if fs.readOnly {
			return fuse.EROFS
		}
		if in.Size > math.MaxInt64 {
			return fuse.Status(syscall.EFBIG)
		}
		var err error
		func(co *coroutine.Co) { err = fs.d.Truncate(co, int64(in.Size)) }(co)
		if err != nil {
			return fs.fail("truncate", int64(in.Size), err)
		}
	}
	// Mode, owner and time changes are accepted and ignored: the
	// attributes describe the image, not a file of their own.
	if !fs.fillAttr(in.NodeId, &out.Attr) {
		return fs.gone(in.NodeId)
	}
	out.SetTimeout(fs.attrTimeout(in.NodeId))
	return fuse.OK
}

// Open answers with FOPEN_DIRECT_IO: every read and write reaches the
// driver, nothing is cached twice, and the kernel never holds dirty pages of
// the image (see the package doc). KEEP_CACHE is never set: it would let a
// writable disk serve stale pages.
//
// With passthrough (backingID set) every open names the backing file, as
// the kernel demands of all opens of an inode once one is passed through.
// A read-only open is passed through whole: the kernel reads the image file
// itself. An open for writing keeps FOPEN_DIRECT_IO, which overrides
// passthrough for read and write, so writes still reach the driver and keep
// the end-of-disk rules; only its mmap goes to the image file.
//
// A partition file is never passed through: its bytes sit at an offset in
// the image file, and a backing file is mapped from offset 0. Its opens get
// FOPEN_DIRECT_IO only. The kernel's rule against mixing passthrough and
// other opens holds per inode, and each partition is an inode of its own.
func (fs *reqFS) Open(cancel <-chan struct{}, in *fuse.OpenIn, out *fuse.OpenOut) fuse.Status {
	co := fs.co // before anything yields: the next request reuses fs
	fs.settle(co, false)
	isPart := fs.part(in.NodeId) != nil
	if in.NodeId != fs.diskIno && !isPart {
		return fs.notFile(in.NodeId)
	}
	out.Fh = 0
	if in.Flags&syscall.O_ACCMODE != syscall.O_RDONLY {
		if fs.readOnly {
			return fuse.EROFS
		}
		out.Fh = fhWrite
	}
	out.OpenFlags = fuse.FOPEN_DIRECT_IO | fuse.FOPEN_PARALLEL_DIRECT_WRITES
	if fs.backingID != 0 && !isPart {
		out.BackingID = fs.backingID
		out.OpenFlags |= fuse.FOPEN_PASSTHROUGH
		if out.Fh&fhWrite == 0 {
			out.OpenFlags = fuse.FOPEN_PASSTHROUGH
		}
	}
	return fuse.OK
}

// Read serves a read, clamped at the end of the disk. The data goes into
// buf, go-fuse's own output buffer, which is only referenced until this
// handler returns (ReadResultData just hands it back to go-fuse).
func (fs *reqFS) Read(cancel <-chan struct{}, in *fuse.ReadIn, buf []byte) (fuse.ReadResult, fuse.Status) {
	co := fs.co // before anything yields: the next request reuses fs
	base, end, _, ok, locked := fs.window(co, in.NodeId)
	if !ok {
		return nil, fs.notFile(in.NodeId)
	}
	if locked {
		defer fs.ioMu.RUnlock()
	}
	if in.Offset >= uint64(end-base) {
		return fuse.ReadResultData(nil), fuse.OK
	}
	off := base + int64(in.Offset)
	n := min(int64(in.Size), end-off)
	if int64(len(buf)) < n {
		buf = make([]byte, n)
	}
	p := buf[:n]
	if fs.direct != nil {
		// Fast path: an aligned raw read is one iocb, straight into
		// go-fuse's buffer.
		_, ok, err := fs.direct.ReadDirect(co, p, off)
		if ok {
			if err != nil {
				return nil, fs.fail("read", off, err)
			}
			return fuse.ReadResultData(p), fuse.OK
		}
	}
	var err error
	func(co *coroutine.Co) { _, err = fs.d.ReadAt(co, p, off) }(co)
	if err != nil {
		return nil, fs.fail("read", off, err)
	}
	return fuse.ReadResultData(p), fuse.OK
}

// Write forwards one WRITE to the driver.
//
// data is go-fuse's request buffer and belongs to the request until this
// handler returns: WriteAt is synchronous from here (coroutine.Run returns
// only once the coroutine has finished, i.e. once every AIO on data has
// completed), so the driver is done with data before we reply. Any change
// that lets a write complete later must copy data first.
func (fs *reqFS) Write(cancel <-chan struct{}, in *fuse.WriteIn, data []byte) (uint32, fuse.Status) {
	return fs.Writev(cancel, in, [][]byte{data})
}

// Writev is Write for a payload go-fuse received in pieces; it saves
// go-fuse's copy into one buffer. The same ownership rule as Write holds.
func (fs *reqFS) Writev(cancel <-chan struct{}, in *fuse.WriteIn, data [][]byte) (uint32, fuse.Status) {
	co := fs.co // before anything yields: the next request reuses fs
	if fs.readOnly {
		return 0, fuse.EROFS
	}
	base, end, grow, ok, locked := fs.window(co, in.NodeId)
	if !ok {
		return 0, fs.notFile(in.NodeId)
	}
	if locked {
		defer fs.ioMu.RUnlock()
	}
	var total int64
	for _, p := range data {
		total += int64(len(p))
	}
	if in.Offset > math.MaxInt64-uint64(base) || total > math.MaxInt64-base-int64(in.Offset) {
		return 0, fuse.Status(syscall.EFBIG)
	}
	off := base + int64(in.Offset)
	// room bounds the write. A growable disk takes all of it: the driver
	// grows the disk, and the kernel, which sent a write past the size it
	// knows, raises its cached size itself when we report it done.
	// Otherwise a write that crosses the end of the disk writes what fits
	// and reports it, as a block device does; the caller's retry of the
	// rest then fails with ENOSPC. A partition ends where the table says
	// (or at the end of the disk) and never grows.
	room := total
	if !grow {
		if off >= end {
			return 0, fuse.Status(syscall.ENOSPC)
		}
		room = min(total, end-off)
	}
	var written int64
	var err error
	func(co *coroutine.Co) {
		for _, p := range data {
			if int64(len(p)) > room-written {
				p = p[:room-written]
			}
			if len(p) == 0 {
				break
			}
			var n int
			n, err = fs.d.WriteAt(co, p, off+written)
			written += int64(n)
			if err != nil {
				return
			}
		}
	}(co)
	// What the driver was asked to write, whether or not it all landed.
	fs.noteWrite(off, room)
	if err != nil && written == 0 {
		return 0, fs.fail("write", off, err)
	}
	return uint32(written), fuse.OK
}

// Flush is sent on every close(2) of a descriptor. Only a descriptor that
// could write makes us flush the image, so close(2) after write(2) reports
// write-back errors as it does on a local file. The writer is then done:
// a partition table it wrote is read again (settleTable) before close(2)
// returns.
func (fs *reqFS) Flush(cancel <-chan struct{}, in *fuse.FlushIn) fuse.Status {
	if in.Fh&fhWrite == 0 {
		return fuse.OK
	}
	return fs.flush()
}

// Fsync flushes the image. It must never answer ENOSYS: the kernel would
// then stop sending fsync for good and report success without asking. A
// stale partition's handle flushes the disk like any other: that touches
// no range.
func (fs *reqFS) Fsync(cancel <-chan struct{}, in *fuse.FsyncIn) fuse.Status {
	return fs.flush()
}

func (fs *reqFS) flush() fuse.Status {
	co := fs.co // before anything yields: the next request reuses fs
	var err error
	err = fs.d.Flush(co)
	fs.settle(co, true)
	return fs.failFlush(err)
}

// Release settles the table too: a loop device's descriptor is released
// without a FLUSH.
func (fs *reqFS) Release(cancel <-chan struct{}, in *fuse.ReleaseIn) {
	co := fs.co // before anything yields: the next request reuses fs
	if in.Fh&fhWrite != 0 {
		fs.settle(co, true)
	}
}

// Fallocate: the kernel forwards KEEP_SIZE, PUNCH_HOLE and ZERO_RANGE only
// (a loop device sends PUNCH_HOLE|KEEP_SIZE for discard and
// ZERO_RANGE|KEEP_SIZE for write-zeroes). Plain allocation (mode 0, or
// KEEP_SIZE alone) is refused with EOPNOTSUPP.
func (fs *reqFS) Fallocate(cancel <-chan struct{}, in *fuse.FallocateIn) fuse.Status {
	co := fs.co // before anything yields: the next request reuses fs
	const (
		keepSize  = unix.FALLOC_FL_KEEP_SIZE
		punchHole = unix.FALLOC_FL_PUNCH_HOLE
		zeroRange = unix.FALLOC_FL_ZERO_RANGE
	)
	if fs.readOnly {
		return fuse.EROFS
	}
	base, size, growable, ok, locked := fs.window(co, in.NodeId)
	if !ok {
		return fs.notFile(in.NodeId)
	}
	if locked {
		defer fs.ioMu.RUnlock()
	}
	if in.Offset > math.MaxInt64-uint64(base) || in.Length > math.MaxInt64-uint64(base)-in.Offset {
		return fuse.EINVAL
	}
	off, n := base+int64(in.Offset), int64(in.Length)
	var op func(co *coroutine.Co, off, n int64) error
	grow := false
	switch in.Mode {
	case punchHole | keepSize:
		op = fs.d.Discard
	case zeroRange | keepSize, zeroRange:
		if in.Mode&keepSize == 0 && off+n > size {
			if !growable {
				return fuse.Status(syscall.ENOSPC)
			}
			grow = true
		}
		op = func(co *coroutine.Co, off, n int64) error {
			return fs.d.WriteZeroes(co, off, n, false)
		}
	default:
		return fuse.Status(syscall.EOPNOTSUPP)
	}
	var err error
	func(co *coroutine.Co) {
		if grow {
			// Grow first, then zero the whole range: zeroing does
			// not rely on what a driver's Truncate leaves in the new
			// range (an overlay over a longer backing file). Another
			// request may have grown the disk further meanwhile,
			// making our Truncate a refused shrink: that is fine.
			if err = fs.d.Truncate(co, off+n); err != nil && fs.d.Size() < off+n {
				return
			}
			size = off + n
		}
		if off >= size {
			return
		}
		err = op(co, off, min(n, size-off))
	}(co)
	fs.noteWrite(off, n)
	return fs.fail("fallocate", off, err)
}

// Lseek answers SEEK_DATA and SEEK_HOLE (the only whence values the kernel
// forwards) from the driver's block status. The end of the disk is a hole.
func (fs *reqFS) Lseek(cancel <-chan struct{}, in *fuse.LseekIn, out *fuse.LseekOut) fuse.Status {
	co := fs.co // before anything yields: the next request reuses fs
	if in.Whence != unix.SEEK_DATA && in.Whence != unix.SEEK_HOLE {
		return fuse.EINVAL
	}
	base, size, _, ok, locked := fs.window(co, in.NodeId)
	if !ok {
		return fs.notFile(in.NodeId)
	}
	if locked {
		defer fs.ioMu.RUnlock()
	}
	if in.Offset >= uint64(size-base) {
		return fuse.Status(syscall.ENXIO)
	}
	wantData := in.Whence == unix.SEEK_DATA
	off := base + int64(in.Offset)
	var err error
	found := false
	func(co *coroutine.Co) {
		for off < size {
			var e drivers.Extent
			e, err = fs.d.BlockStatus(co, off)
			if err != nil {
				return
			}
			if e.Len <= 0 {
				err = syscall.EIO // a driver bug; never loop for ever
				return
			}
			if (e.Flags&drivers.ExtentData != 0) == wantData {
				found = true
				return
			}
			off += e.Len
		}
	}(co)
	if err != nil {
		return fs.fail("lseek", off, err)
	}
	switch {
	case found:
		out.Offset = uint64(off - base)
	case wantData:
		return fuse.Status(syscall.ENXIO)
	default:
		out.Offset = uint64(size - base)
	}
	return fuse.OK
}

func (fs *diskFS) StatFs(cancel <-chan struct{}, h *fuse.InHeader, out *fuse.StatfsOut) fuse.Status {
	*out = fuse.StatfsOut{
		Blocks:  (uint64(fs.d.Size()) + blockSize - 1) / blockSize,
		Files:   1,
		Bsize:   blockSize,
		Frsize:  blockSize,
		NameLen: 255,
	}
	if fs.dirMode {
		out.Files = 2 + uint64(len(fs.table.Load().parts))
	}
	return fuse.OK
}

func (fs *reqFS) OpenDir(cancel <-chan struct{}, in *fuse.OpenIn, out *fuse.OpenOut) fuse.Status {
	co := fs.co // before anything yields: the next request reuses fs
	if !fs.dirMode || in.NodeId != fuse.FUSE_ROOT_ID {
		return fuse.ENOTDIR
	}
	// Let the kernel cache the listing: it changes only with the
	// partition table, and settleTable then drops the cached copy. If
	// the table changes now, the invalidation may not have landed
	// before the kernel reads its cache: without KEEP_CACHE the kernel
	// drops the cached listing itself before this open returns.
	out.OpenFlags = fuse.FOPEN_CACHE_DIR | fuse.FOPEN_KEEP_CACHE
	if fs.settle(co, false) {
		out.OpenFlags = fuse.FOPEN_CACHE_DIR
	}
	return fuse.OK
}

// dirEntries is the directory listing: ".", "..", the disk, the
// partitions of the table t it returns too. Offsets are indexes into it
// plus one.
func (fs *reqFS) dirEntries() ([]fuse.DirEntry, *partTable) {
	co := fs.co // before anything yields: the next request reuses fs
	fs.settle(co, false)
	ents := []fuse.DirEntry{
		{Name: ".", Mode: syscall.S_IFDIR, Ino: fuse.FUSE_ROOT_ID},
		{Name: "..", Mode: syscall.S_IFDIR, Ino: fuse.FUSE_ROOT_ID},
		{Name: fs.name, Mode: syscall.S_IFREG, Ino: fs.diskIno},
	}
	t := fs.table.Load()
	for _, f := range t.parts {
		ents = append(ents, fuse.DirEntry{Name: f.name, Mode: syscall.S_IFREG, Ino: f.ino})
	}
	return ents, t
}

func (fs *reqFS) ReadDir(cancel <-chan struct{}, in *fuse.ReadIn, out *fuse.DirEntryList) fuse.Status {
	if !fs.dirMode || in.NodeId != fuse.FUSE_ROOT_ID {
		return fuse.ENOTDIR
	}
	ents, _ := fs.dirEntries()
	for i := in.Offset; i < uint64(len(ents)); i++ {
		e := ents[i]
		e.Off = i + 1
		if !out.AddDirEntry(e) {
			break
		}
	}
	return fuse.OK
}

func (fs *reqFS) ReadDirPlus(cancel <-chan struct{}, in *fuse.ReadIn, out *fuse.DirEntryList) fuse.Status {
	if !fs.dirMode || in.NodeId != fuse.FUSE_ROOT_ID {
		return fuse.ENOTDIR
	}
	ents, t := fs.dirEntries()
	for i := in.Offset; i < uint64(len(ents)); i++ {
		e := ents[i]
		e.Off = i + 1
		eo := out.AddDirLookupEntry(e)
		if eo == nil {
			break
		}
		// The kernel ignores the entry attributes of "." and "..";
		// the files' are filled like a LOOKUP (and count as one).
		if e.Name != "." && e.Name != ".." {
			fs.fillEntry(e.Ino, t.byIno[e.Ino], eo)
		}
	}
	return fuse.OK
}

func (fs *diskFS) ReleaseDir(in *fuse.ReleaseIn) {}

func (fs *diskFS) FsyncDir(cancel <-chan struct{}, in *fuse.FsyncIn) fuse.Status {
	return fuse.OK
}

// Creating, removing or renaming anything is refused: the tree is the
// disk and its partition table.

func (fs *diskFS) refuse() fuse.Status {
	if fs.readOnly {
		return fuse.EROFS
	}
	return fuse.EPERM
}

func (fs *diskFS) Create(cancel <-chan struct{}, in *fuse.CreateIn, name string, out *fuse.CreateOut) fuse.Status {
	return fs.refuse()
}

func (fs *diskFS) Mknod(cancel <-chan struct{}, in *fuse.MknodIn, name string, out *fuse.EntryOut) fuse.Status {
	return fs.refuse()
}

func (fs *diskFS) Mkdir(cancel <-chan struct{}, in *fuse.MkdirIn, name string, out *fuse.EntryOut) fuse.Status {
	return fs.refuse()
}

func (fs *diskFS) Unlink(cancel <-chan struct{}, h *fuse.InHeader, name string) fuse.Status {
	return fs.refuse()
}

func (fs *diskFS) Rmdir(cancel <-chan struct{}, h *fuse.InHeader, name string) fuse.Status {
	return fs.refuse()
}

func (fs *diskFS) Rename(cancel <-chan struct{}, in *fuse.RenameIn, oldName, newName string) fuse.Status {
	return fs.refuse()
}

func (fs *diskFS) Link(cancel <-chan struct{}, in *fuse.LinkIn, name string, out *fuse.EntryOut) fuse.Status {
	return fs.refuse()
}

func (fs *diskFS) Symlink(cancel <-chan struct{}, h *fuse.InHeader, target, name string, out *fuse.EntryOut) fuse.Status {
	return fs.refuse()
}
