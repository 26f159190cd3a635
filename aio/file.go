package aio

import (
	"errors"
	"fmt"
	"os"
	"sync"
	"sync/atomic"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

var (
	// ErrClosed is returned by operations on a File after Close has begun.
	ErrClosed = errors.New("aio: file already closed")
	// ErrReadOnly is returned by writes to a File opened with ReadOnly.
	ErrReadOnly = errors.New("aio: file opened read-only")
)

// ramfsMagic is RAMFS_MAGIC from include/uapi/linux/magic.h.
const ramfsMagic = 0x858458f6

// Options select how Open opens the file.
type Options struct {
	ReadOnly   bool // open O_RDONLY
	NoDirectIO bool // never use O_DIRECT: use the fallback engine
	// NoLock skips QEMU's image locks (see lock.go), like qemu-img -U:
	// for reading an image another process is writing.
	NoLock bool
}

// File is an open image file. All methods are safe for concurrent use.
type File struct {
	// Immutable after Open.
	name     string
	fd       int
	readOnly bool
	blockDev bool
	// direct: the Linux AIO engine (of the calling coroutine's loop)
	// serves the file; otherwise the fallback engine does.
	direct bool
	// memBacked: the fallback serves a tmpfs/ramfs file, whose pread and
	// pwrite copy memory and never wait for a device (see rw.go).
	memBacked bool
	align     int // power of two
	memAlign  int // power of two
	engDesc   string

	// noAioSync is set once IOCB_CMD_FDSYNC has been refused (EINVAL):
	// fdatasync then runs on a worker goroutine.
	noAioSync atomic.Bool

	// filler, if not nil, makes the ranges a read needs present first:
	// the file is a remote image's local file (remote.go).
	filler Filler
	// fresh is a buffered descriptor of a remote image's local file: a
	// read whose blocks were just fetched is served from the page cache,
	// where the filler left them, instead of waiting for a direct read
	// to write them back first (remote.go).
	fresh *os.File

	// rl serializes overlapping writes of the direct engine and caches
	// the file size (see rangeLock). Unused by the fallback engine.
	rl rangeLock

	mu sync.Mutex
	// active counts operations in progress. Protected by mu.
	active int
	// closing is set by Close; no operation starts after it. Protected by mu.
	closing bool
	// idle is closed when active drops to zero while closing. Protected by mu.
	idle chan struct{}
}

// Open opens path for reading and writing (or reading only). It tries
// O_DIRECT with the Linux AIO engine and falls back to buffered pread/pwrite
// when the file cannot do direct I/O: O_DIRECT refused (EINVAL), a
// filesystem that reports no direct-I/O alignment or only emulates O_DIRECT
// through the page cache (tmpfs, ramfs), a probe read that fails, or no AIO
// context available. Engine reports which was chosen and why.
//
// Only regular files and block devices are opened: anything else (a FIFO,
// a character device, a directory, a socket, or a symlink to one) is
// refused with a *NotImageError, without blocking (see openImageFD).
//
// Unless opts.NoLock is set, Open then takes QEMU's image locks, so that a
// QEMU process and imgfuse cannot both write the file; a conflict is a
// *LockError.
//
// A URL (IsURL) is opened through the installed RemoteOpener instead:
// read-only, without image locks (see remote.go).
func Open(path string, opts Options) (*File, error) {
	if IsURL(path) {
		return openRemote(path, opts)
	}
	f, err := openFile(path, opts)
	if err != nil {
		return nil, err
	}
	if !opts.NoLock {
		if err := f.lockImage(); err != nil {
			f.Close()
			return nil, err
		}
	}
	return f, nil
}

func openFile(path string, opts Options) (*File, error) {
	acc := unix.O_RDWR
	if opts.ReadOnly {
		acc = unix.O_RDONLY
	}
	f := &File{name: path, readOnly: opts.ReadOnly, align: 1, memAlign: 1}
	why := "Options.NoDirectIO"
	if !opts.NoDirectIO {
		fd, err := openImageFD(path, acc|unix.O_CLOEXEC|unix.O_DIRECT)
		var pe *os.PathError
		switch {
		case err == nil:
			reason, ok := f.setupDirect(fd)
			if ok {
				if err := f.initSize(); err != nil {
					unix.Close(fd)
					return nil, err
				}
				return f, nil
			}
			unix.Close(fd)
			f.fd = 0
			why = reason
		case errors.As(err, &pe) && pe.Op == "open" && (pe.Err == unix.EINVAL || pe.Err == unix.EOPNOTSUPP):
			why = "O_DIRECT refused by the filesystem"
		default:
			return nil, err
		}
	}
	fd, err := openImageFD(path, acc|unix.O_CLOEXEC)
	if err != nil {
		return nil, err
	}
	f.fd = fd
	f.engDesc = "pread/pwrite (" + why + ")"
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err == nil && st.Mode&unix.S_IFMT == unix.S_IFBLK {
		f.blockDev = true
	}
	return f, nil
}

func openRetry(path string, flags int) (int, error) {
	for {
		fd, err := unix.Open(path, flags, 0)
		if err != unix.EINTR {
			return fd, err
		}
	}
}

// setupDirect decides whether the O_DIRECT descriptor fd can be served by
// the AIO engine, and with which alignment. On success f is set up to use
// fd; otherwise it returns why not.
func (f *File) setupDirect(fd int) (string, bool) {
	var stx unix.Statx_t
	if err := unix.Statx(fd, "", unix.AT_EMPTY_PATH, unix.STATX_TYPE|unix.STATX_DIOALIGN, &stx); err != nil {
		return "statx: " + err.Error(), false
	}
	f.blockDev = stx.Mode&unix.S_IFMT == unix.S_IFBLK
	align, memAlign := 0, 0
	switch {
	case stx.Mask&unix.STATX_DIOALIGN != 0:
		// Linux ≥ 6.1 on a filesystem that knows: 0 means no
		// direct I/O on this file.
		if stx.Dio_offset_align == 0 {
			return "no direct I/O on this file (statx dio_offset_align 0)", false
		}
		align, memAlign = int(stx.Dio_offset_align), int(stx.Dio_mem_align)
	case f.blockDev:
		ssz, err := unix.IoctlGetInt(fd, unix.BLKSSZGET)
		if err != nil {
			return "BLKSSZGET: " + err.Error(), false
		}
		align, memAlign = ssz, ssz
	default:
		var sfs unix.Statfs_t
		if err := unix.Fstatfs(fd, &sfs); err == nil && (sfs.Type == unix.TMPFS_MAGIC || sfs.Type == ramfsMagic) {
			// tmpfs accepts O_DIRECT (Linux ≥ 6.6) but serves it
			// from the page cache: io_submit would run every read
			// synchronously, slower than plain pread.
			f.memBacked = true
			return "tmpfs/ramfs only emulates O_DIRECT", false
		}
		align, memAlign = 4096, 4096
	}
	if !isPow2(align) || align > 1<<20 {
		align = 4096
	}
	if !isPow2(memAlign) || memAlign > 1<<20 {
		memAlign = 4096
	}
	// Some filesystems accept O_DIRECT at open and refuse it on I/O.
	buf := alignedBuffer(align, max(memAlign, 4096))
	for {
		_, err := unix.Pread(fd, buf, 0)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return fmt.Sprintf("O_DIRECT probe read of %d bytes: %v", align, err), false
		}
		break
	}
	if err := aioAvailable(); err != nil {
		return err.Error(), false
	}
	f.fd = fd
	f.direct = true
	f.align, f.memAlign = align, memAlign
	f.engDesc = fmt.Sprintf("linux-aio O_DIRECT (offset/length align %d, memory align %d)", align, memAlign)
	return "", true
}

