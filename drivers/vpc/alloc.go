package vpc

import (
	"fmt"

	"imgfuse/aio"
	"imgfuse/coroutine"
	"imgfuse/drivers"
	"imgfuse/drivers/blocktab"
)

// allocChunk is how much of a new block is built and written at once, so
// that a large block size costs no more memory than this.
const allocChunk = 1 << 20

// writePiece writes q, the part of a write inside block pc.Block, which
// starts at disk offset off.
//
//   - An allocated block of a dynamic disk is written in place.
//   - An unallocated block is allocated (allocate) with q in it.
//   - An allocated block of a differencing disk is written in place where
//     its bitmap marks every touched sector; otherwise setSectors merges
//     and marks them.
func (d *Driver) writePiece(co *coroutine.Co, q []byte, off int64, pc blocktab.Piece) error {
	d.mu.Lock(co)
	start, err := d.lookupLocked(co, pc.Block)
	inPlace := err == nil && start >= 0
	if inPlace && d.bitmaps != nil {
		var runs []run
		runs, err = d.runsLocked(co, start, pc.In, pc.Len)
		inPlace = err == nil && len(runs) == 1 && runs[0].present
	}
	d.mu.Unlock(co)
	switch {
	case err != nil:
		return err
	case inPlace:
		return d.writeData(co, q, start+d.bmSize+pc.In)
	case start >= 0:
		return d.setSectors(co, q, off, start, pc)
	}
	return d.allocate(co, q, off, pc)
}

func (d *Driver) writeData(co *coroutine.Co, q []byte, at int64) error {
	if err := d.f.PwriteCo(co, q, at); err != nil {
		return fmt.Errorf("vpc: %w", err)
	}
	return nil
}

// allocate gives block pc.Block its place in the file and writes q into
// it, in an order that never lets the BAT name a block whose bytes are
// not all written:
//
//  1. the whole block at nextFree: an all-ones bitmap, then the data —
//     q, with zeros (dynamic) or the parent's bytes (differencing)
//     around it — so no byte of the block is left to whatever the file
//     held there (a block a crash left unpublished);
//  2. the footer at the new end of the file;
//  3. fdatasync;
//  4. the BAT entry.
//
// QEMU writes the bitmap, the footer and the BAT entry, then the data,
// with no flush: a crash can leave the BAT naming a block whose data never
// arrived. A crash here before 4 leaves the BAT as it was (the block and
// footer past the old end are never read; the next allocation goes past
// them). If another writer allocated the block meanwhile, q is written
// through writePiece again.
func (d *Driver) allocate(co *coroutine.Co, q []byte, off int64, pc blocktab.Piece) error {
	d.allocMu.Lock(co)
	defer d.allocMu.Unlock(co)
	d.mu.Lock(co)
	start, err := d.lookupLocked(co, pc.Block)
	at := d.nextFree
	d.mu.Unlock(co)
	if err != nil {
		return err
	}
	if start >= 0 {
		return d.writePiece(co, q, off, pc)
	}
	if at/512 >= unallocated {
		return fmt.Errorf("vpc: %s: no room for a block at %#x (BAT entries are 32-bit sectors): %w", d.path, at, drivers.ErrNoSpace)
	}
	buf := aio.AlignedBuffer(int(max(min(d.blockSize, allocChunk), d.bmSize)))
	bm := buf[:d.bmSize]
	for i := range bm {
		bm[i] = 0xff
	}
	if err := d.writeData(co, bm, at); err != nil {
		return err
	}
	blockOff := off - pc.In // disk offset of the block
	for c := int64(0); c < d.blockSize; c += allocChunk {
		n := min(allocChunk, d.blockSize-c)
		chunk := buf[:n]
		if d.bitmaps != nil && blockOff+c < d.size {
			if err := d.readParent(co, chunk, blockOff+c); err != nil {
				return err
			}
		} else {
			clear(chunk)
		}
		// The part of q inside this chunk.
		lo, hi := max(pc.In, c), min(pc.In+pc.Len, c+n)
		if lo < hi {
			copy(chunk[lo-c:hi-c], q[lo-pc.In:hi-pc.In])
		}
		if err := d.writeData(co, chunk, at+d.bmSize+c); err != nil {
			return err
		}
	}
	end := at + d.bmSize + d.blockSize
	if err := d.writeData(co, d.ft.raw, end); err != nil {
		return err
	}
	if err := d.f.FdatasyncCo(co); err != nil {
		return fmt.Errorf("vpc: %w", err)
	}
	d.mu.Lock(co)
	defer d.mu.Unlock(co)
	if err := d.bat.SetLocked(co, pc.Block, uint32(at/512)); err != nil {
		return fmt.Errorf("vpc: %s: BAT entry %d: %w", d.path, pc.Block, err)
	}
	d.nextFree = end
	return nil
}

// setSectors writes q into an allocated block of a differencing disk
// whose bitmap leaves some touched sector to the parent: the sectors q
// only partly covers are first filled with what the disk reads there
// (the parent's bytes), the whole sectors written, synced, and then their
// bits set and the bitmap written. Until the bitmap is written the
// sectors read from the parent, as before the write: a crash leaves
// either.
func (d *Driver) setSectors(co *coroutine.Co, q []byte, off, start int64, pc blocktab.Piece) error {
	d.cowMu.Lock(co)
	defer d.cowMu.Unlock(co)
	first, last := pc.In/512*512, (pc.In+pc.Len+511)/512*512
	buf := aio.AlignedBuffer(int(last - first))
	blockOff := off - pc.In
	if head := pc.In - first; head > 0 {
		if _, err := d.ReadAt(co, buf[:512], blockOff+first); err != nil {
			return err
		}
	}
	if tail := last - (pc.In + pc.Len); tail > 0 && last-512 >= first {
		sec := blockOff + last - 512
		if sec+512 <= d.size {
			if _, err := d.ReadAt(co, buf[len(buf)-512:], sec); err != nil {
				return err
			}
		} else {
			n := d.size - sec
			if _, err := d.ReadAt(co, buf[len(buf)-512:len(buf)-512+int(n)], sec); err != nil {
				return err
			}
		}
	}
	copy(buf[pc.In-first:], q)
	if err := d.writeData(co, buf, start+d.bmSize+first); err != nil {
		return err
	}
	if err := d.f.FdatasyncCo(co); err != nil {
		return fmt.Errorf("vpc: %w", err)
	}
	d.mu.Lock(co)
	defer d.mu.Unlock(co)
	return d.setBitsLocked(co, start, first/512, (last-first)/512)
}

// setBitsLocked sets bits [k, k+n) of the bitmap at start and writes the
// bitmap's changed sectors.
func (d *Driver) setBitsLocked(co *coroutine.Co, start, k, n int64) error {
	t, err := d.bitmaps.Get(co, start)
	if err != nil {
		return fmt.Errorf("vpc: %s: bitmap at %#x: %w", d.path, start, err)
	}
	defer d.bitmaps.Put(t)
	b := t.Bytes()
	old := append([]byte(nil), b...)
	blocktab.Bitmap{B: b, MSBFirst: true}.Set(k, n)
	lo, hi := k/8/512*512, ((k+n-1)/8/512+1)*512
	if err := d.writeData(co, b[lo:hi], start+lo); err != nil {
		copy(b, old)
		return err
	}
	return nil
}
