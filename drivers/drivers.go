package drivers

import (
	"errors"
	"fmt"

	"imgfuse/coroutine"
)

// Sentinel errors. Drivers wrap them with context, e.g.
// fmt.Errorf("qcow2: L2 table at %#x: %w", off, drivers.ErrCorrupt).
var (
	// ErrCorrupt: the image contradicts its own format.
	ErrCorrupt = errors.New("image is corrupt")
	// ErrUnsupported: a valid image using a feature imgfuse does not implement.
	ErrUnsupported = errors.New("unsupported image feature")
	// ErrReadOnly: a write to an image opened read-only.
	ErrReadOnly = errors.New("image is read-only")
	// ErrLocked: another process holds a conflicting lock on the image.
	ErrLocked = errors.New("image is locked by another process")
	// ErrNoSpace: a write past the end of a disk that may not grow.
	ErrNoSpace = errors.New("write past the end of the disk")
	// ErrUnknownFormat: no format recognised the file.
	ErrUnknownFormat = errors.New("unknown image format")
)

// ExtentFlags describe how a range of the virtual disk reads.
type ExtentFlags uint8

const (
	// ExtentData: the range is backed by stored data in some layer of the
	// chain (it is not a hole for SEEK_DATA/SEEK_HOLE).
	ExtentData ExtentFlags = 1 << iota
	// ExtentZero: the range is known to read as zeros.
	ExtentZero
)

// Extent is a run of the virtual disk with one status.
type Extent struct {
	Off, Len int64
	Flags    ExtentFlags
}

// Driver is an open disk image. Every method that may yield takes the
// calling coroutine first; a driver is used by many coroutines at once and
// serialises what it must internally.
//
// Offsets and lengths are in bytes of the virtual disk. Callers keep every
// request inside [0, Size()) unless the method says otherwise; requests need
// not be aligned.
type Driver interface {
	// Size is the virtual disk size in bytes.
	Size() int64
	// ReadAt fills p from off. It returns len(p), nil or an error; a read
	// never returns short without an error.
	ReadAt(co *coroutine.Co, p []byte, off int64) (int, error)
	// WriteAt writes p at off; ErrReadOnly on a read-only image.
	WriteAt(co *coroutine.Co, p []byte, off int64) (int, error)
	// Flush makes everything written so far durable: metadata, then
	// fdatasync of every file written.
	Flush(co *coroutine.Co) error
	// Discard deallocates [off, off+n) where the format allows; the
	// range must read back as zeros afterwards.
	Discard(co *coroutine.Co, off, n int64) error
	// WriteZeroes makes [off, off+n) read as zeros, deallocating if unmap
	// is set and the format allows.
	WriteZeroes(co *coroutine.Co, off, n int64, unmap bool) error
	// BlockStatus describes the disk from off. On entry, off < Size();
	// on exit, the extent starts at off, is non-empty, and may be shorter
	// than the whole run with the same status (callers loop).
	BlockStatus(co *coroutine.Co, off int64) (Extent, error)
	// Truncate changes the virtual size.
	Truncate(co *coroutine.Co, size int64) error
	// Close releases the image; it does not flush.
	Close() error
}

