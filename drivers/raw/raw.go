package raw

import (
	"errors"
	"fmt"
	"math"
	"sync"
	"sync/atomic"
	"syscall"

	"golang.org/x/sys/unix"

	"imgfuse/aio"
	"imgfuse/coroutine"
	"imgfuse/drivers"
)

// Format is the raw format. Every file is a valid raw image, so Probe
// answers 1 (last resort) for anything.
type Format struct{}

var _ drivers.Format = Format{}

func (Format) Name() string { return "raw" }

func (Format) Probe(drivers.ProbeInput) int { return 1 }

// Open opens the raw image at path. It must not be called from a coroutine.
func (Format) Open(path string, opts drivers.OpenOptions) (drivers.Driver, error) {
	return Open(path, opts)
}

// Driver is an open raw image.
type Driver struct {
	// Immutable after Open.
	f        *aio.File
	path     string
	readOnly bool
	growable bool
	// guard refuses writes that would make a probed image probe as
	// another format (probeguard.go); nil if not needed.
	guard *probeGuard

	// resizeMu serialises every change of the size (Truncate, and writes
	// that reach past the end of a growable disk) so that two of them
	// cannot interleave their file operations: a growing write that
	// completed before an ftruncate to a smaller grown size would be cut
	// off by it. Writes inside the disk never take it: the disk never
	// shrinks, so a write inside it stays inside.
	resizeMu coroutine.CoMutex
	// size is the disk size. It only grows, and is changed only by the
	// holder of resizeMu, after the file has its new length; readers load
	// it without a lock.
	size atomic.Int64
}

var (
	_ drivers.Driver       = (*Driver)(nil)
	_ drivers.DirectReader = (*Driver)(nil)
	_ drivers.Informer     = (*Driver)(nil)
	_ drivers.FileBacked   = (*Driver)(nil)
	_ drivers.Allocator    = (*Driver)(nil)
	_ drivers.FileLister   = (*Driver)(nil)
)

// Open opens the raw image at path. It must not be called from a coroutine.
func Open(path string, opts drivers.OpenOptions) (*Driver, error) {
	if opts.Snapshot != "" {
		return nil, fmt.Errorf("raw: %s: snapshot %q: raw images have no snapshots: %w",
			path, opts.Snapshot, drivers.ErrUnsupported)
	}
	f, err := aio.Open(path, aio.Options{ReadOnly: opts.ReadOnly, NoDirectIO: opts.NoDirectIO, NoLock: opts.ForceShare})
	if err != nil {
		return nil, &drivers.FileError{Format: "raw", Err: err} // err names the file
	}
	size, err := f.Size()
	if err != nil {
		f.Close()
		return nil, &drivers.FileError{Format: "raw", Err: err}
	}
	d := &Driver{f: f, path: path, readOnly: opts.ReadOnly, growable: opts.Growable, guard: newProbeGuard(opts)}
	d.size.Store(size)
	return d, nil
}

// Size is the disk size: the file size at open, or what Truncate and
// growing writes have made it since.
func (d *Driver) Size() int64 { return d.size.Load() }

// Files implements drivers.FileLister: a raw image is its one file.
func (d *Driver) Files() []drivers.ChainFile {
	return []drivers.ChainFile{{Path: d.path, Role: "image"}}
}

// inRange reports whether [off, off+n) lies inside a disk of size bytes.
func inRange(off, n, size int64) bool {
	return off >= 0 && n >= 0 && off <= size && n <= size-off
}

// ReadAt fills p from off; [off, off+len(p)) must lie inside the disk.
func (d *Driver) ReadAt(co *coroutine.Co, p []byte, off int64) (int, error) {
	if size := d.Size(); !inRange(off, int64(len(p)), size) {
		return 0, fmt.Errorf("raw: %s: read [%#x, +%#x) outside the disk (size %#x): %w",
			d.path, off, len(p), size, syscall.EINVAL)
	}
	if err := d.f.PreadCo(co, p, off); err != nil {
		return 0, fmt.Errorf("raw: %w", err)
	}
	return len(p), nil
}

