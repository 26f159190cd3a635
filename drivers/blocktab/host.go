package blocktab

import (
	"errors"

	"golang.org/x/sys/unix"

	"imgfuse/aio"
)

// HostStatus describes at most n bytes of f from off as QEMU's file-posix
// block status does, which qemu-img map consults under every data run
// with an offset: whether they are a hole (reading as zeros) and how far
// the answer holds. Past the end of the file everything is zero; where
// the file system cannot tell, everything is data. It never yields.
func HostStatus(f *aio.File, off, n int64) (zero bool, length int64) {
	size, err := f.Size()
	if err != nil {
		return false, n
	}
	if off >= size {
		return true, n
	}
	data, err := f.Seek(off, unix.SEEK_DATA)
	switch {
	case errors.Is(err, unix.ENXIO):
		return true, n // a trailing hole
	case err != nil:
		return false, n
	case data > off:
		return true, min(n, data-off)
	}
	hole, err := f.Seek(off, unix.SEEK_HOLE)
	if err != nil || hole <= off {
		return false, n
	}
	return false, min(n, hole-off)
}
