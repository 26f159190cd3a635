// Package vpc is the VHD image driver, qemu-img's "vpc": fixed, dynamic
// and differencing disks (Microsoft's Virtual Hard Disk Image Format
// Specification; Virtual PC, Hyper-V, Disk2vhd, Azure, QEMU), read and
// written.
//
// # Format (big-endian; docs/formats.md §3)
//
// Every VHD ends with a 512-byte footer (cookie "conectix", disk type,
// size, geometry, checksum). A fixed disk is its data followed by the
// footer. A dynamic or differencing disk keeps a copy of the footer at 0,
// a 1024-byte dynamic header (block size, BAT offset and length; for a
// differencing disk the parent's unique id, name and up to eight parent
// locators), the block allocation table (one u32 per block: the sector of
// the block's bitmap, 0xFFFFFFFF when unallocated), and the blocks: a
// sector bitmap (a bit per sector, most significant bit first) and the
// block's data (2 MiB for every image QEMU makes).
//
//   - footer.go: footer and dynamic header parsing, the size rule, parent
//     locators, the probe.
//   - vpc.go: Format, open (footer, header, one streamed pass over the
//     BAT, the parent chain), Info, Files, Close.
//   - io.go: reads (fixed at the same offset, the DirectReader fast path,
//     blocks through the BAT, differencing runs through the bitmaps),
//     zeroing, block status.
//   - alloc.go: writes: in place, block allocation, bitmap updates.
//
// # Size
//
// The disk size is QEMU 10's (commit 558d8eb7f3): the CHS geometry's
// (cylinders × heads × sectors × 512) for images made by Virtual PC
// ("vpc ") and QEMU ("qemu"), unless the geometry is the maximum
// 65535/16/255 (QEMU's force_size images, creator "qem2", store it to say
// "use current_size"); current_size for every other creator — Hyper-V
// ("win "), Disk2vhd ("d2v "), Citrix, Azure — whose geometry is only a
// rounded-down hint. QEMU 7.2 used CHS for unknown creators and Azure too;
// the sizes differ only for such images. Disks over 2040 GiB are refused,
// as QEMU refuses them.
//
// # Design
//
// A fixed disk is a raw file at offset 0 with a footer after the data:
// reads and writes go to the same offsets, and aligned reads take the
// DirectReader fast path (one iocb, no coroutine switch beyond aio's),
// which is raw's speed through FUSE. It is not drivers.FileBacked: FUSE
// passthrough maps the exposed file onto the whole image file, and the
// kernel does not bound a passed-through read by the FUSE file's size, so
// the footer would read as a 513th byte past the end of the disk.
//
// The BAT is a blocktab.Table: read in 4 KiB chunks through the metadata
// cache (at most --cache-size, by default 4 MiB = 2 TiB of 2 MiB blocks),
// written through entry by entry. A differencing image caches sector
// bitmaps the same way (at most 1024 of them), by file offset, written
// through. The open-time pass over the BAT streams it 64 KiB at a time:
// it finds where the next block goes and refuses (writable) or reports
// (read-only, drivers.Damaged) blocks that overlap the headers or end past
// the file, as QEMU refuses a truncated image.
//
// Reading. A dynamic disk reads an allocated block's data whatever its
// bitmap says, as QEMU does (every block QEMU allocates has all bits set,
// and qemu-img convert is the reference); unallocated blocks read as
// zeros. A differencing disk reads the sectors its bitmap marks from the
// file and the others — and unallocated blocks — from its parent (zeros
// past the parent's end). QEMU opens a differencing disk as a dynamic one
// with no parent, reading zeros where the parent's data belongs; this
// driver does not copy that.
//
// Parents are found as VirtualBox and Hyper-V look for them: the W2ru
// (relative) and W2ku (absolute) locators, then the header's parent name,
// then the deprecated and Mac locators; relative paths are relative to
// the image's path (drivers.JoinParent), Windows separators are turned
// into slashes, and a drive-letter path is looked for by its last element
// beside the image. The parent must carry the unique id the child
// records; a chain that comes back to one of its files, or goes deeper
// than 64 (across formats: drivers.OpenParent), is refused. Parents are
// opened read-only.
//
// Concurrency. mu (a CoMutex) protects the BAT and bitmap caches and the
// next free offset; lookups hold it, data I/O does not. allocMu
// serialises allocations, cowMu the writes that set bitmap bits of a
// differencing block. Lock order: allocMu, cowMu, mu.
//
// Writing, for a new block (alloc.go, allocate): the whole block — an
// all-ones bitmap, the request's data with zeros (dynamic) or the
// parent's bytes (differencing) around it — at the next free offset, then
// the footer after it, fdatasync, then the BAT entry. QEMU writes bitmap,
// footer and BAT entry before the data, with no flush, so a crash can
// publish a block whose data never arrived; here nothing names a block
// before all its bytes are durable, and a block a crash left unpublished
// is never read (the next allocation goes past it: a leak, as QEMU's
// drivers may leak). Into an allocated block of a differencing disk where
// some touched sector's bit is clear: the partly covered sectors are
// filled with what the disk reads there, the sectors written and synced,
// then the bits set and the bitmap sector written. Flush is an fdatasync:
// every entry and bitmap is written when its request completes.
//
// Discard and write-zeroes: a fixed disk punches a hole in (or zeroes)
// its data range; a dynamic disk writes zeros into allocated blocks and
// leaves the others; a differencing disk writes zeros everywhere, so the
// parent never shows through. VHD cannot record either.
//
// # Left out
//
// Resizing (QEMU's vpc cannot either); check (qemu-img check does not
// support vpc: imgfuse says so, with qemu-img's exit code 63); creating
// differencing images; writing a parent (parents are read-only); blocks
// larger than 1 GiB.
package vpc
