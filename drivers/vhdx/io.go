package vhdx

import (
	"fmt"
	"syscall"

	"golang.org/x/sys/unix"

	"imgfuse/aio"
	"imgfuse/coroutine"
	"imgfuse/drivers"
	"imgfuse/drivers/blocktab"
)

func (d *Driver) inDisk(op string, off, n int64) error {
	return drivers.InDisk("vhdx", d.path, op, off, n, d.size, syscall.EINVAL)
}

func (d *Driver) writable(op string, off, n int64) error {
	if d.readOnly {
		return fmt.Errorf("vhdx: %s: %w", d.path, drivers.ErrReadOnly)
	}
	return drivers.InDisk("vhdx", d.path, op, off, n, d.size, drivers.ErrNoSpace)
}

// payloadIndex is the BAT index of payload block n: after every cr
// payload entries comes one sector bitmap entry.
func (d *Driver) payloadIndex(n int64) int64 { return n + n/d.cr }

// bitmapIndex is the BAT index of the sector bitmap entry of the chunk
// holding payload block n.
func (d *Driver) bitmapIndex(n int64) int64 { return n/d.cr*(d.cr+1) + d.cr }

// entryLocked returns BAT entry i.
func (d *Driver) entryLocked(co *coroutine.Co, i int64) (uint64, error) {
	d.mu.AssertHeld(co)
	if i < 0 || i >= d.entries {
		return 0, fmt.Errorf("vhdx: %s: BAT entry %d of %d: %w", d.path, i, d.entries, drivers.ErrCorrupt)
	}
	at := d.rg.bat.off + i*8
	t, err := d.bat.Get(co, at&^(sectorSize-1))
	if err != nil {
		return 0, fmt.Errorf("vhdx: %s: BAT: %w", d.path, err)
	}
	v := le.Uint64(t.Bytes()[at%sectorSize:])
	d.bat.Put(t)
	return v, nil
}

// block is what the BAT says of a payload block.
type block struct {
	state uint64
	off   int64 // file offset of a present (or partly present) block
}

// lookupLocked returns payload block n's state, checking where a present
// block lies.
func (d *Driver) lookupLocked(co *coroutine.Co, n int64) (block, error) {
	v, err := d.entryLocked(co, d.payloadIndex(n))
	if err != nil {
		return block{}, err
	}
	b := block{state: v & stateMask, off: int64(v & offMask)}
	switch b.state {
	case stateFull, statePartial:
		if b.state == statePartial && d.bitmaps == nil {
			return block{}, fmt.Errorf("vhdx: %s: block %d partly present in an image without a parent: %w", d.path, n, drivers.ErrCorrupt)
		}
		if err := d.checkPlace(b.off, d.blockSize); err != nil {
			return block{}, fmt.Errorf("vhdx: %s: block %d: %w", d.path, n, err)
		}
	case stateNotPresent, stateUndefined, stateZero, stateUnmapped, stateUnmapped95:
	default:
		return block{}, fmt.Errorf("vhdx: %s: block %d in state %d: %w", d.path, n, b.state, drivers.ErrCorrupt)
	}
	return b, nil
}

func (d *Driver) lookup(co *coroutine.Co, n int64) (block, error) {
	d.mu.Lock(co)
	defer d.mu.Unlock(co)
	return d.lookupLocked(co, n)
}

// fromParent reports whether a block in state st reads from the parent:
// not present, in a differencing image.
func (d *Driver) fromParent(st uint64) bool { return st == stateNotPresent && d.bitmaps != nil }

// readParent fills q with the disk below at off: the parent's bytes, zeros
// past its end or without a parent.
func (d *Driver) readParent(co *coroutine.Co, q []byte, off int64) error {
	if d.parent == nil {
		clear(q)
		return nil
	}
	n := max(min(int64(len(q)), d.parent.Size()-off), 0)
	clear(q[n:])
	if n > 0 {
		if _, err := d.parent.ReadAt(co, q[:n], off); err != nil {
			return err
		}
	}
	return nil
}

