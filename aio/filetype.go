package aio

import (
	"errors"
	"fmt"
	"os"

	"golang.org/x/sys/unix"
)

// ErrNotImage is wrapped by the error Open and OpenHead return for a path
// that is neither a regular file nor a block device.
var ErrNotImage = errors.New("not a regular file or block device")

// NotImageError says what kind of file an image path turned out to be.
type NotImageError struct {
	Path string
	Kind string // "a FIFO", "a directory", ...
}

func (e *NotImageError) Error() string {
	return fmt.Sprintf("%s: is %s, not a regular file or block device", e.Path, e.Kind)
}

func (e *NotImageError) Unwrap() error { return ErrNotImage }

// fileKind names the file type in mode (st_mode's S_IFMT bits), or "" for
// the types an image may be: a regular file or a block device.
func fileKind(mode uint32) string {
	switch mode & unix.S_IFMT {
	case unix.S_IFREG, unix.S_IFBLK:
		return ""
	case unix.S_IFIFO:
		return "a FIFO"
	case unix.S_IFCHR:
		return "a character device"
	case unix.S_IFDIR:
		return "a directory"
	case unix.S_IFSOCK:
		return "a socket"
	case unix.S_IFLNK:
		return "a symbolic link"
	}
	return fmt.Sprintf("of unknown type %#o", mode&unix.S_IFMT)
}

// openImageFD opens path with flags, refusing without blocking anything
// that is not a regular file or a block device.
//
// A plain open of a FIFO for reading blocks until a writer appears (for
// ever, for an image path), and a character device such as /dev/zero
// opens fine and then reads as an endless disk whose flush fails. Checking
// the path with stat before opening would leave a window in which it is
// replaced, so the file is opened with O_NONBLOCK (which makes a FIFO open
// return at once), checked with fstat on the descriptor itself, and only
// then switched back to blocking I/O. Opening a socket fails with ENXIO and
// a directory opened for writing with EISDIR: those are reported by kind
// too, from a stat of the path (nothing was opened, so nothing can race).
func openImageFD(path string, flags int) (int, error) {
	fd, err := openRetry(path, flags|unix.O_NONBLOCK)
	if err != nil {
		if err == unix.ENXIO || err == unix.EISDIR {
			var st unix.Stat_t
			if unix.Stat(path, &st) == nil {
				if kind := fileKind(st.Mode); kind != "" {
					return -1, &NotImageError{Path: path, Kind: kind}
				}
			}
		}
		return -1, &os.PathError{Op: "open", Path: path, Err: err}
	}
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		unix.Close(fd)
		return -1, &os.PathError{Op: "fstat", Path: path, Err: err}
	}
	if kind := fileKind(st.Mode); kind != "" {
		unix.Close(fd)
		return -1, &NotImageError{Path: path, Kind: kind}
	}
	fl, err := unix.FcntlInt(uintptr(fd), unix.F_GETFL, 0)
	if err == nil {
		_, err = unix.FcntlInt(uintptr(fd), unix.F_SETFL, fl&^unix.O_NONBLOCK)
	}
	if err != nil {
		unix.Close(fd)
		return -1, &os.PathError{Op: "fcntl", Path: path, Err: err}
	}
	return fd, nil
}

// headBytes is what OpenHead fills of a remote image's head and tail: more
// than any prober reads (drivers.ProbeSize).
const headBytes = 64 << 10

// OpenHead opens path read-only, as Open would refuse it, for reading the
// head of a file before its format is known (probing): without blocking
// and only if it is a regular file or a block device. It takes no lock.
// It must not be called from a coroutine.
//
// For a URL it opens the remote image's local file, having filled its
// first and last headBytes (what probing reads).
func OpenHead(path string) (*os.File, error) {
	if IsURL(path) {
		return openRemoteHead(path)
	}
	fd, err := openImageFD(path, unix.O_RDONLY|unix.O_CLOEXEC)
	if err != nil {
		return nil, err
	}
	return os.NewFile(uintptr(fd), path), nil
}
