package qcow2

import (
	"fmt"

	"imgfuse/aio"
	"imgfuse/coroutine"
	"imgfuse/drivers"
)

// Discard implements drivers.Driver: the range reads as zeros afterwards
// and whole clusters give their host clusters back (WriteZeroes with
// unmap).
func (img *image) Discard(co *coroutine.Co, off, n int64) (err error) {
	defer img.nameErr(&err)
	return img.zeroRange(co, off, n, true, "discard")
}

// WriteZeroes implements drivers.Driver.
//
// Whole clusters (subclusters with extended L2) are zeroed in their L2
// entries (qcow2.md §1.13.5, QEMU's zero_in_l2_slice): v3 sets the zero
// flag (extended L2: the zero bits), dropping the host cluster when unmap
// is set or the cluster is compressed, and keeping a COPIED one as a
// preallocated zero cluster otherwise; v2 without a backing file clears the
// entry; v2 with a backing file has no way to hide it and writes real
// zeros. Partial clusters are written with zeros through WriteAt. So are
// images with an external data file, whose data file must keep reading as
// the disk (it may be declared raw). Backing data never shows through.
func (img *image) WriteZeroes(co *coroutine.Co, off, n int64, unmap bool) (err error) {
	defer img.nameErr(&err)
	return img.zeroRange(co, off, n, unmap, "write zeroes")
}

// zeroBuf is a block of zeros for writing zeros; it is only ever read.
var zeroBuf = aio.AlignedBuffer(1 << 20)

func (img *image) zeroRange(co *coroutine.Co, off, n int64, unmap bool, op string) error {
	if !img.writable {
		return img.readOnly(op)
	}
	end := off + n
	if off < 0 || n < 0 || end < off {
		return fmt.Errorf("%s of %d bytes at %#x: invalid range", op, n, off)
	}
	if n == 0 {
		return nil
	}
	size := img.size.Load()
	if end > size {
		return fmt.Errorf("%s up to %#x past the end of the %d-byte disk: %w", op, end, size, drivers.ErrNoSpace)
	}
	if img.extData || (img.h.Version < 3 && img.backing != nil) {
		return img.writeZeros(co, off, n)
	}
	g := int64(1) << img.scBits // subcluster, or cluster
	a := (off + g - 1) &^ (g - 1)
	b := end &^ (g - 1)
	if end == size {
		// The last cluster may be partial: zeroing to the end of the
		// disk covers all of it that exists.
		b = (end + g - 1) &^ (g - 1)
	}
	if a >= b {
		return img.writeZeros(co, off, n)
	}
	if off < a {
		if err := img.writeZeros(co, off, a-off); err != nil {
			return err
		}
	}
	for pos := a; pos < b; {
		k, err := img.zeroStep(co, pos, b-pos, unmap)
		if err != nil {
			return err
		}
		pos += k
	}
	if b < end {
		return img.writeZeros(co, b, end-b)
	}
	return nil
}

// writeZeros writes zeros over [off, off+n) through the write path.
func (img *image) writeZeros(co *coroutine.Co, off, n int64) error {
	for n > 0 {
		k := min(n, int64(len(zeroBuf)))
		if _, err := img.WriteAt(co, zeroBuf[:k], off); err != nil {
			return err
		}
		off += k
		n -= k
	}
	return nil
}

// zeroStep zeroes whole (sub)clusters from pos, at most n bytes, inside one
// L2 table, and returns how many bytes it covered. pos is aligned to the
// zeroing granularity; n is too, except at the end of the disk.
func (img *image) zeroStep(co *coroutine.Co, pos, n int64, unmap bool) (int64, error) {
	img.mu.Lock(co)
	done, partial, err := img.zeroStepLocked(co, pos, n, unmap)
	err = img.signalCorruptionLocked(co, err)
	img.mu.Unlock(co)
	if err != nil || partial == 0 {
		return done, err
	}
	// Part of a compressed cluster, which has no subcluster bitmap: zeros
	// through the write path, without the lock.
	if err := img.writeZeros(co, pos+done, partial); err != nil {
		return 0, err
	}
	return done + partial, nil
}