// ReadAt fills p from off; [off, off+len(p)) must lie inside the disk.
func (d *Driver) ReadAt(co *coroutine.Co, p []byte, off int64) (int, error) {
	if err := d.inDisk("read", off, int64(len(p))); err != nil {
		return 0, err
	}
	err := blocktab.Split(off, int64(len(p)), d.blockSize, func(pc blocktab.Piece) error {
		return d.readPiece(co, p[pc.Pos:pc.Pos+pc.Len], off+pc.Pos, pc)
	})
	if err != nil {
		return 0, err
	}
	return len(p), nil
}

func (d *Driver) readPiece(co *coroutine.Co, q []byte, off int64, pc blocktab.Piece) error {
	d.mu.Lock(co)
	b, err := d.lookupLocked(co, pc.Block)
	if err != nil || b.state != statePartial {
		d.mu.Unlock(co)
		switch {
		case err != nil:
			return err
		case b.state == stateFull:
			return d.readFile(co, q, b.off+pc.In)
		case d.fromParent(b.state):
			return d.readParent(co, q, off)
		}
		clear(q)
		return nil
	}
	runs, err := d.runsLocked(co, pc.Block, pc.In, pc.Len)
	d.mu.Unlock(co)
	if err != nil {
		return err
	}
	for _, r := range runs {
		s := q[r.pos : r.pos+r.n]
		if r.present {
			err = d.readFile(co, s, b.off+pc.In+r.pos)
		} else {
			err = d.readParent(co, s, off+r.pos)
		}
		if err != nil {
			return err
		}
	}
	return nil
}

// ReadDirect is the read fast path: a read inside one fully present
// block, aligned for aio, is one iocb straight into p at the block's place
// in the file (a fixed image's blocks, and every block written). Other
// reads — across blocks, unaligned, of other states, or through a dirty
// log's overlay — report ok=false having read nothing.
func (d *Driver) ReadDirect(co *coroutine.Co, p []byte, off int64) (n int, ok bool, err error) {
	if d.overlay != nil || d.inDisk("read", off, int64(len(p))) != nil || len(p) == 0 ||
		off/d.blockSize != (off+int64(len(p))-1)/d.blockSize {
		return 0, false, nil
	}
	b, err := d.lookup(co, off/d.blockSize)
	if err != nil || b.state != stateFull {
		return 0, false, nil
	}
	ok, err = d.f.PreadAlignedCo(co, p, b.off+off%d.blockSize)
	if !ok {
		return 0, false, nil
	}
	if err != nil {
		return 0, true, fmt.Errorf("vhdx: %w", err)
	}
	return len(p), true, nil
}

// run is a byte range of a request inside one block whose sectors all
// have one bitmap state.
type run struct {
	pos, n  int64
	present bool
}

