package qcow2

import (
	"fmt"
	"io"

	"imgfuse/aio"
	"imgfuse/coroutine"
	"imgfuse/drivers"
)

// ReadAt implements drivers.Driver. The request may be unaligned and span
// any number of clusters. Each run is mapped under the metadata lock and
// read after releasing it; p is not referenced once ReadAt returns.
func (img *image) ReadAt(co *coroutine.Co, p []byte, off int64) (_ int, err error) {
	defer img.nameErr(&err)
	if size := img.size.Load(); off < 0 || off > size || int64(len(p)) > size-off {
		return 0, fmt.Errorf("read of %d bytes at %#x outside the %d-byte disk: %w", len(p), off, size, io.ErrUnexpectedEOF)
	}
	done := 0
	for done < len(p) {
		pos := off + int64(done)
		img.mu.Lock(co)
		run, err := img.mapLocked(co, pos, int64(len(p)-done))
		if err == nil {
			err = img.checkReadLocked(co, &run, pos)
		}
		img.mu.Unlock(co)
		if err != nil {
			return done, err
		}
		chunk := p[done : done+int(run.n)]
		switch run.typ {
		case ctNormal:
			if img.data == nil {
				return done, img.dataErr
			}
			err = img.data.PreadCo(co, chunk, run.host)
			if err != nil {
				err = fmt.Errorf("reading guest %#x from host %#x: %w", pos, run.host, err)
			}
		case ctZeroPlain, ctZeroAlloc:
			clear(chunk)
		case ctUnallocated, ctUnallocatedAlloc:
			err = img.readBacking(co, chunk, pos)
		case ctCompressed:
			err = img.readCompressed(co, chunk, pos, run.l2e)
		default:
			err = fmt.Errorf("cluster type %v at %#x: %w", run.typ, pos, drivers.ErrCorrupt)
		}
		if err != nil {
			return done, err
		}
		done += int(run.n)
	}
	return done, nil
}

// readCompressed fills p (inside one cluster) from the compressed cluster
// at guest offset off described by L2 entry e.
func (img *image) readCompressed(co *coroutine.Co, p []byte, off int64, e uint64) error {
	inCluster := off & (img.clusterSize - 1)
	if buf := img.zcacheGet(e); buf != nil {
		copy(p, buf[inCluster:])
		img.zcachePut(e, buf)
		return nil
	}
	coff, csize := img.compressedRange(e) // mapLocked checked coff < EOF
	// The stream may end in a sector shared with the next one, and the
	// range may run past EOF, which reads as zeros: the decoder stops once
	// it has produced a cluster.
	src := img.srcBuffer(csize)
	defer img.srcPool.Put(&src)
	if err := img.file.PreadCo(co, src, coff); err != nil {
		return fmt.Errorf("reading compressed cluster at %#x: %w", coff, err)
	}
	dst := img.zcacheBuffer()
	var err error
	coroutine.RunInWorker(co, func() { err = decompressCluster(img.h.CompressionType, src, dst) })
	if err != nil {
		img.zcacheFree(dst)
		return fmt.Errorf("compressed cluster at guest %#x (host %#x, %d bytes): %w", off-inCluster, coff, csize, err)
	}
	copy(p, dst[inCluster:])
	img.zcachePut(e, dst)
	return nil
}

// srcBuffer returns an aligned buffer of n bytes for compressed data, reused
// from srcPool when one is large enough.
func (img *image) srcBuffer(n int64) []byte {
	if b, ok := img.srcPool.Get().(*[]byte); ok && int64(cap(*b)) >= n {
		return (*b)[:n]
	}
	// Most streams fit in a cluster; a larger one gets its own buffer,
	// which the pool then keeps.
	return aio.AlignedBuffer(int(max(n, img.clusterSize)))[:n]
}

// BlockStatus implements drivers.Driver. On entry, 0 <= off < Size(); on
// exit, the extent starts at off and covers one run of the mapping (and of
// the backing layer's status where the run reads from it): ExtentData for
// stored data in this image (normal or compressed clusters) or below it,
// ExtentZero for zero clusters and for unallocated ranges with nothing
// below them, as `qemu-img map` reports them.
func (img *image) BlockStatus(co *coroutine.Co, off int64) (_ drivers.Extent, err error) {
	defer img.nameErr(&err)
	size := img.size.Load()
	if off < 0 || off >= size {
		return drivers.Extent{}, fmt.Errorf("block status at %#x outside the %d-byte disk: %w", off, size, io.ErrUnexpectedEOF)
	}
	img.mu.Lock(co)
	run, err := img.mapLocked(co, off, size-off)
	img.mu.Unlock(co)
	if err != nil {
		return drivers.Extent{}, err
	}
	switch run.typ {
	case ctNormal, ctCompressed:
		return drivers.Extent{Off: off, Len: run.n, Flags: drivers.ExtentData}, nil
	case ctZeroPlain, ctZeroAlloc:
		return drivers.Extent{Off: off, Len: run.n, Flags: drivers.ExtentZero}, nil
	default:
		return img.backingStatus(co, off, run.n)
	}
}

