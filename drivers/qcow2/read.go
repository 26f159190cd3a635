package qcow2

import (
	"fmt"
	"io"
	"runtime"
	"sync"

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
			if len(p)-done > int(run.n) {
				// More clusters follow: read and decompress the
				// compressed ones among them together.
				var n int
				n, err = img.readCompressedRun(co, p[done:], pos, run)
				done += n
				if err != nil {
					return done, err
				}
				continue
			}
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

// zbatchMax bounds the compressed clusters read and decompressed together:
// a 1 MiB request of 64 KiB clusters is one batch.
const zbatchMax = 32

// zpiece is one compressed cluster of a batch.
type zpiece struct {
	l2e        uint64
	guest      int64 // guest offset of the part of p it fills
	n          int64 // bytes of p it fills
	coff       int64
	csize      int64
	dst        []byte // the whole decompressed cluster
	whole      bool   // dst is the part of p it fills (no copy)
	err        error
	cached, ok bool
}

// readCompressedRun fills a prefix of p, starting at guest off whose
// mapping is first (a compressed cluster), with as many consecutive
// compressed clusters as follow (at most zbatchMax), and returns how many
// bytes it filled. qemu-img convert -c and compressed writes lay a disk's
// compressed clusters out one after the other, so their streams are read
// with one request when they lie close together, and decompressed in one
// trip to the workers, split across the CPUs, straight into p for whole
// clusters. QEMU reads and decompresses a request's clusters in parallel
// coroutines (qcow2_co_preadv_task); one cluster at a time, each with its
// own read, worker and wake, ran 1 MiB reads of a zstd image at 0.88x its
// speed.
func (img *image) readCompressedRun(co *coroutine.Co, p []byte, off int64, first hostRun) (int, error) {
	var pieces [zbatchMax]zpiece
	np := 0
	pos, left := off, int64(len(p))
	run := first
	img.mu.Lock(co)
	for {
		pieces[np] = zpiece{l2e: run.l2e, guest: pos, n: run.n}
		np++
		pos += run.n
		left -= run.n
		if left == 0 || np == zbatchMax {
			break
		}
		next, err := img.mapLocked(co, pos, left)
		if err == nil {
			err = img.checkReadLocked(co, &next, pos)
		}
		if err != nil || next.typ != ctCompressed {
			break // the caller maps it again and reports or reads it
		}
		run = next
	}
	img.mu.Unlock(co)

	// The clusters still cached, and the range the others' streams span.
	lo, hi, need := int64(-1), int64(0), int64(0)
	for i := range pieces[:np] {
		z := &pieces[i]
		if buf := img.zcacheGet(z.l2e); buf != nil {
			in := z.guest & (img.clusterSize - 1)
			copy(p[z.guest-off:z.guest-off+z.n], buf[in:])
			img.zcachePut(z.l2e, buf)
			z.cached, z.ok = true, true
			continue
		}
		z.coff, z.csize = img.compressedRange(z.l2e)
		if lo < 0 || z.coff < lo {
			lo = z.coff
		}
		hi = max(hi, z.coff+z.csize)
		need += z.csize
	}
	if lo >= 0 {
		if err := img.decompressPieces(co, p, off, pieces[:np], lo, hi, need); err != nil {
			return 0, err
		}
	}
	// Report the first failure after what was filled before it.
	done := 0
	for i := range pieces[:np] {
		z := &pieces[i]
		if !z.ok {
			return done, fmt.Errorf("compressed cluster at guest %#x (host %#x, %d bytes): %w",
				z.guest-z.guest&(img.clusterSize-1), z.coff, z.csize, z.err)
		}
		done += int(z.n)
	}
	return done, nil
}

// decompressPieces reads the streams of the pieces not cached, which lie in
// [lo, hi) of the file and add up to need bytes, and decompresses them.
func (img *image) decompressPieces(co *coroutine.Co, p []byte, off int64, pieces []zpiece, lo, hi, need int64) error {
	// One read if the streams lie close together (a little more than they
	// need, at most 4 MiB); otherwise one each.
	var span []byte
	if hi-lo <= max(need+need/4, 64<<10) && hi-lo <= 4<<20 {
		span = img.srcBuffer(hi - lo)
		defer img.srcPool.Put(&span)
		if err := img.file.PreadCo(co, span, lo); err != nil {
			return fmt.Errorf("reading compressed clusters at %#x: %w", lo, err)
		}
	}
	srcs := make([][]byte, len(pieces))
	for i := range pieces {
		z := &pieces[i]
		if z.cached {
			continue
		}
		if span != nil {
			srcs[i] = span[z.coff-lo : z.coff-lo+z.csize]
		} else {
			srcs[i] = img.srcBuffer(z.csize)
			defer img.srcPool.Put(&srcs[i])
			if err := img.file.PreadCo(co, srcs[i], z.coff); err != nil {
				return fmt.Errorf("reading compressed cluster at %#x: %w", z.coff, err)
			}
		}
		in := z.guest & (img.clusterSize - 1)
		if in == 0 && z.n == img.clusterSize {
			z.dst, z.whole = p[z.guest-off:z.guest-off+z.n], true
		} else {
			z.dst = img.zcacheBuffer()
		}
	}
	decompress := func(from, step int) {
		for i := from; i < len(pieces); i += step {
			if z := &pieces[i]; !z.cached {
				z.err = decompressCluster(img.h.CompressionType, srcs[i], z.dst)
			}
		}
	}
	coroutine.RunInWorker(co, func() {
		// Every CPU but the one the loop needs decompresses its share.
		workers := min(runtime.GOMAXPROCS(0)-1, (len(pieces)+1)/2)
		if workers <= 1 {
			decompress(0, 1)
			return
		}
		var wg sync.WaitGroup
		for w := 1; w < workers; w++ {
			wg.Add(1)
			go func() { defer wg.Done(); decompress(w, workers) }()
		}
		decompress(0, workers)
		wg.Wait()
	})
	for i := range pieces {
		z := &pieces[i]
		if z.cached {
			continue
		}
		if z.err != nil {
			if !z.whole {
				img.zcacheFree(z.dst)
			}
			continue
		}
		z.ok = true
		if !z.whole {
			in := z.guest & (img.clusterSize - 1)
			copy(p[z.guest-off:z.guest-off+z.n], z.dst[in:])
			img.zcachePut(z.l2e, z.dst)
		}
	}
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
