package drivers

import (
	"io"
	"time"

	"imgfuse/coroutine"
)

// Optional capabilities, found by type assertion on a Driver.

// DirectReader is implemented by drivers that can serve some reads with one
// iocb and no further work (raw images: an aligned read in range).
type DirectReader interface {
	// ReadDirect reads p at off if the request qualifies for the fast path
	// and reports ok=false (having done nothing) if it does not.
	ReadDirect(co *coroutine.Co, p []byte, off int64) (n int, ok bool, err error)
}

// Snapshot describes an internal snapshot.
type Snapshot struct {
	ID          string    `json:"id"`
	Name        string    `json:"name"`
	DiskSize    int64     `json:"disk-size"`
	VMStateSize int64     `json:"vm-state-size"`
	Date        time.Time `json:"date"`
	VMClock     int64     `json:"vm-clock-nsec"`
	// Icount is the guest instruction count at the snapshot (record and
	// replay), -1 when the snapshot does not record one.
	Icount int64 `json:"icount"`
}

// Snapshotter is implemented by drivers whose images hold internal
// snapshots.
type Snapshotter interface {
	Snapshots() []Snapshot
}

// ImageInfo is what `imgfuse info` prints about one image of a chain. The
// fields mirror QEMU's ImageInfo (qemu-img info --output=json); the command
// line renders them in QEMU's JSON shape.
type ImageInfo struct {
	Filename    string `json:"filename"`
	Format      string `json:"format"`
	VirtualSize int64  `json:"virtual-size"`
	// FileSize is the size of the image file itself.
	FileSize int64 `json:"actual-size"`
	// AllocatedSize, if not 0, is the space every file of the image
	// occupies (a VMDK descriptor and its extent files), QEMU's
	// bdrv_get_allocated_file_size, which qemu-img info prints as
	// actual-size; 0 means the image file's own.
	AllocatedSize int64 `json:"-"`
	// ClusterSize is the allocation unit, 0 for formats without one.
	ClusterSize int64 `json:"cluster-size,omitempty"`
	// Dirty: the image says its metadata may be inconsistent (qcow2's
	// dirty bit with lazy refcounts).
	Dirty bool `json:"dirty-flag"`
	// BackingFilename and BackingFormat are the backing file name and
	// format as the image stores them ("" if none).
	BackingFilename string `json:"backing-filename,omitempty"`
	BackingFormat   string `json:"backing-filename-format,omitempty"`
	// DataFile is the external data file name as the image stores it,
	// "" if the image has none.
	DataFile string `json:"-"`
	// FormatSpecific holds the format's own fields in the shape of
	// QEMU's ImageInfoSpecific: {"type": "qcow2", "data": {...}}.
	FormatSpecific *FormatSpecific `json:"format-specific,omitempty"`
	// Extra holds what imgfuse reports beyond QEMU's fields (feature
	// names, ...); it must marshal to a JSON object.
	Extra     any        `json:"imgfuse,omitempty"`
	Snapshots []Snapshot `json:"snapshots,omitempty"`
	// Backing is the next image down the chain, if any.
	Backing *ImageInfo `json:"backing-image,omitempty"`
}

// FormatSpecific is QEMU's ImageInfoSpecific: the format's name and its
// own fields, which must marshal to a JSON object with QEMU's key names.
type FormatSpecific struct {
	Type string `json:"type"`
	Data any    `json:"data"`
}

// Informer is implemented by drivers that can describe themselves.
type Informer interface {
	Info() ImageInfo
}

// ReaderAt adapts a driver to io.ReaderAt for tests and tools: each call
// runs in its own coroutine. It honours the io.ReaderAt contract: a short
// read only with an error, io.EOF at the end of the disk.
func ReaderAt(d Driver) io.ReaderAt { return readerAt{d} }

type readerAt struct{ d Driver }

func (r readerAt) ReadAt(p []byte, off int64) (int, error) {
	size := r.d.Size()
	if off < 0 {
		return 0, io.ErrUnexpectedEOF
	}
	if off >= size {
		return 0, io.EOF
	}
	want := p
	if int64(len(p)) > size-off {
		want = p[:size-off]
	}
	var n int
	var err error
	coroutine.Run(func(co *coroutine.Co) { n, err = r.d.ReadAt(co, want, off) })
	if err == nil && n < len(p) {
		err = io.EOF
	}
	return n, err
}