// ReadDirect is the read fast path: one iocb straight into p. It reports
// ok=false, having done nothing, when aio cannot serve the request directly
// (misaligned buffer, offset or length, or out of range: ReadAt then
// reports the error).
func (d *Driver) ReadDirect(co *coroutine.Co, p []byte, off int64) (n int, ok bool, err error) {
	if !inRange(off, int64(len(p)), d.Size()) {
		return 0, false, nil
	}
	ok, err = d.f.PreadAlignedCo(co, p, off)
	if !ok {
		return 0, false, nil
	}
	if err != nil {
		return 0, true, fmt.Errorf("raw: %w", err)
	}
	return len(p), true, nil
}

// WriteAt writes p at off. A write reaching past the end of the disk grows
// the disk to its end if the image was opened Growable (the gap, if any,
// reads as zeros); otherwise it fails with ErrNoSpace before anything is
// written. On an image opened with a probed format, a write that would make
// the file probe as another format fails with EPERM (probeguard.go).
func (d *Driver) WriteAt(co *coroutine.Co, p []byte, off int64) (int, error) {
	if d.readOnly {
		return 0, fmt.Errorf("raw: %s: %w", d.path, drivers.ErrReadOnly)
	}
	if n := int64(len(p)); d.guard.touchesProbed(off, n, d.Size()) {
		newSize := func(size int64) int64 {
			if d.growable && off+n > size {
				return off + n
			}
			return size
		}
		var written int
		err := d.guarded(co, p, off, n, newSize, func() (err error) {
			written, err = d.writeAt(co, p, off)
			return err
		})
		return written, err
	}
	return d.writeAt(co, p, off)
}

// writeAt is WriteAt on a writable image, past the probe guard.
func (d *Driver) writeAt(co *coroutine.Co, p []byte, off int64) (int, error) {
	n := int64(len(p))
	if size := d.Size(); !inRange(off, n, size) {
		if !d.growable || off < 0 || off > math.MaxInt64-n {
			return 0, fmt.Errorf("raw: %s: write [%#x, +%#x) past the end (size %#x): %w",
				d.path, off, n, size, drivers.ErrNoSpace)
		}
		return d.growingWrite(co, p, off)
	}
	if err := d.f.PwriteCo(co, p, off); err != nil {
		return 0, fmt.Errorf("raw: %w", err)
	}
	return len(p), nil
}

// growingWrite writes p at off on a growable disk, where off+len(p) was
// past the end when the caller looked, and makes the disk end there.
func (d *Driver) growingWrite(co *coroutine.Co, p []byte, off int64) (int, error) {
	d.resizeMu.Lock(co)
	defer d.resizeMu.Unlock(co)
	end := off + int64(len(p))
	if err := d.f.PwriteCo(co, p, off); err != nil {
		// The file may have grown partly; the disk keeps its size (a
		// later growth or Truncate sets the file length again).
		return 0, fmt.Errorf("raw: %w", err)
	}
	// Another growth may have overtaken the caller's look at the size.
	if end > d.Size() {
		d.size.Store(end)
	}
	return len(p), nil
}

// Flush makes written data durable (fdatasync). A read-only image has
// nothing to flush.
func (d *Driver) Flush(co *coroutine.Co) error {
	if d.readOnly {
		return nil
	}
	if err := d.f.FdatasyncCo(co); err != nil {
		return fmt.Errorf("raw: %w", err)
	}
	return nil
}

// Discard makes [off, off+n) read as zeros, punching a hole in the image
// file where its filesystem can (mkfs through a loop device discards the
// whole disk: a hole costs nothing, writing zeros costs the whole disk).
func (d *Driver) Discard(co *coroutine.Co, off, n int64) error {
	return d.zeroRange(co, off, n, unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE)
}