// OpenOptions are the caller's choices when opening an image.
type OpenOptions struct {
	// ReadOnly opens every file read-only and refuses writes.
	ReadOnly bool
	// Formats is the list of formats available for probing backing files.
	// Assembled above the drivers (see cmd/imgfuse) to avoid import cycles.
	Formats []Format
	// Probed is set by Open when the format was probed rather than named.
	// A writable raw image opened so refuses writes that would make its
	// first ProbeSize bytes probe as another of Formats (a guest could
	// otherwise turn the file into a qcow2 image whose backing file is
	// any host file, read by the next probing open: CVE-2008-2004).
	Probed bool
	// Logf, if set, receives notices meant for the daemon's log (at most
	// one per kind of event per open image).
	Logf func(format string, args ...any)
	// Snapshot selects an internal snapshot (by id or name) to expose
	// read-only instead of the active disk. Empty means the active disk.
	Snapshot string
	// NoDirectIO makes the I/O layer skip O_DIRECT and use buffered
	// pread/pwrite.
	NoDirectIO bool
	// ForceShare skips QEMU's image locks (qemu-img -U): for reading an
	// image that another process may be writing. Only with ReadOnly.
	ForceShare bool
	// Growable lets a write past the end grow the disk instead of failing
	// with ErrNoSpace.
	Growable bool
	// LazyRefcounts turns on lazy refcounts for this open even if the
	// image does not ask for them (qcow2 v3: QEMU's lazy-refcounts=on).
	LazyRefcounts bool
	// CacheSize is the most memory, in bytes, the metadata table cache of
	// each image may hold (qcow2: L2 tables; QEMU's l2-cache-size). Zero
	// means the default: enough to map the whole disk, at most 32 MiB.
	CacheSize int64
	// NoBacking opens the image without its backing file (QEMU's
	// BDRV_O_NO_BACKING): for describing an image whose backing file may
	// be missing. Unallocated ranges then read as zeros. Only with
	// ReadOnly.
	NoBacking bool
	// NoDataFile lets a qcow2 image whose external data file cannot be
	// opened open without it (as qemu-img info, which opens images
	// without I/O, describes such an image): reads of guest data then
	// fail with EIO naming the data file. Only with ReadOnly.
	NoDataFile bool
	// Repair opens an image for a consistency repair (qemu-img check -r):
	// a qcow2 image marked corrupt opens read-write, to be repaired and
	// marked consistent again. Only drivers.Checker's Check may be used
	// on such an open.
	Repair bool
	// Chain is the chain of images above this one, set by drivers that
	// open parent images (EnterChain, OpenParent) to refuse loops across
	// formats. Callers opening an image leave it nil.
	Chain *Chain
}

// Format is one image format: how to recognise it and how to open it.
type Format interface {
	// Name is the format's name as users spell it ("raw", "qcow2").
	Name() string
	// Probe returns a score for how sure the format is that the file
	// described by in is its own: 0 never, 1 as a last resort (raw), 2
	// for a weak sign (a file name, a text preamble), 100 for a matching
	// magic. It must not fail or panic on any input.
	Probe(in ProbeInput) int
	// Open opens the image at path. It must not be called from a
	// coroutine: it blocks on I/O.
	Open(path string, opts OpenOptions) (Driver, error)
}

// ProbeSize is how many leading (and trailing) bytes of a file Probe is
// given.
const ProbeSize = 512

// ProbeInput is what a format's Probe looks at. QEMU's probes see the
// first 512 bytes and the file name; a fixed VHD, whose only header is a
// footer in the last 512 bytes, needs the end of the file too. One struct
// rather than a second, optional probe interface: every format answers
// from the same input, and the raw head guard (drivers/raw) can build the
// input the next probe would see and ask every format at once.
type ProbeInput struct {
	// Head is the file's first ProbeSize bytes, fewer only if the file is
	// shorter. Probes read missing bytes as zeros, as QEMU, which
	// zero-pads a short file's head, does.
	Head []byte
	// Tail is the file's last ProbeSize bytes, fewer only if the file is
	// shorter (then they are Head's bytes); nil when not known. Only
	// probes that go beyond QEMU's look at it.
	Tail []byte
	// Name is the file name as the user or the image that refers to it
	// gave it; "" when there is none (the raw head guard probes bytes a
	// guest would leave, not a file, as QEMU's does).
	Name string
}

// Probe returns the format with the highest score for in. On a tie the
// format listed first wins. Only crafted files tie (a VDI signature at
// 0x40 under another format's magic at 0), and QEMU's order decides no
// more meaningfully.
func Probe(formats []Format, in ProbeInput) (Format, error) {
	var best Format
	bestScore := 0
	for _, f := range formats {
		if s := f.Probe(in); s > bestScore {
			best, bestScore = f, s
		}
	}
	if best == nil {
		return nil, ErrUnknownFormat
	}
	return best, nil
}

// Lookup returns the format called name.
func Lookup(formats []Format, name string) (Format, error) {
	for _, f := range formats {
		if f.Name() == name {
			return f, nil
		}
	}
	return nil, fmt.Errorf("format %q: %w", name, ErrUnknownFormat)
}
