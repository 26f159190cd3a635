// Package vhdx is the VHDX image driver, qemu-img's "vhdx": fixed,
// dynamic and differencing disks ([MS-VHDX]; Hyper-V, Azure, Windows
// backups, Disk2vhd, QEMU), read and written, with the log replayed as the
// specification requires — and, on a read-only open, replayed in memory.
//
// # Format (little-endian; docs/formats.md §4)
//
// The first MiB holds the file type identifier ("vhdxfile"), two 4 KiB
// header slots (64 and 128 KiB: sequence number, FileWriteGuid,
// DataWriteGuid, LogGuid, the log's place; CRC-32C) and two copies of the
// 64 KiB region table (the BAT's and the metadata region's place). The
// metadata region holds the file parameters (block size 1–256 MiB,
// LeaveBlockAllocated, HasParent), the virtual size, the logical and
// physical sector sizes, the page 83 id and, for a differencing disk, the
// parent locator (key/value pairs in UTF-16LE: parent_linkage — the
// parent's DataWriteGuid —, relative_path, volume_path,
// absolute_win32_path). The BAT is one u64 per payload block (state in
// bits 0–2, offset in MiB in bits 20–63) with, after every chunk-ratio
// (2^23 × logical sector size / block size) payload entries, one entry
// for that chunk's 1 MiB sector bitmap (a bit per logical sector, LSB
// first; differencing disks only). The log is a ring of 4 KiB sectors:
// entries of descriptors (a 4 KiB sector to write, or a range to zero)
// and data sectors, each with the log GUID and a sequence number.
//
//   - format.go: CRC-32C, GUIDs, the header, region table, metadata and
//     parent locator parsers, the probe.
//   - log.go: the log: the scan for the active sequence, the replay (into
//     the file, or as an overlay of reads), and building entries.
//   - vhdx.go: Format, open (headers, log, regions, metadata, one streamed
//     pass over the BAT, the parent chain), header updates, Info, Files,
//     Check, Close.
//   - io.go: reads, block status, writes in place, allocation, BAT updates
//     through the log, discard and write-zeroes, Flush.
//
// # Design
//
// The BAT is read in 4 KiB sectors (512 entries) through a cache.Cache
// of at most --cache-size (by default 4 MiB: 4 TiB of 8 MiB blocks), as
// vpc's table is; nothing of it is held beyond the cache, so a multi-GiB
// BAT costs what its cache costs, and the open-time pass streams it 64
// KiB at a time: where the next block goes, and blocks (or sector
// bitmaps) that overlap the first MiB, the log, the BAT or the metadata,
// or start past the end of the file, which a writable open refuses and a
// read-only one reports (drivers.Damaged); reads of a block over the
// metadata fail with EIO, of one past the end read zeros. Sector bitmaps are cached the same way, in 4 KiB pages
// (32768 sectors). blocktab.Table is not used: its entries are 32-bit
// and written straight through, VHDX's are 64-bit and written through
// the log.
//
// Reading. FULLY_PRESENT blocks are read from the file; PARTIALLY_PRESENT
// blocks of a differencing disk read the sectors their bitmap marks from
// the file and the others from the parent; NOT_PRESENT reads zeros, or
// the parent's bytes in a differencing disk (zeros past the parent's end);
// ZERO, UNMAPPED (and the v0.95 value 5) and UNDEFINED read zeros. QEMU
// opens neither differencing disks nor 4096-byte logical sectors, and
// fails PARTIALLY_PRESENT reads; this driver does all three. An aligned
// read inside one fully present block takes the DirectReader fast path:
// a BAT lookup (cached), then one iocb straight into the caller's buffer.
// It is not drivers.FileBacked even for a fixed image: its blocks are not
// at the disk's offsets in the file.
//
// Regions. The region table's entries may come in any order and at any
// MiB multiples (Windows puts the metadata at 2 MiB, before the BAT at 3
// MiB, and marks both required); an unknown region not marked required
// is not read, but its place is kept, as QEMU keeps it: no other region
// and no block may overlap it. An unknown region, metadata item or user
// item marked required is refused (ErrUnsupported).
//
// Parents are found by the locator's relative_path (relative to the
// image's directory, Windows separators turned into slashes), then
// volume_path and absolute_win32_path (whose last element is looked for
// beside the image: a Windows volume or drive names nothing here). The
// parent must carry the DataWriteGuid the child's parent_linkage (or
// parent_linkage2) names; a chain that comes back to one of its files,
// or goes deeper than 64, is refused. Parents are opened read-only.
//
// The log. When the current header has a LogGuid, the log is scanned:
// every 4 KiB position is tried for a valid entry (signature, the log
// GUID, a length inside the log, CRC-32C over the entry, descriptors and
// data sectors carrying its sequence number); entries chain where one
// ends and the next begins (wrapping) with the next sequence number; the
// chain whose last entry has the highest sequence number is active, from
// the entry its last entry's Tail names. A chain whose last entry's Tail
// names none of its entries is incomplete — an entry between was torn
// (its CRC fails), or belongs to an older pass over the ring — and is no
// candidate: the specification's rule, which QEMU does not apply (it
// replays a chain whole, whatever its Tail). Its writes must be whole 4 KiB
// sectors off the file type identifier, the headers and the log (the
// region tables may be logged); a FlushedFileOffset past the end
// of the file means a truncated image: refused. The scan reads at most 16
// log lengths plus 64 MiB (no 4 KiB position can start an entry inside a
// valid one, so valid entries are skipped), and holds at most 2^20
// writes. A writable open replays them into the file, extends it to the
// LastFileOffset, syncs, and clears the LogGuid (a header update). A
// read-only open leaves the file alone: the writes become an overlay —
// their targets and the log sectors that hold their bytes, not the bytes
// — laid over every read of the file (region table, metadata, BAT,
// bitmaps and data), and the file is taken to end at the LastFileOffset,
// so the disk reads as the replayed image would. QEMU refuses such an
// open ("contains a log that needs to be replayed"). Two of QEMU's
// replay's ways are not copied: it misreads an entry of more than one
// descriptor sector (more than 126 descriptors, as Windows may write:
// it fails the open with EINVAL), and it extends the file to a
// LastFileOffset only when that is not a multiple of 1 MiB — the spec
// says it always is — so a block the log places past the old end is
// then refused as truncated.
//
// Headers are updated as the specification and QEMU update them: the
// inactive slot gets the current header with the next sequence number,
// is written and synced and becomes current; twice, so both slots stay
// valid and equal (QEMU's leave different DataWriteGuids behind). Each
// update carries this open's FileWriteGuid. The first write of an open
// (data, zeroes or discard) first gives the headers a new DataWriteGuid,
// so a child made on this image no longer links to it.
//
// Metadata writes go through the log. A BAT change is logged as QEMU logs
// it, the whole 4 KiB BAT sector: if the headers carry no LogGuid, they
// get a new one (a header update); the entry (header and descriptor
// sector, data sectors) is written at the log's write position, wrapping,
// and synced; then the sectors are written in place and synced; then the
// cache takes them. Each entry is a sequence of its own (Tail is itself):
// everything before it is in place when it is written. Flush syncs and,
// if the LogGuid is set, clears it (a header update); QEMU sets and clears
// it around every entry, costing two more header updates per allocation.
// A kill -9 leaves the LogGuid set and the log holding entries already
// applied: the next open replays them again, which changes nothing.
//
// Allocation order (io.go, allocate), for a block that is not fully
// present: a new block at nextFree (a MiB boundary past every block the
// BAT names and past the end of the file); the file extended over it
// with ftruncate, so it reads as zeros without writing them, then the
// request's bytes written — or, for a NOT_PRESENT block of a differencing
// disk, the parent's bytes around them; fdatasync; then the BAT entry,
// FULLY_PRESENT, through the log. A PARTIALLY_PRESENT block is made fully
// present in place: the sectors its bitmap leaves to the parent are
// filled with the parent's bytes (until the entry changes they are not
// read), the request written, synced, the entry changed; bitmaps are
// never written. QEMU writes a new block the same way (truncate, data,
// flush, log); a block a crash left unpublished is past the end the BAT
// knows and is never read (the next allocation goes past it: a leak, as
// QEMU's drivers may leak). Blocks this driver allocates are
// FULLY_PRESENT; a fixed image's present blocks are written in place, and
// the ZERO blocks QEMU's default fixed images have (block_state_zero=on)
// are allocated as a dynamic image's are, as QEMU does.
//
// Discard and write-zeroes: a range covering a whole block sets it to
// UNMAPPED (discard) or ZERO (write-zeroes; both ZERO in a differencing
// disk, where the parent must not show through) with offset 0, batched
// into one log write per 4096 blocks; with unmap the space the block had
// is then punched out of the file (never reused). Partial blocks are
// written zeros where they do not read as zeros already. A fixed image
// keeps its blocks: their bytes are punched or zeroed in the file.
//
// Concurrency. mu (a CoMutex) protects the BAT and bitmap caches, the
// next free offset, the current header and the log writer; lookups hold
// it, data I/O does not; BAT updates hold it across their log write (one
// metadata writer at a time, as QEMU's s->lock). allocMu serialises
// allocations and whole-block discards, across their data I/O; reads
// never take it. Lock order (nothing is taken in the other order):
//
//	allocMu
//	└── mu
//	    └── (the parent's locks, through its ReadAt: never while holding mu)
//
// # Check
//
// As QEMU's vhdx_co_check: a log replayed by this open (check -r all
// opens read-write) is one corruption fixed, and every fully present
// block or sector bitmap must lie off the headers, log and regions and
// start inside the file. A read-only check of an image with a dirty log
// fails, as qemu-img check does. qemu-img map shows one data extent for a
// whole VHDX disk (QEMU has no block status for it); map here shows the
// BAT's blocks.
//
// # Left out
//
// Resizing (QEMU cannot either); creating images (qemu-img create makes
// them); writing a parent (parents are read-only); reusing the space of
// discarded blocks; user metadata items (kept, never read).
package vhdx