// runsLocked splits [in, in+n) of partly present block blk into runs of
// sectors present in this file and sectors of the parent, from the
// chunk's sector bitmap (LSB first; a bit per logical sector).
func (d *Driver) runsLocked(co *coroutine.Co, blk, in, n int64) ([]run, error) {
	v, err := d.entryLocked(co, d.bitmapIndex(blk))
	if err != nil {
		return nil, err
	}
	if v&stateMask != stateFull {
		return nil, fmt.Errorf("vhdx: %s: block %d is partly present but its sector bitmap is not (entry %#x): %w", d.path, blk, v, drivers.ErrCorrupt)
	}
	bmOff := int64(v & offMask)
	if err := d.checkPlace(bmOff, mib); err != nil {
		return nil, fmt.Errorf("vhdx: %s: sector bitmap of block %d: %w", d.path, blk, err)
	}
	ss := d.md.logicalSS
	base := (blk % d.cr) * (d.blockSize / ss) // first bit of the block
	const pageBits = sectorSize * 8
	var runs []run
	for pos := int64(0); pos < n; {
		bit := base + (in+pos)/ss
		page := bit / pageBits
		t, err := d.bitmaps.Get(co, bmOff+page*sectorSize)
		if err != nil {
			return nil, fmt.Errorf("vhdx: %s: sector bitmap at %#x: %w", d.path, bmOff, err)
		}
		bm := blocktab.Bitmap{B: t.Bytes()}
		k := bit % pageBits
		lastBit := base + (in+n-1)/ss
		span := min(lastBit-bit+1, pageBits-k)
		cnt := bm.Run(k, span)
		present := bm.Test(k)
		d.bitmaps.Put(t)
		end := min((bit+cnt-base)*ss-in, n)
		if len(runs) > 0 && runs[len(runs)-1].present == present {
			runs[len(runs)-1].n += end - pos
		} else {
			runs = append(runs, run{pos: pos, n: end - pos, present: present})
		}
		pos = end
	}
	return runs, nil
}

// beginWrite gives the headers a new DataWriteGuid before the first write
// of this open changes what the disk reads, as the spec requires (a
// child's parent_linkage then no longer names this image).
func (d *Driver) beginWrite(co *coroutine.Co) error {
	d.mu.Lock(co)
	defer d.mu.Unlock(co)
	if d.dataWritten {
		return nil
	}
	g, err := newGUID()
	if err != nil {
		return fmt.Errorf("vhdx: %w", err)
	}
	if err := d.updateHeadersLocked(co, func(h []byte) { copy(h[hDataWrite:], g[:]) }); err != nil {
		return err
	}
	d.dataWritten = true
	return nil
}

// WriteAt writes p at off, inside the disk.
func (d *Driver) WriteAt(co *coroutine.Co, p []byte, off int64) (int, error) {
	if err := d.writable("write", off, int64(len(p))); err != nil {
		return 0, err
	}
	if err := d.beginWrite(co); err != nil {
		return 0, err
	}
	err := blocktab.Split(off, int64(len(p)), d.blockSize, func(pc blocktab.Piece) error {
		return d.writePiece(co, p[pc.Pos:pc.Pos+pc.Len], off+pc.Pos, pc)
	})
	if err != nil {
		return 0, err
	}
	return len(p), nil
}

// writePiece writes q, the part of a write inside block pc.Block: in place
// into a fully present block, else through allocate.
func (d *Driver) writePiece(co *coroutine.Co, q []byte, off int64, pc blocktab.Piece) error {
	b, err := d.lookup(co, pc.Block)
	if err != nil {
		return err
	}
	if b.state == stateFull {
		return d.writeFile(co, q, b.off+pc.In)
	}
	return d.allocate(co, q, off, pc)
}

func (d *Driver) writeFile(co *coroutine.Co, q []byte, at int64) error {
	if err := d.f.PwriteCo(co, q, at); err != nil {
		return fmt.Errorf("vhdx: %w", err)
	}
	return nil
}

// allocChunk is how much of a block is built and written at once.
const allocChunk = 1 << 20