// FileBacked is implemented by drivers whose disk is one host file, byte
// for byte (raw images), so that the kernel may serve the disk's reads and
// memory maps from that file itself: FUSE passthrough.
type FileBacked interface {
	// LendBackingFd calls fn with a descriptor of the disk's file. fn may
	// hand it to the kernel (which takes its own reference) but must not
	// do I/O on it, close it or keep it after returning. It fails with an
	// error wrapping ErrUnsupported, without calling fn, when the file is
	// not a regular file (a block device cannot back a FUSE file).
	LendBackingFd(fn func(fd int) error) error
}

// Allocator is implemented by drivers that can tell, cheaply, how much of
// the disk is backed by stored data: what st_blocks of the exposed file
// reports, so that du, cp --sparse=auto and tar --sparse see a sparse
// disk as sparse.
type Allocator interface {
	// Allocated estimates the bytes of the disk that some layer of the
	// chain stores data for, in [0, Size()]: an empty disk reports about
	// 0, a fully written one about Size(). It is called on every GETATTR,
	// so it must stay cheap: a few fstat(2) calls, no table reads, no
	// lock a request may hold for long. It never yields and may be called
	// from any goroutine, in a coroutine or not. Each driver's doc says
	// what its estimate counts.
	Allocated() int64
}

// AllocatedOf is d's Allocated, or Size() when d is not an Allocator (a
// disk nothing is known about counts as fully allocated, as a file without
// holes would), clamped to [0, Size()].
func AllocatedOf(d Driver) int64 {
	size := d.Size()
	a, ok := d.(Allocator)
	if !ok {
		return size
	}
	return min(max(a.Allocated(), 0), size)
}

// Damaged is implemented by drivers that check, at open, that the image's
// metadata lies inside its file (qcow2: L1, L2 and refcount tables,
// snapshot tables). A writable open of a damaged image fails; a read-only
// one succeeds, serves what it can (the damaged ranges fail with EIO) and
// reports here what it found, so that the user hears of it at once rather
// than from the first failed read.
type Damaged interface {
	// Damage returns the first problem the open found in the image or
	// further down its backing chain (a *DamageError, wrapping
	// ErrCorrupt), nil if none.
	// It is cheap and may be called from any goroutine.
	Damage() error
}

// DamageError is what Damage returns: the file found damaged (the image or
// a file of its backing chain) and what is wrong with it.
// FileError is an error of one image file, named once:
// "FORMAT: PATH: ERR", or "FORMAT: ERR" when Err names the file itself (an
// error of package os or aio opening it). Whoever reports a chain of files
// can take a file's name off its error with errors.As and Path, never by
// its text.
type FileError struct {
	Format, Path string
	Err          error
}

func (e *FileError) Error() string {
	if e.Path == "" {
		return e.Format + ": " + e.Err.Error()
	}
	return e.Format + ": " + e.Path + ": " + e.Err.Error()
}

func (e *FileError) Unwrap() error { return e.Err }

type DamageError struct {
	Format, Path string
	Err          error // wraps ErrCorrupt
}

func (e *DamageError) Error() string { return e.Format + ": " + e.Path + ": " + e.Err.Error() }
func (e *DamageError) Unwrap() error { return e.Err }

// DamageOf is d's Damage, or nil when d does not check itself.
func DamageOf(d Driver) error {
	if dm, ok := d.(Damaged); ok {
		return dm.Damage()
	}
	return nil
}

// ChainFile is one host file an open driver reads or writes.
type ChainFile struct {
	// Path is the file as the driver opened it.
	Path string
	// Role is "image", "backing file" or "external data file".
	Role string
	// Of is the image whose backing or data file this is ("" for the
	// image opened).
	Of string
}

// FileLister is implemented by drivers that can name every file they
// opened: the image, its external data file and its backing chain, top
// first. The mount uses it to refuse a mountpoint that is one of them.
type FileLister interface {
	Files() []ChainFile
}

// FilesOf is d's Files, or nil when d does not list them.
func FilesOf(d Driver) []ChainFile {
	if fl, ok := d.(FileLister); ok {
		return fl.Files()
	}
	return nil
}
