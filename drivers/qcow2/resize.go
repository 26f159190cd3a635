package qcow2

import (
	"encoding/binary"
	"fmt"

	"imgfuse/aio"
	"imgfuse/coroutine"
	"imgfuse/drivers"
)

// Truncate implements drivers.Driver. Growing updates the header's size
// (after growing L1 if the new size needs more entries); sizes are rounded
// up to a multiple of 512 bytes, as qcow2 virtual sizes are. Shrinking is
// refused: the clusters past the new end would have to be freed, and QEMU
// only does it on explicit request (qemu-img resize --shrink).
func (img *image) Truncate(co *coroutine.Co, size int64) (err error) {
	defer img.nameErr(&err)
	if !img.writable {
		return img.readOnly("truncate")
	}
	if size < 0 {
		return fmt.Errorf("truncate to %d bytes: invalid size", size)
	}
	size = (size + 511) &^ 511
	cur := img.size.Load()
	if size == cur {
		return nil
	}
	if size < cur {
		return fmt.Errorf("shrinking a qcow2 disk is not supported (%d to %d bytes): %w", cur, size, drivers.ErrUnsupported)
	}
	img.mu.Lock(co)
	defer img.mu.Unlock(co)
	return img.growLocked(co, size)
}

// maxDiskSize bounds the virtual size: QEMU's limit of 2^63 - 512 would
// overflow offset arithmetic, and an L1 table of at most 32 MiB maps
// 4 Mi L2 tables anyway.
const maxDiskSize = 1 << 62

// growLocked grows the disk to at least size bytes (rounded up to 512):
// L1 first, then the size in the header, each on disk (sync) before the
// memory copy changes.
func (img *image) growLocked(co *coroutine.Co, size int64) error {
	img.mu.AssertHeld(co)
	if img.broken != nil {
		return img.broken
	}
	size = (size + 511) &^ 511
	if size <= img.size.Load() {
		return nil // a concurrent grow got there first
	}
	if size > maxDiskSize {
		return fmt.Errorf("%d bytes is larger than the %d-byte limit: %w", size, int64(maxDiskSize), drivers.ErrNoSpace)
	}
	need := img.h.l1EntriesFor(uint64(size))
	if need > maxL1Bytes/8 {
		return fmt.Errorf("%d bytes would need an L1 table of %d entries (limit %d): %w", size, need, maxL1Bytes/8, drivers.ErrNoSpace)
	}
	if need > uint64(len(img.l1)) {
		if err := img.growL1Locked(co, int64(need)); err != nil {
			return err
		}
	}
	var b [8]byte
	binary.BigEndian.PutUint64(b[:], uint64(size))
	if err := img.syncWriteLocked(co, b[:], 24, olHeader); err != nil {
		return fmt.Errorf("writing the new size: %w", err)
	}
	img.h.Size = uint64(size)
	img.size.Store(size)
	return nil
}

// growL1Locked moves L1 to new clusters with room for at least need
// entries (QEMU's qcow2_grow_l1_table): the new table is written and
// synced, the header switched to it with one sync write of l1_size and
// l1_table_offset, and only then the old table freed.
func (img *image) growL1Locked(co *coroutine.Co, need int64) error {
	img.mu.AssertHeld(co)
	// Grow by half at least, so that a disk growing by small steps
	// (Growable writes) does not move its L1 every time.
	entries := min(max(need, int64(len(img.l1))*3/2), maxL1Bytes/8)
	cs := img.clusterSize
	bytes := entries * 8
	clusters := (bytes + cs - 1) / cs
	if err := img.markDirtyLocked(co); err != nil {
		return err
	}
	off, err := img.rc.allocLocked(co, clusters)
	if err != nil {
		return fmt.Errorf("allocating a new L1 table: %w", err)
	}
	img.fileSize = max(img.fileSize, img.rc.end)
	fail := func(err error) error {
		_ = img.rc.updateLocked(co, off, clusters*cs, -1)
		return err
	}
	buf := aio.AlignedBuffer(int(clusters * cs))
	for i, e := range img.l1 {
		binary.BigEndian.PutUint64(buf[i*8:], e)
	}
	if !img.lazy {
		if err := img.rc.flushLocked(co); err != nil {
			return fail(err)
		}
	}
	if err := img.syncWriteLocked(co, buf, off, 0); err != nil {
		return fail(fmt.Errorf("writing the new L1 table at %#x: %w", off, err))
	}
	var hdr [12]byte
	binary.BigEndian.PutUint32(hdr[0:], uint32(entries))
	binary.BigEndian.PutUint64(hdr[4:], uint64(off))
	if err := img.syncWriteLocked(co, hdr[:], 36, olHeader); err != nil {
		// The header may point at either table; both are whole, and
		// the old one is not freed.
		return fmt.Errorf("switching the header to the new L1 table: %w", err)
	}
	oldOff, oldLen := int64(img.h.L1Offset), int64(len(img.l1))
	l1 := make([]uint64, entries)
	copy(l1, img.l1)
	img.l1 = l1
	img.h.L1Size = uint32(entries)
	img.h.L1Offset = uint64(off)
	if oldLen > 0 {
		if err := img.rc.updateLocked(co, oldOff, oldLen*8, -1); err != nil {
			return fmt.Errorf("freeing the old L1 table at %#x: %w", oldOff, err)
		}
	}
	return nil
}