// WriteZeroes makes [off, off+n) read as zeros: a punched hole if unmap is
// set, else a zeroed, still allocated range (FALLOC_FL_ZERO_RANGE).
func (d *Driver) WriteZeroes(co *coroutine.Co, off, n int64, unmap bool) error {
	mode := uint32(unix.FALLOC_FL_ZERO_RANGE | unix.FALLOC_FL_KEEP_SIZE)
	if unmap {
		mode = unix.FALLOC_FL_PUNCH_HOLE | unix.FALLOC_FL_KEEP_SIZE
	}
	return d.zeroRange(co, off, n, mode)
}

// zeroRange zeroes [off, off+n) with fallocate(mode), or by writing zeros
// if the image file's filesystem does not support mode.
func (d *Driver) zeroRange(co *coroutine.Co, off, n int64, mode uint32) error {
	if d.readOnly {
		return fmt.Errorf("raw: %s: %w", d.path, drivers.ErrReadOnly)
	}
	if size := d.Size(); !inRange(off, n, size) {
		return fmt.Errorf("raw: %s: zero [%#x, +%#x) past the end (size %#x): %w",
			d.path, off, n, size, drivers.ErrNoSpace)
	}
	if n == 0 {
		return nil
	}
	if d.guard.touchesProbed(off, n, d.Size()) {
		same := func(size int64) int64 { return size }
		return d.guarded(co, nil, off, n, same, func() error { return d.zeroRangeAt(co, off, n, mode) })
	}
	return d.zeroRangeAt(co, off, n, mode)
}

// zeroRangeAt is zeroRange on a checked, non-empty range.
func (d *Driver) zeroRangeAt(co *coroutine.Co, off, n int64, mode uint32) error {
	err := d.f.FallocateCo(co, mode, off, n)
	if errors.Is(err, unix.EOPNOTSUPP) || errors.Is(err, unix.ENOSYS) {
		return d.writeZeroes(co, off, n)
	}
	if err != nil {
		return fmt.Errorf("raw: %w", err)
	}
	return nil
}

// zeroChunk bounds one zero write: large enough to stream, small enough
// that one request does not hold a huge write in flight.
const zeroChunk = 1 << 20

var zeros = sync.OnceValue(func() []byte { return aio.AlignedBuffer(zeroChunk) })

// writeZeroes writes zeros over [off, off+n), which the caller has checked.
func (d *Driver) writeZeroes(co *coroutine.Co, off, n int64) error {
	// The buffer is shared by every caller and only ever read.
	z := zeros()
	for n > 0 {
		// Align chunk ends to zeroChunk so that later chunks stay aligned
		// for O_DIRECT when the first one is not.
		c := min(n, zeroChunk-off%zeroChunk)
		if err := d.f.PwriteCo(co, z[:c], off); err != nil {
			return fmt.Errorf("raw: %w", err)
		}
		off += c
		n -= c
	}
	return nil
}

// BlockStatus answers from the host file's own holes (SEEK_DATA/SEEK_HOLE),
// as qemu-img map does: a hole reads as zeros and holds no data. Where the
// file system cannot tell, everything is data.
func (d *Driver) BlockStatus(co *coroutine.Co, off int64) (drivers.Extent, error) {
	size := d.Size()
	if off < 0 || off >= size {
		return drivers.Extent{}, fmt.Errorf("raw: %s: block status at %#x outside the disk (size %#x): %w",
			d.path, off, size, syscall.EINVAL)
	}
	data := drivers.Extent{Off: off, Len: size - off, Flags: drivers.ExtentData}
	next, err := d.f.Seek(off, unix.SEEK_DATA)
	switch {
	case errors.Is(err, unix.ENXIO):
		// No data from off to the end of the file.
		return drivers.Extent{Off: off, Len: size - off, Flags: drivers.ExtentZero}, nil
	case err != nil:
		return data, nil
	case next > off:
		return drivers.Extent{Off: off, Len: min(next, size) - off, Flags: drivers.ExtentZero}, nil
	}
	hole, err := d.f.Seek(off, unix.SEEK_HOLE)
	if err != nil || hole <= off {
		return data, nil
	}
	data.Len = min(hole, size) - off
	return data, nil
}