// allocate makes block pc.Block fully present with q in it, in an order
// that never lets the BAT name bytes that are not all written:
//
//   - a block not present in a differencing image: a new block at
//     nextFree holding the parent's bytes around q; any other absent
//     block (not present, zero, unmapped, undefined): a new block at
//     nextFree, the file extended over it (a hole, reading zeros) and q
//     written;
//   - a partly present block: in place, its sectors the bitmap leaves to
//     the parent filled with the parent's bytes (until the BAT entry
//     changes they are not read), q written;
//
// then fdatasync, then the BAT entry (FULLY_PRESENT at the block) through
// the log. A crash before the entry leaves the BAT as it was: the new
// block past the old end is never read (the next open allocates past it:
// a leak, as QEMU's drivers may leak).
func (d *Driver) allocate(co *coroutine.Co, q []byte, off int64, pc blocktab.Piece) error {
	d.allocMu.Lock(co)
	defer d.allocMu.Unlock(co)
	d.mu.Lock(co)
	b, err := d.lookupLocked(co, pc.Block)
	at := d.nextFree
	d.mu.Unlock(co)
	switch {
	case err != nil:
		return err
	case b.state == stateFull: // another writer allocated it meanwhile
		return d.writeFile(co, q, b.off+pc.In)
	case b.state == statePartial:
		at = b.off
	case at+d.blockSize > 1<<52:
		return fmt.Errorf("vhdx: %s: no room for a block at %#x: %w", d.path, at, drivers.ErrNoSpace)
	}
	blockOff := off - pc.In // disk offset of the block
	switch {
	case b.state == statePartial || d.fromParent(b.state):
		if err := d.fillFromBelow(co, b, at, blockOff, pc); err != nil {
			return err
		}
	default:
		size, err := d.f.Size()
		if err != nil {
			return fmt.Errorf("vhdx: %w", err)
		}
		if size > at {
			// Not past the end: write the zeros (the file holds
			// what a crashed allocation left there).
			if err := blocktab.WriteZeros(at, d.blockSize, func(z []byte, o int64) error { return d.writeFile(co, z, o) }); err != nil {
				return err
			}
		} else if err := d.f.TruncateCo(co, at+d.blockSize); err != nil {
			return fmt.Errorf("vhdx: %w", err)
		}
	}
	if err := d.writeFile(co, q, at+pc.In); err != nil {
		return err
	}
	if err := d.f.FdatasyncCo(co); err != nil {
		return fmt.Errorf("vhdx: %w", err)
	}
	d.mu.Lock(co)
	defer d.mu.Unlock(co)
	if err := d.setEntriesLocked(co, []entryUpdate{{d.payloadIndex(pc.Block), uint64(at) | stateFull}}); err != nil {
		return err
	}
	if b.state != statePartial {
		d.nextFree = max(d.nextFree, at+d.blockSize)
	}
	return nil
}

// fillFromBelow writes into the block at at the bytes the disk reads
// there from the parent: all of them for a block not present, those of
// the sectors the bitmap leaves to the parent for a partly present one.
// The part pc covers is left to the caller.
func (d *Driver) fillFromBelow(co *coroutine.Co, b block, at, blockOff int64, pc blocktab.Piece) error {
	buf := aio.AlignedBuffer(int(min(d.blockSize, allocChunk)))
	for c := int64(0); c < d.blockSize; c += allocChunk {
		n := min(allocChunk, d.blockSize-c)
		var runs []run
		if b.state == statePartial {
			d.mu.Lock(co)
			var err error
			runs, err = d.runsLocked(co, pc.Block, c, n)
			d.mu.Unlock(co)
			if err != nil {
				return err
			}
		} else {
			runs = []run{{0, n, false}}
		}
		for _, r := range runs {
			if r.present {
				continue
			}
			s := buf[:r.n]
			if blockOff+c+r.pos < d.size {
				if err := d.readParent(co, s, blockOff+c+r.pos); err != nil {
					return err
				}
			} else {
				clear(s)
			}
			if err := d.writeFile(co, s, at+c+r.pos); err != nil {
				return err
			}
		}
	}
	return nil
}

// entryUpdate is a new value for BAT entry i.
type entryUpdate struct {
	i int64
	v uint64
}