func (f *File) initSize() error {
	if f.blockDev {
		// A block device never grows: no write is "extending".
		f.rl.size = toEOF
		return nil
	}
	size, err := f.Size()
	if err != nil {
		return err
	}
	f.rl.size = size
	return nil
}

func isPow2(n int) bool { return n > 0 && n&(n-1) == 0 }

// begin registers an operation, or fails once Close has begun.
func (f *File) begin() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.closing {
		return fmt.Errorf("aio: %s: %w", f.name, ErrClosed)
	}
	f.active++
	return nil
}

func (f *File) end() {
	f.mu.Lock()
	f.active--
	if f.active == 0 && f.idle != nil {
		close(f.idle)
		f.idle = nil
	}
	f.mu.Unlock()
}

// Close refuses new operations, waits for those in progress (including
// their AIO requests) and closes the descriptor. It must not be called from
// a coroutine that has I/O of its own in progress on f.
func (f *File) Close() error {
	f.mu.Lock()
	if f.closing {
		f.mu.Unlock()
		return fmt.Errorf("aio: %s: %w", f.name, ErrClosed)
	}
	f.closing = true
	var wait chan struct{}
	if f.active > 0 {
		wait = make(chan struct{})
		f.idle = wait
	}
	f.mu.Unlock()
	if wait != nil {
		<-wait
	}
	if f.fresh != nil {
		f.fresh.Close()
	}
	if err := unix.Close(f.fd); err != nil {
		return &os.PathError{Op: "close", Path: f.name, Err: err}
	}
	return nil
}

