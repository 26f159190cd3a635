package vpc

import (
	"fmt"
	"syscall"

	"golang.org/x/sys/unix"

	"imgfuse/coroutine"
	"imgfuse/drivers"
	"imgfuse/drivers/blocktab"
)

func (d *Driver) inDisk(op string, off, n int64) error {
	return drivers.InDisk("vpc", d.path, op, off, n, d.size, syscall.EINVAL)
}

func (d *Driver) writable(op string, off, n int64) error {
	if d.readOnly {
		return fmt.Errorf("vpc: %s: %w", d.path, drivers.ErrReadOnly)
	}
	return drivers.InDisk("vpc", d.path, op, off, n, d.size, drivers.ErrNoSpace)
}

// lookupLocked returns the file offset of block b's bitmap, or -1 if the
// block is not allocated.
func (d *Driver) lookupLocked(co *coroutine.Co, b int64) (int64, error) {
	v, err := d.bat.GetLocked(co, b)
	if err != nil {
		return 0, fmt.Errorf("vpc: %s: BAT: %w", d.path, err)
	}
	if v == unallocated {
		return -1, nil
	}
	start := int64(v) * 512
	if start < d.metaEnd {
		return 0, fmt.Errorf("vpc: %s: block %d at %#x overlaps the headers or the BAT: %w", d.path, b, start, drivers.ErrCorrupt)
	}
	return start, nil
}

func (d *Driver) lookup(co *coroutine.Co, b int64) (int64, error) {
	d.mu.Lock(co)
	defer d.mu.Unlock(co)
	return d.lookupLocked(co, b)
}

// readParent fills q with the disk below at off: the parent's bytes, zeros
// past its end or without a parent.
func (d *Driver) readParent(co *coroutine.Co, q []byte, off int64) error {
	if d.parent == nil {
		clear(q)
		return nil
	}
	psize := d.parent.Size()
	n := max(min(int64(len(q)), psize-off), 0)
	clear(q[n:])
	if n > 0 {
		if _, err := d.parent.ReadAt(co, q[:n], off); err != nil {
			return err
		}
	}
	return nil
}