// zcacheSize is how many decompressed clusters are kept (see the package
// doc).
const zcacheSize = 4

// zfreeMax bounds the spare cluster buffers kept for decompression: an
// eviction frees one for the next miss, so two cover a reader or two.
const zfreeMax = 2

// zcache is a small cache of decompressed clusters keyed by their L2 entry,
// which names the compressed bytes exactly (offset and length). A writer
// that frees compressed clusters must call zcacheDrop, since the same
// entry could later describe new bytes.
type zcache struct {
	ents [zcacheSize]zent
	tick uint64
	// free holds cluster buffers for reuse.
	free [][]byte
}

type zent struct {
	key uint64
	buf []byte // nil: empty slot
	// busy: the buffer is lent out (being copied from); it is not
	// reused until returned.
	busy int
	used uint64
}

// zcacheGet returns the decompressed cluster for entry e and lends it out
// (return it with zcachePut), or nil.
func (img *image) zcacheGet(e uint64) []byte {
	img.zmu.Lock()
	defer img.zmu.Unlock()
	for i := range img.zcache.ents {
		z := &img.zcache.ents[i]
		if z.buf != nil && z.key == e {
			z.busy++
			img.zcache.tick++
			z.used = img.zcache.tick
			return z.buf
		}
	}
	return nil
}

// zcachePut returns a buffer obtained from zcacheGet, or inserts a freshly
// decompressed cluster for e.
func (img *image) zcachePut(e uint64, buf []byte) {
	img.zmu.Lock()
	defer img.zmu.Unlock()
	zc := &img.zcache
	for i := range zc.ents {
		z := &zc.ents[i]
		if z.buf != nil && &z.buf[0] == &buf[0] {
			z.busy--
			return
		}
	}
	for i := range zc.ents {
		if zc.ents[i].buf != nil && zc.ents[i].key == e {
			// Another reader decompressed it first.
			zc.free = append(zc.free, buf)
			return
		}
	}
	victim := -1
	for i := range zc.ents {
		z := &zc.ents[i]
		if z.busy > 0 {
			continue
		}
		if victim < 0 || z.buf == nil || (zc.ents[victim].buf != nil && z.used < zc.ents[victim].used) {
			victim = i
		}
	}
	if victim < 0 {
		zc.free = append(zc.free, buf)
		return
	}
	z := &zc.ents[victim]
	if z.buf != nil {
		zc.free = append(zc.free, z.buf)
	}
	zc.tick++
	*z = zent{key: e, buf: buf, used: zc.tick}
	if len(zc.free) > zfreeMax {
		clear(zc.free[zfreeMax:])
		zc.free = zc.free[:zfreeMax]
	}
}

// zcacheBuffer returns a cluster-sized buffer to decompress into.
func (img *image) zcacheBuffer() []byte {
	img.zmu.Lock()
	defer img.zmu.Unlock()
	zc := &img.zcache
	if n := len(zc.free); n > 0 {
		b := zc.free[n-1]
		zc.free[n-1] = nil
		zc.free = zc.free[:n-1]
		return b
	}
	return make([]byte, img.clusterSize)
}

// zcacheFree returns a buffer from zcacheBuffer that holds nothing useful.
func (img *image) zcacheFree(buf []byte) {
	img.zmu.Lock()
	defer img.zmu.Unlock()
	if len(img.zcache.free) < zfreeMax {
		img.zcache.free = append(img.zcache.free, buf)
	}
}

// zcacheDrop forgets every decompressed cluster (for writers that free or
// rewrite compressed clusters).
func (img *image) zcacheDrop() {
	img.zmu.Lock()
	defer img.zmu.Unlock()
	for i := range img.zcache.ents {
		z := &img.zcache.ents[i]
		if z.busy == 0 {
			*z = zent{}
		} else {
			z.key = ^uint64(0) // never a valid compressed entry (bit 63 is never set)
		}
	}
}