// Name returns the path the file was opened with.
func (f *File) Name() string { return f.name }

// Direct reports whether the file is open O_DIRECT and served by the Linux
// AIO engine.
func (f *File) Direct() bool { return f.direct }

// Align returns the offset and length alignment of the fast path: requests
// that meet it (and MemAlign) need no bounce buffer. 1 for the fallback
// engine.
func (f *File) Align() int { return f.align }

// MemAlign returns the buffer address alignment of the fast path. 1 for the
// fallback engine.
func (f *File) MemAlign() int { return f.memAlign }

// Engine describes the engine in use and, for the fallback, why; for logs.
func (f *File) Engine() string { return f.engDesc }

// Size returns the file size (the device size for a block device).
func (f *File) Size() (int64, error) {
	if f.blockDev {
		var n uint64
		_, _, e := unix.Syscall(unix.SYS_IOCTL, uintptr(f.fd), unix.BLKGETSIZE64, uintptr(unsafe.Pointer(&n)))
		if e != 0 {
			return 0, &os.PathError{Op: "ioctl BLKGETSIZE64", Path: f.name, Err: e}
		}
		return int64(n), nil
	}
	var st unix.Stat_t
	if err := unix.Fstat(f.fd, &st); err != nil {
		return 0, &os.PathError{Op: "fstat", Path: f.name, Err: err}
	}
	return st.Size, nil
}

// Allocated returns the storage the file occupies on its filesystem:
// st_blocks × 512, what du counts. It is less than the size where the file
// has holes and may be more where the filesystem preallocated; a block
// device reports 0 (the caller decides what that means). One fstat(2).
func (f *File) Allocated() (int64, error) {
	if err := f.begin(); err != nil {
		return 0, err
	}
	defer f.end()
	var st unix.Stat_t
	if err := unix.Fstat(f.fd, &st); err != nil {
		return 0, &os.PathError{Op: "fstat", Path: f.name, Err: err}
	}
	return st.Blocks * 512, nil
}

// ModTime returns the file's modification time.
func (f *File) ModTime() (time.Time, error) {
	var st unix.Stat_t
	if err := unix.Fstat(f.fd, &st); err != nil {
		return time.Time{}, &os.PathError{Op: "fstat", Path: f.name, Err: err}
	}
	return time.Unix(st.Mtim.Unix()), nil
}

// AlignedBuffer returns a zeroed buffer of n bytes whose address is
// 4096-aligned (enough for any O_DIRECT file seen in practice; check
// MemAlign for exotic devices).
func AlignedBuffer(n int) []byte { return alignedBuffer(n, 4096) }

// alignedBuffer returns n bytes at an address that is a multiple of a (a
// power of two). The slice's capacity is n, so appends reallocate.
func alignedBuffer(n, a int) []byte {
	b := make([]byte, n+a)
	skip := int(uintptr(a)-uintptr(unsafe.Pointer(unsafe.SliceData(b)))%uintptr(a)) % a
	return b[skip : skip+n : skip+n]
}
