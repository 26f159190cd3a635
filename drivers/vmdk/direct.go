package vmdk

import (
	"fmt"

	"imgfuse/coroutine"
	"imgfuse/drivers"
)

// Flat extents are ranges of plain files: their reads take the fast paths
// raw images take.

var (
	_ drivers.DirectReader = (*Driver)(nil)
	_ drivers.FileBacked   = wholeFileDriver{}
)

// ReadDirect serves a read that lies inside one flat extent with one iocb
// straight into p, when aio can take it as it is (aligned at the extent's
// offset in its file). Other reads report ok=false having done nothing.
func (d *Driver) ReadDirect(co *coroutine.Co, p []byte, off int64) (n int, ok bool, err error) {
	e := d.flatExtentOf(off, int64(len(p)))
	if e == nil {
		return 0, false, nil
	}
	ok, err = e.f.PreadAlignedCo(co, p, e.flatOff+off-e.start)
	if !ok {
		return 0, false, nil
	}
	if err != nil {
		return 0, true, fmt.Errorf("vmdk: %w", err)
	}
	return len(p), true, nil
}

// flatExtentOf returns the flat extent holding all of [off, off+n), or nil.
func (d *Driver) flatExtentOf(off, n int64) *extent {
	if n <= 0 || off < 0 || off > d.size || n > d.size-off {
		return nil
	}
	var found *extent
	d.split(off, n, func(pc piece) error {
		if pc.pos == 0 && pc.n == n && pc.e.kind == kindFlat {
			found = pc.e
		}
		return nil
	})
	return found
}

// wholeFile reports whether the disk is one file byte for byte, so that
// FUSE passthrough may read that file itself: a read-only image of one
// flat extent at offset 0 of a regular file exactly the disk's size (a
// monolithicFlat image's -flat.vmdk). Not a file with more bytes past the
// disk: the kernel does not bound passed-through reads by the disk's
// size. Not a writable image: the driver must see every write, mapped
// ones included, to give the image a new CID on the first, as QEMU does.
func (d *Driver) wholeFile() bool {
	if !d.readOnly || len(d.extents) != 1 {
		return false
	}
	e := d.extents[0]
	if e.kind != kindFlat || e.flatOff != 0 || e.f.BlockDevice() {
		return false
	}
	size, err := e.f.Size()
	return err == nil && size == d.size
}

// wholeFileDriver is a Driver whose disk is one file (wholeFile): only
// such a disk is drivers.FileBacked, so that the others do not even
// negotiate passthrough with the kernel.
type wholeFileDriver struct{ *Driver }

// LendBackingFd lends the descriptor of the disk's one file.
func (w wholeFileDriver) LendBackingFd(fn func(fd int) error) error {
	if err := w.extents[0].f.LendFd(fn); err != nil {
		return fmt.Errorf("vmdk: %w", err)
	}
	return nil
}
