package qcow2

import (
	"fmt"
	"io"
	"syscall"

	"imgfuse/coroutine"
	"imgfuse/drivers"
	"imgfuse/drivers/blocktab"
)

var _ drivers.LayerMapper = (*image)(nil)

// LayerStatus implements drivers.LayerMapper, as QEMU's
// qcow2_co_block_status: normal clusters hold data at their host offset,
// compressed ones data without a usable offset, zero clusters read as
// zeros (with the offset of a preallocated cluster), and unallocated ones
// are left to the backing layer (an extended-L2 cluster whose subclusters
// are unallocated still has an offset).
func (img *image) LayerStatus(co *coroutine.Co, off int64) (_ drivers.LayerStatus, err error) {
	defer img.nameErr(&err)
	size := img.size.Load()
	if off < 0 || off >= size {
		return drivers.LayerStatus{}, fmt.Errorf("block status at %#x outside the %d-byte disk: %w", off, size, io.ErrUnexpectedEOF)
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
	if run.typ == ctNormal && img.metadataPrealloc(co) {
		// QEMU then asks the host file too (BDRV_BLOCK_RECURSE): data
		// clusters over holes in the file read as zeros.
		zero, n := img.hostStatus(run.host, run.n)
		st.Zero, st.Len = zero, n
	}
	return st, nil
}

// metadataPrealloc makes QEMU's guess (qcow2_detect_metadata_preallocation)
// whether the image was created with preallocation=metadata: more clusters
// have a refcount than the file has allocated (at least 10% and 2 clusters
// more). A small sparse image (header, tables and partly written data
// clusters mostly holes in the file) passes for one too, and qemu-img map
// then reports the holes inside data clusters as zero; so must we. The
// guess is made once per open.
func (img *image) metadataPrealloc(co *coroutine.Co) bool {
	if v := img.mapPrealloc.Load(); v != 0 {
		return v == 2
	}
	yes := false
	var st syscall.Stat_t
	if err := syscall.Stat(img.path, &st); err == nil {
		cs := img.clusterSize
		real := st.Blocks * 512 / cs
		threshold := max(real*10/9, real+2)
		img.mu.Lock(co)
		rc := img.rc
		if rc == nil {
			if r, err := openRefcounts(co, img.file, img.h, img.fileSize, nil); err == nil {
				r.mu = &img.mu
				rc = r
			}
		}
		if rc != nil {
			var count int64
			end := (img.fileSize + cs - 1) / cs
			for c := int64(0); c < end && count < threshold; c++ {
				if v, err := rc.getLocked(co, c); err == nil && v != 0 {
					count++
				}
			}
			yes = count >= threshold
		}
		img.mu.Unlock(co)
	}
	if yes {
		img.mapPrealloc.Store(2)
	} else {
		img.mapPrealloc.Store(1)
	}
	return yes
}

// hostStatus describes at most n bytes of the data file from off as QEMU's
// file-posix block status does: whether they are a hole (zero) and how far
// the answer holds. Past the end of the file everything is zero; where the
// file system cannot tell, everything is data.
func (img *image) hostStatus(off, n int64) (zero bool, length int64) {
	if img.data == nil {
		return false, n // no data file to ask (NoDataFile)
	}
	return blocktab.HostStatus(img.data, off, n)
}

// BackingLayer implements drivers.LayerMapper.
func (img *image) BackingLayer() drivers.Driver { return img.backing }