// setEntriesLocked writes BAT entries through the log, as the spec
// requires of metadata: the changed 4 KiB BAT sectors (the whole sector,
// as QEMU logs it) go into a log entry, which is written and synced, then
// applied to the BAT and synced; then the cache takes the new sectors.
func (d *Driver) setEntriesLocked(co *coroutine.Co, ups []entryUpdate) error {
	d.mu.AssertHeld(co)
	var ws []sectorWrite
	idx := map[int64]int{}
	for _, u := range ups {
		if u.i < 0 || u.i >= d.entries {
			return fmt.Errorf("vhdx: %s: BAT entry %d of %d: %w", d.path, u.i, d.entries, drivers.ErrCorrupt)
		}
		at := d.rg.bat.off + u.i*8
		sec := at &^ (sectorSize - 1)
		k, ok := idx[sec]
		if !ok {
			t, err := d.bat.Get(co, sec)
			if err != nil {
				return fmt.Errorf("vhdx: %s: BAT: %w", d.path, err)
			}
			data := aio.AlignedBuffer(sectorSize)
			copy(data, t.Bytes())
			d.bat.Put(t)
			k = len(ws)
			idx[sec] = k
			ws = append(ws, sectorWrite{off: sec, data: data})
		}
		le.PutUint64(ws[k].data[at%sectorSize:], u.v)
	}
	for len(ws) > 0 {
		n := min(len(ws), maxEntrySectors)
		if err := d.logWriteLocked(co, ws[:n]); err != nil {
			return err
		}
		for _, w := range ws[:n] {
			t, err := d.bat.Get(co, w.off)
			if err != nil {
				return fmt.Errorf("vhdx: %s: BAT: %w", d.path, err)
			}
			copy(t.Bytes(), w.data)
			d.bat.Put(t)
		}
		ws = ws[n:]
	}
	return nil
}

// logWriteLocked writes ws through the log: the headers get a log GUID
// if they have none (a header update), the entry is written at the log's
// write position (wrapping) and synced, the sectors written in place and
// synced. Each entry is its own sequence (its Tail is itself): everything
// before it is in place when it is written.
func (d *Driver) logWriteLocked(co *coroutine.Co, ws []sectorWrite) error {
	d.mu.AssertHeld(co)
	if d.logLen < sectorSize*int64(2+len(ws)) {
		return fmt.Errorf("vhdx: %s: a log of %d bytes cannot hold an entry of %d sectors: %w", d.path, d.logLen, len(ws), drivers.ErrUnsupported)
	}
	if d.logGUID.zero() {
		g, err := newGUID()
		if err != nil {
			return fmt.Errorf("vhdx: %w", err)
		}
		if err := d.updateHeadersLocked(co, func(h []byte) { copy(h[hLogGUID:], g[:]) }); err != nil {
			return err
		}
		d.logGUID = g
	}
	size, err := d.f.Size()
	if err != nil {
		return fmt.Errorf("vhdx: %w", err)
	}
	e := buildEntry(ws, nil, d.logGUID, d.logSeq, d.logPos, size, size)
	for s := 0; s < len(e); s += sectorSize {
		pos := (d.logPos + int64(s)) % d.logLen
		if err := d.writeFile(co, e[s:s+sectorSize], d.logOff+pos); err != nil {
			return err
		}
	}
	if err := d.f.FdatasyncCo(co); err != nil {
		return fmt.Errorf("vhdx: %w", err)
	}
	d.logPos = (d.logPos + int64(len(e))) % d.logLen
	d.logSeq++
	for _, w := range ws {
		if err := d.writeFile(co, w.data, w.off); err != nil {
			return err
		}
	}
	if err := d.f.FdatasyncCo(co); err != nil {
		return fmt.Errorf("vhdx: %w", err)
	}
	return nil
}

// Flush makes every write durable: entries are applied when written, so
// an fdatasync is all, and then the headers drop the log GUID (an empty
// log: nothing left to replay; QEMU clears it after every entry).
func (d *Driver) Flush(co *coroutine.Co) error {
	if d.readOnly {
		return nil
	}
	if err := d.f.FdatasyncCo(co); err != nil {
		return fmt.Errorf("vhdx: %w", err)
	}
	d.mu.Lock(co)
	defer d.mu.Unlock(co)
	if d.logGUID.zero() {
		return nil
	}
	if err := d.updateHeadersLocked(co, func(h []byte) { clear(h[hLogGUID : hLogGUID+16]) }); err != nil {
		return err
	}
	d.logGUID = guid{}
	return nil
}

