// Package vmdk is the VMDK image driver, qemu-img's "vmdk": hosted sparse
// extents (monolithicSparse), flat and split images behind a text
// descriptor (monolithicFlat, twoGbMaxExtentFlat, twoGbMaxExtentSparse,
// vmfs), read and written as QEMU's block/vmdk.c reads and writes them,
// with an allocation order that survives a crash; streamOptimized
// (compressed grains) read-only, as in QEMU.
//
// # Format (little-endian, sectors of 512 bytes; docs/formats.md §2)
//
// An image is a list of extents laid end to end. A hosted sparse extent
// ("KDMV") is a 512-byte header, an optional embedded descriptor, a grain
// directory (GD) of u32 sector numbers of grain tables (GTs), and the
// grain tables: numGTEsPerGT u32 entries (GTEs), each the sector of one
// grain (grainSize sectors, 64 KiB from QEMU) or 0 for a grain never
// written. With the zeroed-grain flag a GTE of 1 is a grain that reads as
// zeros. A redundant GD and GTs mirror the primary ones; QEMU reads only
// the primary and updates both, and so does this driver. A text
// descriptor ("version=1", "CID=", "createType=", extent lines
// `RW 10240 FLAT "x-flat.vmdk" 0`) names the extent files, relative to its
// own directory as QEMU's path_combine resolves them. A streamOptimized
// extent's GTEs point at grain markers (u64 sector, u32 size) followed by
// a zlib stream; VMware's layout keeps the real header in a footer at the
// end of the file (GD_AT_END), QEMU's keeps the tables at the front.
//
//   - header.go: the sparse header fields by name, validation (what
//     vmdk_open_vmdk4 refuses, and every table inside the file), the probe.
//   - descriptor.go: the descriptor parser and QEMU's descriptor probe.
//   - vmdk.go: Format, open (a sparse file, or a descriptor and its
//     extents), the split of a request across extents, flat I/O, the CID
//     update, block status, Info.
//   - sparse.go: grain lookup, allocating writes, zeroed grains, block
//     status of a sparse extent.
//   - compress.go: compressed grains (streamOptimized).
//   - direct.go: the raw fast paths of flat extents (DirectReader, and
//     FileBacked for a read-only disk that is one flat file byte for byte).
//   - check.go: qemu-img check's test for VMDK.
//
// # Design
//
// The grain directory is a blocktab.Table and the grain tables a
// cache.Cache keyed by file offset, both bounded by --cache-size (by
// default 4 MiB of grain tables: 64 GiB of disk), read through the
// metadata cache and written through entry by entry, as drivers/vdi and
// drivers/vpc do with their block tables. Nothing is held beyond the
// caches, so a 2 TiB extent costs what its cache costs. Flat extents are
// plain ranges of their file, read as raw images are: an aligned read
// inside one flat extent is one iocb into the reply (ReadDirect), and a
// read-only monolithicFlat disk whose -flat file is exactly the disk is
// FUSE passthrough's (Format.Open returns it as a drivers.FileBacked:
// the kernel reads the file itself). A writable one is not: its first
// write, mapped ones included, must reach the driver to renew the CID.
// All I/O goes through aio.
//
// Concurrency. mu (a CoMutex) is the image's metadata lock: it protects
// every sparse extent's caches, its next grain and its known end, and the
// CID update. A request looks its grain up under mu and does its data I/O
// without it. allocMu serialises allocations: each one writes its whole
// grain, fdatasyncs, and publishes it before the next starts. A write that
// finds its grain unallocated takes allocMu, looks again (another writer
// may have allocated it meanwhile: it then writes in place) and allocates.
// Lock order: allocMu, then mu. Reads never wait for allocMu. A delta
// link reads its parent (a driver of its own, with its own locks) holding
// allocMu during a copy-on-write, never mu; a parent never calls into its
// child.
//
// Allocation order, for each new grain (QEMU's, docs/formats.md §2.7,
// with the flush it lacks):
//
//  1. the whole grain, the request's data zero-padded, at the end of the
//     file rounded up to a grain (QEMU's place: sectors 128, 256, ... of a
//     fresh image);
//  2. fdatasync;
//  3. the GTE;
//  4. the redundant GTE.
//
// QEMU writes 1, 3, 4 and flushes only then: after a power loss its GTE
// may name a grain whose data never reached the disk. Here the data is
// durable before anything names it. A crash before 3 leaks the grain (the
// next open allocates past it: space lost, never a stale byte shown); one
// between 3 and 4 leaves the redundant table one entry behind, which
// neither QEMU nor this driver reads. Flush is an fdatasync of every file:
// each GTE is written when its request completes.
//
// The first write after each open gives the image a new CID, as QEMU does
// (a child's parentCID then tells that its parent changed): its 8 hex
// digits are rewritten in place, in the embedded descriptor or the
// descriptor file, and synced.
//
// # Parent chains (delta links)
//
// A descriptor with parentFileNameHint is a delta link (parent.go): what
// its sparse extents leave unallocated (GTE 0) reads from the parent; a
// zeroed grain reads zeros, never the parent. The hint is resolved as
// QEMU resolves a backing file name (drivers.ResolveParent: appended to
// the child's path as given, a protocol prefix refused), and the parent
// is opened read-only as VMDK whatever its content, as QEMU's
// vmdk_parent_open sets the backing format (qemu-img create refuses any
// other base), through drivers.OpenParent, which carries the chain in
// OpenOptions.Chain and refuses a file already in it (a loop, across
// formats too) and a chain deeper than drivers.MaxChainDepth. QEMU has no
// loop check (a -> b -> a opens until it runs out of descriptors).
//
// The child's parentCID must equal the parent's CID. As in QEMU
// (vmdk_is_cid_valid) a mismatch does not fail the open: reads that fall
// through to the parent and copy-on-write fail with ErrCorrupt (QEMU:
// EINVAL) naming both CIDs, while allocated grains read and write. The
// parent is opened read-only and locked, so the comparison is made once,
// at open.
//
// A write to an unallocated grain of a delta link allocates the whole
// grain with the parent's bytes around the data (QEMU's get_whole_cluster
// copy-on-write), in the allocation order above. A zero write to an
// unallocated grain that cannot become a zeroed grain allocates it with
// zeros (QEMU's block layer writes zeros when the driver refuses).
// BlockStatus and map pass what the image leaves to the parent down the
// chain (BackingLayer); Info names the hint as backing-filename, format
// "vmdk", as qemu-img info does.
//
// Write-zeroes and discard: a whole grain of an extent with zeroed-grain
// entries becomes GTE 1 (both tables; the old grain leaks, as in QEMU);
// otherwise allocated grains and flat ranges get zeros written and
// unallocated grains, already zeros, are left alone. BlockStatus is
// QEMU's: a flat extent is data at its offset; an allocated grain data at
// its offset (compressed: no offset); a zeroed grain zeros; an unallocated
// grain "not present" (qemu-img map's present:false, zero:true).
//
// Check is qemu-img check's for VMDK: every allocated grain must start
// before the end of its file; repair is refused as qemu-img refuses it.
//
// # Beyond QEMU, and left out
//
// The descriptor parser reads whole "key = value" lines, not substrings
// (QEMU takes "CID=" inside "parentCID=" or a comment), and refuses an
// extent line it cannot parse instead of skipping it; ZERO and RDONLY
// extents keep their place on the disk (QEMU drops them and moves the
// next extents down) and make a writable open fail, as does a NOACCESS
// extent any open. A write to a grain whose grain table does not exist
// (GD entry 0) is refused with ErrUnsupported: QEMU writes such a grain
// over the header (docs/formats.md §7).
//
// A hint that is an absolute Windows path ("C:\VMs\base.vmdk", as
// VMware on Windows may write it; QEMU takes "C" for a protocol and
// fails) finds the parent by its last element beside the child.
//
// Left out: writing streamOptimized images (QEMU appends whole compressed grains
// only; here a writable open is refused), VMDK3 (COWD) and seSparse
// extents, VMFSSPARSE/VMFSRDM/VMFSRAW extents, creating grain tables, and
// resizing.
package vmdk
