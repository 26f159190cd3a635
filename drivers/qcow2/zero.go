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
func (img *image) Discard(co *coroutine.Co, off, n int64) error {
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
func (img *image) WriteZeroes(co *coroutine.Co, off, n int64, unmap bool) error {
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
		return fmt.Errorf("qcow2: %s: %s of %d bytes at %#x: invalid range", img.path, op, n, off)
	}
	if n == 0 {
		return nil
	}
	size := img.size.Load()
	if end > size {
		return fmt.Errorf("qcow2: %s: %s up to %#x past the end of the %d-byte disk: %w",
			img.path, op, end, size, drivers.ErrNoSpace)
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
func (img *image) zeroStep(co *coroutine.Co, pos, n int64, unmap bool) (done int64, err error) {
	cs := img.clusterSize
	inCluster := pos & (cs - 1)
	l1Index, l2Index, n := img.l2Slot(pos, n)

	img.mu.Lock(co)
	defer func() {
		err = img.signalCorruptionLocked(co, err)
		img.mu.Unlock(co)
	}()
	if img.broken != nil {
		return 0, img.broken
	}
	for {
		var waited bool
		if n, waited = img.waitForAllocsLocked(co, pos, n); !waited {
			break
		}
	}
	end := pos + n
	old, err := img.l2OffsetLocked(l1Index)
	if err != nil {
		return 0, err
	}
	// Nothing below reads through an unallocated L2 table: it already
	// reads as zeros.
	if old == 0 && (img.backing == nil || pos-inCluster >= img.backingSize) {
		return n, nil
	}
	l2Off, err := img.l2TableForWriteLocked(co, l1Index)
	if err != nil {
		return 0, err
	}
	t, err := img.l2.Get(co, l2Off)
	if err != nil {
		return 0, fmt.Errorf("qcow2: %s: L2 table at %#x: %w", img.path, l2Off, err)
	}
	tb := t.Bytes()
	var (
		frees           [][2]int64
		dirty           bool
		compressedFreed bool
	)
	done = n
	nbClusters := (inCluster + n + cs - 1) >> img.clusterBits
	for i := int64(0); i < nbClusters; i++ {
		idx := l2Index + i
		c := pos - inCluster + i*cs
		e, bm := img.l2Entry(tb, idx)
		scA, scB := img.touched(c, pos, end)
		if _, _, verr := img.entryRange(e, bm, scA); verr != nil {
			img.l2.Put(t)
			return 0, fmt.Errorf("qcow2: %s: L2 table at %#x, entry %d (guest offset %#x): %w",
				img.path, l2Off, idx, c, verr)
		}
		host, hasHost := img.hostCluster(e)
		whole := scA == 0 && scB == img.scPerCluster
		compressed := e&oflagCompressed != 0
		drop := compressed || (unmap && hasHost && whole)
		var ne, nb uint64
		switch {
		case !whole && compressed:
			// A compressed cluster has no subcluster bitmap: write
			// zeros into this part of it instead (after this table).
			done = c - pos + int64(scA)<<img.scBits
			i = nbClusters
			continue
		case img.h.Version < 3:
			// No backing file here (see zeroRange): unallocated
			// reads as zeros.
			ne = 0
		case img.scPerCluster > 1 && whole:
			ne = e
			if drop {
				ne = 0
			}
			nb = uint64(0xffffffff) << 32 // every subcluster reads as zeros
		case img.scPerCluster > 1:
			m := scMask(scA, scB)
			nb = uint64(uint32(bm)&^m) | (bm>>32|uint64(m))<<32
			ne = e
		default:
			ne = e | oflagZero
			if drop {
				ne = oflagZero
			}
		}
		if img.h.Version < 3 {
			drop = compressed || hasHost
		}
		if ne == e && nb == bm {
			continue
		}
		if !dirty {
			if err := img.markDirtyLocked(co); err != nil {
				img.l2.Put(t)
				return 0, err
			}
			dirty = true
		}
		img.setL2Entry(tb, idx, ne, nb)
		if !drop {
			continue
		}
		if compressed {
			coff, csize := img.compressedRange(e)
			frees = append(frees, [2]int64{coff, csize})
			compressedFreed = true
		} else if hasHost {
			frees = append(frees, [2]int64{host, cs})
		}
	}
	if dirty {
		img.l2.MarkDirty(t)
	}
	img.l2.Put(t)
	if compressedFreed {
		img.zcacheDrop()
	}
	if len(frees) > 0 {
		// An in-place write mapped before the L2 update above may still
		// be writing into a cluster freed below.
		img.drainInPlaceLocked(co)
	}
	for _, f := range frees {
		if err := img.rc.updateLocked(co, f[0], f[1], -1); err != nil {
			return 0, fmt.Errorf("qcow2: %s: freeing host cluster %#x: %w", img.path, f[0], err)
		}
	}
	if done < n {
		// The partial compressed cluster: zeros through the write path,
		// without the lock (deferred unlock runs first).
		img.mu.Unlock(co)
		k := min(n-done, cs-((pos+done)&(cs-1)))
		err = img.writeZeros(co, pos+done, k)
		img.mu.Lock(co)
		if err != nil {
			return 0, err
		}
		done += k
	}
	return done, nil
}