// Discard makes [off, off+n) read as zeros, whole blocks UNMAPPED (ZERO
// in a differencing image, where unmapped could let the parent show).
func (d *Driver) Discard(co *coroutine.Co, off, n int64) error {
	return d.zero(co, off, n, true, true)
}

// WriteZeroes makes [off, off+n) read as zeros: whole blocks become ZERO
// (their space punched out of the file when unmap is set), the rest is
// written zeros where it does not read as zeros already. A fixed image
// (LeaveBlockAllocated) keeps its blocks and their states: a present
// block's bytes are zeroed in the file.
func (d *Driver) WriteZeroes(co *coroutine.Co, off, n int64, unmap bool) error {
	return d.zero(co, off, n, unmap, false)
}

// zeroBatch bounds the whole blocks one log write changes.
const zeroBatch = 4096

func (d *Driver) zero(co *coroutine.Co, off, n int64, unmap, discard bool) error {
	if err := d.writable("zero", off, n); err != nil {
		return err
	}
	if n == 0 {
		return nil
	}
	if err := d.beginWrite(co); err != nil {
		return err
	}
	newState := uint64(stateZero)
	if discard && d.bitmaps == nil {
		newState = stateUnmapped
	}
	var whole []int64
	flush := func() error {
		if len(whole) == 0 {
			return nil
		}
		err := d.unmapBlocks(co, whole, newState, unmap)
		whole = whole[:0]
		return err
	}
	err := blocktab.Split(off, n, d.blockSize, func(pc blocktab.Piece) error {
		b, err := d.lookup(co, pc.Block)
		if err != nil {
			return err
		}
		wholeBlock := pc.In == 0 && (pc.Len == d.blockSize || off+pc.Pos+pc.Len == d.size)
		switch {
		case b.state == stateFull && d.md.leaveAllocated:
			return d.zeroInFile(co, b.off+pc.In, pc.Len, unmap)
		case d.md.leaveAllocated && b.state != statePartial && !d.fromParent(b.state):
			return nil // reads as zeros, and a fixed image's states stay
		case wholeBlock:
			if b.state != newState || b.off != 0 {
				whole = append(whole, pc.Block)
			}
			if len(whole) >= zeroBatch {
				return flush()
			}
			return nil
		case b.state == stateFull || b.state == statePartial || d.fromParent(b.state):
			return blocktab.WriteZeros(off+pc.Pos, pc.Len, func(z []byte, at int64) error {
				return d.writePiece(co, z, at, blocktab.Piece{Block: pc.Block, In: at - pc.Block*d.blockSize, Len: int64(len(z))})
			})
		}
		return nil // reads as zeros already
	})
	if err != nil {
		return err
	}
	return flush()
}

// zeroInFile zeroes [at, at+n) of the file: a punched hole (unmap) or a
// zeroed range, else written zeros.
func (d *Driver) zeroInFile(co *coroutine.Co, at, n int64, unmap bool) error {
	mode := uint32(unix.FALLOC_FL_ZERO_RANGE | unix.FALLOC_FL_KEEP_SIZE)
	if unmap {
		mode = unix.FALLOC_FL_PUNCH_HOLE | unix.FALLOC_FL_KEEP_SIZE
	}
	if err := d.f.FallocateCo(co, mode, at, n); err == nil {
		return nil
	}
	return blocktab.WriteZeros(at, n, func(z []byte, o int64) error { return d.writeFile(co, z, o) })
}

