// Package blocktab is what the block-table formats (VDI, VHD; VHDX and
// VMDK to come) share: a table of fixed-width block entries in the image
// file, read through the metadata cache and written through, entry by
// entry; sector bitmaps in either bit order; and the split of a request
// into the pieces of one block each.
//
// # Table
//
// A VDI block map and a VHD block allocation table are arrays of 32-bit
// entries, one per block of the disk (1 MiB for VDI, 2 MiB for VHD), at a
// fixed place in the file: 4 bytes per MiB or per 2 MiB, so 8 MiB of table
// for a 2 TiB VDI disk. Table does not hold them all: it reads the table in
// 4 KiB chunks (1024 entries, 1 or 2 GiB of disk) through a cache.Cache of
// a bounded number of chunks (the image's --cache-size), as qcow2 reads L2
// slices. The last chunk is cut at the table's end: bytes past it are other
// metadata or data and are never read into the cache nor written from it.
//
// Entries are written through: SetLocked changes the cached chunk and
// writes the 4-byte entry to the file before it returns (aio turns it into
// a read-modify-write of the surrounding sector under its range lock). So
// the cache is never dirty, a Flush has no table to write back (its
// fdatasync makes the entries durable), and the ordering a driver needs —
// a block's data written and synced before the entry that publishes it —
// is the order of its calls.
//
// # Concurrency
//
// A Table belongs to one image and is used under that image's metadata
// CoMutex, which New is given and every ...Locked method asserts. Table
// I/O (a chunk miss, an entry write) happens with it held, as qcow2's L2
// I/O does. ScanAll reads the table outside any coroutine, at open.
//
// # Bitmaps
//
// VHD marks the sectors of a block present in a bitmap whose bit 0 is the
// most significant bit of byte 0 (MSB first); VHDX's sector bitmaps run
// LSB first. Bitmap knows both, and finds runs of equal bits so that a
// read of a differencing block is one I/O per run, not per sector.
//
// # Holes under raw-like data
//
// Where QEMU passes a block status down to the image file (a static VDI,
// a fixed VHD, a flat VMDK extent), qemu-img map reports the file's holes
// as zeros; HostStatus asks the file as QEMU's file-posix does, for the
// drivers' drivers.HostMapper.
package blocktab
