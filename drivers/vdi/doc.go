// Package vdi is the VDI (VirtualBox) image driver, qemu-img's "vdi":
// static and dynamic images, read and written as QEMU's block/vdi.c reads
// and writes them, with an allocation order that survives a crash.
//
// # Format (little-endian; docs/formats.md §5)
//
// A 512-byte header (signature 0xBEDA107F at 0x40, version 1.1), a block
// map of one u32 per 1 MiB block of the disk, then the blocks. A map entry
// is the block's index in the data area (host offset = data offset +
// index × 1 MiB), 0xFFFFFFFF for a block never written and 0xFFFFFFFE for
// a discarded one; both read as zeros. Static images have every block
// allocated at create; dynamic ones allocate on first write. The header's
// "blocks allocated" is the number of map entries in use, and the next
// block gets that index.
//
//   - header.go: the header fields by name, validation (what QEMU's
//     vdi_open refuses, and a map inside the file and before the data),
//     the probe.
//   - vdi.go: Format, open (one streamed pass over the map), reads,
//     allocating writes, zeroing, block status, Info and Check.
//
// # Design
//
// The map is a blocktab.Table: read in 4 KiB chunks through the metadata
// cache (at most --cache-size, by default 4 MiB of map = 1 TiB of disk,
// at least 4 chunks), written through entry by entry. Nothing of the map
// is held beyond the cache, so a 512 TiB image costs what its cache costs;
// the open-time pass streams it 64 KiB at a time.
//
// Concurrency. mu (a CoMutex) protects the map cache, the header copy and
// the next index; a request looks its block up under mu and does its data
// I/O without it. allocMu serialises allocations: each one writes its
// whole block, fdatasyncs, and publishes it before the next starts (QEMU
// holds its map lock, which also stops reads, for the same span). A write
// that finds its block unallocated takes allocMu, looks again (another
// writer may have allocated it meanwhile: it then writes in place) and
// allocates. Lock order: allocMu, then mu. Reads never wait for allocMu.
//
// Allocation order, for each new block:
//
//  1. the whole 1 MiB block, the request's data zero-padded, at index
//     next (past every block the map names, and at the header's count);
//  2. fdatasync;
//  3. the map entry;
//  4. the header with the count raised.
//
// QEMU writes 1, then 4, then 3, with no flush: after a power loss its map
// may name a block whose data never reached the disk (stale bytes of
// whatever the file held there). Here the data is durable before anything
// names it. A crash before 3 leaves the map as it was and the block past
// the end of use; the next allocation reuses the index and writes the
// whole block again, so no stale byte is ever exposed. A crash between 3
// and 4 leaves the count one behind a dense map: qemu-img check reports
// "allocated blocks mismatch", and the next writable open raises the
// count (and always allocates past the highest index in use, whatever the
// count says). Flush is an fdatasync: every entry is already written when
// its request completes.
//
// Discard and write-zeroes write zeros into allocated blocks and leave
// unallocated ones alone: VDI can record a discard (0xFFFFFFFE) only by
// leaking the block, and QEMU never writes that entry. BlockStatus is
// QEMU's: allocated blocks are data at their offset, others zeros.
//
// Check is qemu-img check's for VDI: entries past the block count, two
// entries naming one index, and a count that differs from the entries in
// use are each a corruption; repair is refused as qemu-img refuses it.
//
// # Left out
//
// What QEMU also refuses: block sizes other than 1 MiB, block extra data,
// differencing and linked images (VirtualBox's parent and link UUIDs),
// resizing. Unlike QEMU, an open also refuses a map that does not fit in
// the file or overlaps the data area, and a writable open refuses a map
// entry past the block count (a read-only one reports it through
// drivers.Damaged and fails reads of that block with EIO).
package vdi