// unmapBlocks sets the payload entries of blocks to state (offset 0)
// through one log write, under allocMu so no allocation of them is in
// flight; then, if unmap, punches the blocks they named out of the file
// (space a crash before the punch leaks, as QEMU's drivers may leak; the
// space is never reused).
func (d *Driver) unmapBlocks(co *coroutine.Co, blocks []int64, state uint64, unmap bool) error {
	d.allocMu.Lock(co)
	defer d.allocMu.Unlock(co)
	d.mu.Lock(co)
	ups := make([]entryUpdate, 0, len(blocks))
	var freed []int64
	for _, n := range blocks {
		b, err := d.lookupLocked(co, n)
		if err != nil {
			d.mu.Unlock(co)
			return err
		}
		if b.state == stateFull || b.state == statePartial {
			freed = append(freed, b.off)
		}
		ups = append(ups, entryUpdate{d.payloadIndex(n), state})
	}
	err := d.setEntriesLocked(co, ups)
	d.mu.Unlock(co)
	if err != nil || !unmap {
		return err
	}
	for _, at := range freed {
		_ = d.f.FallocateCo(co, unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, at, d.blockSize)
	}
	return nil
}

// statusRun bounds how many blocks one block status answer covers.
const statusRun = 1024

// LayerStatus implements drivers.LayerMapper: a fully present block is
// data at its offset in the file; in a partly present one the bitmap's
// runs decide; a block not present in a differencing image is the
// parent's (neither data nor zero); any other state reads as zeros.
// (qemu-img map shows one data extent for a whole VHDX disk: QEMU's driver
// has no block status.)
func (d *Driver) LayerStatus(co *coroutine.Co, off int64) (drivers.LayerStatus, error) {
	if off < 0 || off >= d.size {
		return drivers.LayerStatus{}, fmt.Errorf("vhdx: %s: block status at %#x outside the disk (size %#x): %w",
			d.path, off, d.size, syscall.EINVAL)
	}
	d.mu.Lock(co)
	defer d.mu.Unlock(co)
	n, in := off/d.blockSize, off%d.blockSize
	b, err := d.lookupLocked(co, n)
	if err != nil {
		return drivers.LayerStatus{}, err
	}
	st := drivers.LayerStatus{Off: off}
	switch b.state {
	case statePartial:
		runs, err := d.runsLocked(co, n, in, min(d.blockSize-in, d.size-off))
		if err != nil {
			return drivers.LayerStatus{}, err
		}
		st.Len = runs[0].n
		if runs[0].present {
			st.Data, st.HasOffset, st.Offset = true, true, b.off+in
		}
		return st, nil
	case stateFull:
		st.Len = min(d.blockSize-in, d.size-off)
		st.Data, st.HasOffset, st.Offset = true, true, b.off+in
		return st, nil
	}
	parentish := d.fromParent(b.state)
	end := (n + 1) * d.blockSize
	for k := int64(1); k < statusRun && end < d.size; k++ {
		nb, err := d.lookupLocked(co, n+k)
		if err != nil || nb.state == stateFull || nb.state == statePartial || d.fromParent(nb.state) != parentish {
			break
		}
		end += d.blockSize
	}
	st.Len = min(end, d.size) - off
	st.Zero = !parentish
	return st, nil
}

// BlockStatus describes the disk from off, down the chain.
func (d *Driver) BlockStatus(co *coroutine.Co, off int64) (drivers.Extent, error) {
	st, err := d.LayerStatus(co, off)
	if err != nil {
		return drivers.Extent{}, err
	}
	return drivers.LayerBlockStatus(co, st, off, d.parent)
}

// Truncate refuses any change of size (QEMU's vhdx cannot resize either);
// the current size is accepted.
func (d *Driver) Truncate(co *coroutine.Co, size int64) error {
	if size == d.size {
		return nil
	}
	if d.readOnly {
		return fmt.Errorf("vhdx: %s: %w", d.path, drivers.ErrReadOnly)
	}
	return fmt.Errorf("vhdx: %s: resizing VHDX images is not supported: %w", d.path, drivers.ErrUnsupported)
}