// ReadAt fills p from off; [off, off+len(p)) must lie inside the disk.
// A fixed disk is read at the same offset in the file. A dynamic disk
// reads an allocated block from the file (whatever its bitmap says, as
// QEMU does) and zeros elsewhere; a differencing disk reads the sectors
// its bitmap marks from the file and the others from the parent.
func (d *Driver) ReadAt(co *coroutine.Co, p []byte, off int64) (int, error) {
	if err := d.inDisk("read", off, int64(len(p))); err != nil {
		return 0, err
	}
	if d.hdr == nil {
		if err := d.f.PreadCo(co, p, off); err != nil {
			return 0, fmt.Errorf("vpc: %w", err)
		}
		return len(p), nil
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
	start, err := d.lookupLocked(co, pc.Block)
	if err != nil || start < 0 || d.bitmaps == nil {
		d.mu.Unlock(co)
		switch {
		case err != nil:
			return err
		case start < 0 && d.bitmaps != nil:
			return d.readParent(co, q, off)
		case start < 0:
			clear(q)
			return nil
		}
		return d.readData(co, q, start+d.bmSize+pc.In)
	}
	// Differencing: copy the runs out of the bitmap under mu, then read
	// without it.
	runs, err := d.runsLocked(co, start, pc.In, pc.Len)
	d.mu.Unlock(co)
	if err != nil {
		return err
	}
	for _, r := range runs {
		s := q[r.pos : r.pos+r.n]
		if r.present {
			err = d.readData(co, s, start+d.bmSize+pc.In+r.pos)
		} else {
			err = d.readParent(co, s, off+r.pos)
		}
		if err != nil {
			return err
		}
	}
	return nil
}

func (d *Driver) readData(co *coroutine.Co, q []byte, at int64) error {
	if err := d.f.PreadCo(co, q, at); err != nil {
		return fmt.Errorf("vpc: %w", err)
	}
	return nil
}

// run is a byte range of a request inside one block whose sectors all
// have one bitmap state.
type run struct {
	pos, n  int64
	present bool
}

// runsLocked splits [in, in+n) of the block whose bitmap is at start into
// runs of present and absent sectors.
func (d *Driver) runsLocked(co *coroutine.Co, start, in, n int64) ([]run, error) {
	t, err := d.bitmaps.Get(co, start)
	if err != nil {
		return nil, fmt.Errorf("vpc: %s: bitmap at %#x: %w", d.path, start, err)
	}
	defer d.bitmaps.Put(t)
	bm := blocktab.Bitmap{B: t.Bytes(), MSBFirst: true}
	var runs []run
	for pos := int64(0); pos < n; {
		s := (in + pos) / 512
		last := (in + n - 1) / 512
		k := bm.Run(s, last-s+1)
		end := min((s+k)*512-in, n)
		runs = append(runs, run{pos: pos, n: end - pos, present: bm.Test(s)})
		pos = end
	}
	return runs, nil
}

// ReadDirect is the read fast path of a fixed disk, whose data is the
// file's, at the same offsets: one iocb straight into p when aio can
// take it as it is. Other disks, and reads it cannot take, report
// ok=false having done nothing.
func (d *Driver) ReadDirect(co *coroutine.Co, p []byte, off int64) (n int, ok bool, err error) {
	if d.hdr != nil || d.inDisk("read", off, int64(len(p))) != nil {
		return 0, false, nil
	}
	ok, err = d.f.PreadAlignedCo(co, p, off)
	if !ok {
		return 0, false, nil
	}
	if err != nil {
		return 0, true, fmt.Errorf("vpc: %w", err)
	}
	return len(p), true, nil
}

// WriteAt writes p at off, inside the disk (alloc.go for the dynamic
// and differencing cases).
func (d *Driver) WriteAt(co *coroutine.Co, p []byte, off int64) (int, error) {
	if err := d.writable("write", off, int64(len(p))); err != nil {
		return 0, err
	}
	if d.hdr == nil {
		if err := d.f.PwriteCo(co, p, off); err != nil {
			return 0, fmt.Errorf("vpc: %w", err)
		}
		return len(p), nil
	}
	err := blocktab.Split(off, int64(len(p)), d.blockSize, func(pc blocktab.Piece) error {
		return d.writePiece(co, p[pc.Pos:pc.Pos+pc.Len], off+pc.Pos, pc)
	})
	if err != nil {
		return 0, err
	}
	return len(p), nil
}

// Flush makes every write durable: BAT entries and bitmaps are written
// through, so an fdatasync is all.
func (d *Driver) Flush(co *coroutine.Co) error {
	if d.readOnly {
		return nil
	}
	if err := d.f.FdatasyncCo(co); err != nil {
		return fmt.Errorf("vpc: %w", err)
	}
	return nil
}

// Discard makes [off, off+n) read as zeros: VHD cannot record a discard
// (QEMU's vpc has none), so it writes zeros as WriteZeroes does.
func (d *Driver) Discard(co *coroutine.Co, off, n int64) error {
	return d.WriteZeroes(co, off, n, true)
}

// WriteZeroes makes [off, off+n) read as zeros. A fixed disk punches a
// hole in its data (or zeroes it in place, if unmap is not set); a
// dynamic disk writes zeros into allocated blocks and leaves the others,
// zeros already; a differencing disk writes zeros everywhere (the parent
// must not show through).
func (d *Driver) WriteZeroes(co *coroutine.Co, off, n int64, unmap bool) error {
	if err := d.writable("zero", off, n); err != nil {
		return err
	}
	if n == 0 {
		return nil
	}
	if d.hdr == nil {
		mode := uint32(unix.FALLOC_FL_ZERO_RANGE | unix.FALLOC_FL_KEEP_SIZE)
		if unmap {
			mode = unix.FALLOC_FL_PUNCH_HOLE | unix.FALLOC_FL_KEEP_SIZE
		}
		if err := d.f.FallocateCo(co, mode, off, n); err == nil {
			return nil
		}
		return d.writeZeros(co, off, n)
	}
	return blocktab.Split(off, n, d.blockSize, func(pc blocktab.Piece) error {
		if d.bitmaps == nil {
			start, err := d.lookup(co, pc.Block)
			if err != nil || start < 0 {
				return err
			}
		}
		return d.writeZeros(co, off+pc.Pos, pc.Len)
	})
}

// writeZeros writes zeros over [off, off+n) through WriteAt's path.
func (d *Driver) writeZeros(co *coroutine.Co, off, n int64) error {
	return blocktab.WriteZeros(off, n, func(z []byte, at int64) error {
		var err error
		if d.hdr == nil {
			err = d.f.PwriteCo(co, z, at)
		} else {
			_, err = d.WriteAt(co, z, at)
		}
		if err != nil {
			return fmt.Errorf("vpc: %w", err)
		}
		return nil
	})
}

// statusRun bounds how many blocks one block status answer covers.
const statusRun = 1024

// LayerStatus implements drivers.LayerMapper as QEMU's vpc_co_block_status
// does: a fixed disk is data at the same offset; an allocated block is
// data at its offset in the file, an unallocated one zeros (dynamic) or
// the parent's (differencing: neither data nor zero). In a differencing
// HostStatus implements drivers.HostMapper: under a fixed disk qemu-img
// map reports the holes of the file as zeros (QEMU's vpc answers
// BDRV_BLOCK_RAW there, the file's own status); a dynamic disk's blocks
// are data throughout, as QEMU reports them.
func (d *Driver) HostStatus(st drivers.LayerStatus) (zero bool, n int64) {
	if d.hdr != nil {
		return false, st.Len
	}
	return blocktab.HostStatus(d.f, st.Offset, st.Len)
}

// block the bitmap's runs decide.
func (d *Driver) LayerStatus(co *coroutine.Co, off int64) (drivers.LayerStatus, error) {
	if off < 0 || off >= d.size {
		return drivers.LayerStatus{}, fmt.Errorf("vpc: %s: block status at %#x outside the disk (size %#x): %w",
			d.path, off, d.size, syscall.EINVAL)
	}
	if d.hdr == nil {
		return drivers.LayerStatus{Off: off, Len: d.size - off, Data: true, HasOffset: true, Offset: off}, nil
	}
	d.mu.Lock(co)
	defer d.mu.Unlock(co)
	b, in := off/d.blockSize, off%d.blockSize
	start, err := d.lookupLocked(co, b)
	if err != nil {
		return drivers.LayerStatus{}, err
	}
	st := drivers.LayerStatus{Off: off}
	if start >= 0 && d.bitmaps != nil {
		runs, err := d.runsLocked(co, start, in, min(d.blockSize-in, d.size-off))
		if err != nil {
			return drivers.LayerStatus{}, err
		}
		st.Len = runs[0].n
		if runs[0].present {
			st.Data, st.HasOffset, st.Offset = true, true, start+d.bmSize+in
		}
		return st, nil
	}
	end := (b + 1) * d.blockSize
	for k := int64(1); k < statusRun && end < d.size; k++ {
		// Only unallocated blocks join: an allocated block's data never
		// follows the previous one's (a bitmap sits between).
		s, err := d.lookupLocked(co, b+k)
		if err != nil || s >= 0 || start >= 0 {
			break
		}
		end += d.blockSize
	}
	st.Len = min(end, d.size) - off
	switch {
	case start >= 0:
		st.Data, st.HasOffset, st.Offset = true, true, start+d.bmSize+in
	case d.bitmaps == nil:
		st.Zero = true
	}
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

// Truncate refuses any change of size, as QEMU's vpc driver (which has no
// truncate) does; the current size is accepted.
func (d *Driver) Truncate(co *coroutine.Co, size int64) error {
	if size == d.size {
		return nil
	}
	if d.readOnly {
		return fmt.Errorf("vpc: %s: %w", d.path, drivers.ErrReadOnly)
	}
	return fmt.Errorf("vpc: %s: resizing VHD images is not supported: %w", d.path, drivers.ErrUnsupported)
}