// zeroStepLocked is zeroStep's L2 update: it zeroes the entries from pos
// and returns the bytes done. It stops at a compressed cluster only partly
// covered, whose bytes from pos+done to partial it leaves for the caller
// to write zeros over.
func (img *image) zeroStepLocked(co *coroutine.Co, pos, n int64, unmap bool) (done, partial int64, err error) {
	img.mu.AssertHeld(co)
	if img.broken != nil {
		return 0, 0, img.broken
	}
	cs := img.clusterSize
	l1Index, _, n := img.l2Slot(pos, n)
	for {
		var waited bool
		if n, waited = img.waitForAllocsLocked(co, pos, n); !waited {
			break
		}
	}
	old, err := img.l2OffsetLocked(co, l1Index)
	if err != nil {
		return 0, 0, err
	}
	// Nothing below reads through an unallocated L2 table: it already
	// reads as zeros.
	if old == 0 && (img.backing == nil || pos&^(cs-1) >= img.backingSize) {
		return n, 0, nil
	}
	s, err := img.sliceLocked(co, pos, n, sliceUpdate)
	if err != nil {
		return 0, 0, err
	}
	defer s.close()
	var (
		rel   releases
		dirty bool
	)
	done = n
	for i := range s.n {
		e, bm := s.entry(i)
		scA, scB := s.touched(i)
		if _, _, _, err := s.typeAt(i, scA); err != nil {
			return 0, 0, err
		}
		ne, nb, drop, ok := img.zeroEntry(e, bm, scA, scB, unmap)
		if !ok {
			done = s.guest(i) - pos + int64(scA)<<img.scBits
			partial = min(n-done, cs-((pos+done)&(cs-1)))
			break
		}
		if ne == e && nb == bm {
			continue
		}
		if !dirty {
			if err := img.markDirtyLocked(co); err != nil {
				return 0, 0, err
			}
			dirty = true
		}
		s.set(i, ne, nb)
		if drop {
			rel.add(img, e, -1)
		}
	}
	s.close()
	if len(rel.ext) > 0 {
		// An in-place write mapped before the L2 update above may still
		// be writing into a cluster freed below.
		img.drainInPlaceLocked(co)
	}
	if err := img.releaseLocked(co, &rel); err != nil {
		return 0, 0, err
	}
	return done, partial, nil
}

// zeroEntry returns the entry and bitmap that make subclusters [scA, scB)
// of the cluster with entry e and bitmap bm read as zeros, and whether the
// host cluster (or compressed data) it referenced is dropped. ok is false
// for part of a compressed cluster, which has no subcluster bitmap: zeros
// must be written there instead.
func (img *image) zeroEntry(e, bm uint64, scA, scB int, unmap bool) (ne, nb uint64, drop, ok bool) {
	_, hasHost := img.hostCluster(e)
	whole := scA == 0 && scB == img.scPerCluster
	compressed := e&oflagCompressed != 0
	drop = compressed || (unmap && hasHost && whole)
	switch {
	case !whole && compressed:
		return 0, 0, false, false
	case img.h.Version < 3:
		// No backing file here (see zeroRange): unallocated reads as
		// zeros, and nothing is kept.
		return 0, 0, compressed || hasHost, true
	case img.scPerCluster > 1 && whole:
		ne = e
		if drop {
			ne = 0
		}
		return ne, uint64(0xffffffff) << 32, drop, true // every subcluster reads as zeros
	case img.scPerCluster > 1:
		m := scMask(scA, scB)
		return e, uint64(uint32(bm)&^m) | (bm>>32|uint64(m))<<32, drop, true
	default:
		if drop {
			return oflagZero, 0, true, true
		}
		return e | oflagZero, 0, false, true
	}
}
