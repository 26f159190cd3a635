package qcow2

import (
	"fmt"
	"io"

	"imgfuse/coroutine"
	"imgfuse/drivers"
)

var _ drivers.LayerMapper = (*image)(nil)

// LayerStatus implements drivers.LayerMapper, as QEMU's
// qcow2_co_block_status: normal clusters hold data at their host offset,
// compressed ones data without a usable offset, zero clusters read as
// zeros (with the offset of a preallocated cluster), and unallocated ones
// are left to the backing layer (an extended-L2 cluster whose subclusters
// are unallocated still has an offset).
func (img *image) LayerStatus(co *coroutine.Co, off int64) (drivers.LayerStatus, error) {
	size := img.size.Load()
	if off < 0 || off >= size {
		return drivers.LayerStatus{}, fmt.Errorf("qcow2: %s: block status at %#x outside the %d-byte disk: %w",
			img.path, off, size, io.ErrUnexpectedEOF)
	}
	img.mu.Lock(co)
	run, err := img.mapLocked(co, off, size-off)
	img.mu.Unlock(co)
	if err != nil {
		return drivers.LayerStatus{}, err
	}
	st := drivers.LayerStatus{Off: off, Len: run.n}
	switch run.typ {
	case ctNormal:
		st.Data = true
	case ctCompressed:
		st.Data = true
	case ctZeroPlain, ctZeroAlloc:
		st.Zero = true
	}
	if run.typ.hasHostOffset() {
		st.HasOffset, st.Offset = true, run.host
	}
	return st, nil
}

// BackingLayer implements drivers.LayerMapper.
func (img *image) BackingLayer() drivers.Driver { return img.backing }