// Truncate grows the disk to size; the new range reads as zeros (a hole
// in the image file). Shrinking is refused with an error wrapping
// drivers.ErrUnsupported: a shell's '>' redirection onto the exposed file
// opens it with O_TRUNC, and obeying would destroy the disk. Asking for the
// current size succeeds, read-only or not. On an image opened with a
// probed format, growing the disk moves its last sector, and is refused
// with EPERM if the new last sector would make the file probe as another
// format (probeguard.go).
func (d *Driver) Truncate(co *coroutine.Co, size int64) error {
	if size == d.Size() {
		return nil
	}
	if d.readOnly {
		return fmt.Errorf("raw: %s: %w", d.path, drivers.ErrReadOnly)
	}
	if d.guard != nil && size > d.Size() {
		to := func(int64) int64 { return size }
		return d.guarded(co, nil, 0, 0, to, func() error { return d.truncate(co, size) })
	}
	return d.truncate(co, size)
}

// truncate is Truncate on a writable image, past the probe guard.
func (d *Driver) truncate(co *coroutine.Co, size int64) error {
	d.resizeMu.Lock(co)
	defer d.resizeMu.Unlock(co)
	cur := d.Size()
	switch {
	case size == cur:
		return nil
	case size < cur:
		return fmt.Errorf("raw: %s: shrinking the disk from %d to %d bytes would destroy the data past the new end; refused: %w",
			d.path, cur, size, drivers.ErrUnsupported)
	}
	if err := d.f.TruncateCo(co, size); err != nil {
		return fmt.Errorf("raw: %w", err)
	}
	d.size.Store(size)
	return nil
}

// Info describes the image. FileSize is the space the file occupies on its
// filesystem (what `qemu-img info` calls disk size), 0 if it cannot be
// found.
func (d *Driver) Info() drivers.ImageInfo {
	info := drivers.ImageInfo{Filename: d.path, Format: "raw", VirtualSize: d.Size()}
	info.FileSize = drivers.DiskUsage(d.path)
	return info
}

// Allocated implements drivers.Allocator: the image file's own allocation
// (st_blocks × 512, one fstat), clamped to the disk size. On a filesystem
// that keeps holes that is exactly the part of the disk stored, give or
// take the filesystem's block granularity and any preallocation past the
// end (cut by the clamp); on one that does not (or compresses), what it
// reports. A block device has no such count, and an fstat that fails
// tells nothing: both count as fully allocated, the safe answer for
// copying tools.
func (d *Driver) Allocated() int64 {
	size := d.Size()
	if d.f.BlockDevice() {
		return size
	}
	a, err := d.f.Allocated()
	if err != nil {
		return size
	}
	return min(max(a, 0), size)
}

// LendBackingFd lends the image's descriptor to fn (FUSE passthrough
// registers it with the kernel). The descriptor's own flags do not matter
// to the kernel, which opens the file anew for every passthrough open (see
// fusefs's package doc), so the O_DIRECT descriptor aio already holds will
// do; on a read-only image it is the read-only descriptor.
func (d *Driver) LendBackingFd(fn func(fd int) error) error {
	if d.f.BlockDevice() {
		return fmt.Errorf("raw: %s is a block device, not a regular file: %w", d.path, drivers.ErrUnsupported)
	}
	if err := d.f.LendFd(fn); err != nil {
		return fmt.Errorf("raw: %w", err)
	}
	return nil
}

// Close closes the image file after in-flight I/O. It does not flush.
func (d *Driver) Close() error {
	if err := d.f.Close(); err != nil {
		return fmt.Errorf("raw: %w", err)
	}
	return nil
}
