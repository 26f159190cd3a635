// Package qcow2 is the qcow2 image driver: it opens a qcow2 file (v2 or v3),
// follows its backing chain and external data file, and serves the virtual
// disk through the drivers.Driver contract.
//
// # Files and their concerns
//
//   - layout.go: on-disk constants and the parsed header struct.
//   - header.go: header and extension parsing and validation (parseHeader).
//   - bounds.go: the open-time check that the tables lie inside the file
//     (checkBounds): a writable open refuses an image whose metadata
//     points past the end, a read-only one reports it (drivers.Damaged);
//     the files of the chain (drivers.FileLister).
//   - qcow2.go: Format (name, probe, open), the image type, open-time setup
//     (header, L1, L2 cache, backing file, data file, snapshot selection;
//     for a writable open: refusals, refcounts, dirty-image repair, autoclear
//     bits), header updates (dirty and corrupt bits), Flush, Close, Info and
//     Snapshots.
//   - cluster.go: the L2 cursor (l2Slice), guest → host translation
//     (mapLocked), cluster and subcluster types, L2 entry validation, the
//     compressed descriptor.
//   - read.go: ReadAt and BlockStatus: map under the lock, then data I/O
//     (image or data file, backing file, zeros, decompression) without it.
//   - backing.go: opening the backing chain (loop and depth checks) and the
//     external data file; reads from the backing layer.
//   - write.go: WriteAt: in-place writes, allocating writes (the in-flight
//     allocation list, COW, linking into L2), L2 table allocation and copy,
//     L1 entry writes.
//   - zero.go: Discard and WriteZeroes (zero flags, subcluster zero bits,
//     freeing clusters, zeros written where the format has no other way).
//   - resize.go: Truncate (grow only): L1 growth and the header size.
//   - overlap.go: the metadata overlap check every write and every data
//     read from the image file passes.
//   - refcount.go, check.go: refcounts (allocation, updates, refcount blocks
//     and table growth), the consistency check and the refcount rebuild.
//   - errors.go: how errors name the image: once, "qcow2: PATH: ", put in
//     front by the exported methods and the open (named); code inside the
//     driver returns bare context.
//   - compress.go: deflate and zstd decompression of one cluster.
//   - snapshot.go: the internal snapshot table.
//   - info.go: the format-specific part of Info (QEMU's ImageInfoSpecific
//     shape, and imgfuse's own details).
//   - checkimage.go: the drivers.Checker capability around check.go: a
//     check of a read-only image, block statistics, the repairs of
//     qemu-img check -r leaks|all (refcounts, rebuild, COPIED flags).
//   - mapinfo.go: the drivers.LayerMapper capability (qemu-img map), with
//     QEMU's metadata-preallocation guess.
//   - allocated.go: the drivers.Allocator capability (st_blocks of the
//     exposed file): the files' allocation less the metadata known to be
//     in them, summed over the chain, without reading a table.
//   - create.go: Create, a new image laid out as qemu-img create lays it out.
//
// # Concurrency
//
// Every method that may yield takes the calling coroutine. Many coroutines
// (one per FUSE request) use an image at once. Metadata — the L1 table in
// memory, the L2 table cache and the file size used to validate offsets —
// is protected by image.mu, a coroutine.CoMutex: a coroutine that finds it
// held yields rather than blocking its thread, and metadata I/O (an L2
// table miss) happens with it held, so lookups are serialised exactly as in
// QEMU. Functions that need it end in Locked and assert it on entry.
//
// Data I/O never happens under mu: a read locks, maps one run of clusters
// with the same type and contiguous host offsets, unlocks, then reads the
// run (from the image or data file, from the backing driver, zeros, or a
// compressed cluster). Decompression runs outside the lock through
// coroutine.RunInWorker, so a 2 MiB zstd cluster neither holds the
// metadata lock nor stalls another request.
//
// # Writing
//
// An image is writable unless opened ReadOnly or on a snapshot; backing
// files and snapshot views never are. A read-write open refuses images
// with the corrupt bit (read-only still works) and images with persistent
// bitmaps (which would have to be dropped and leaked); it rebuilds the
// refcounts of a dirty image (rc.rebuildLocked) and then clears the bit,
// except for a repair open (OpenOptions.Repair, QEMU's BDRV_O_CHECK),
// where the check reports and fixes what the crash left and clears the
// bit only if no corruption remains (Close keeps it otherwise),
// and clears unknown autoclear bits with a full header rewrite
// (marshalHeaderCluster: unknown extensions and compatible bits kept).
//
// A write is done in steps, each inside one L2 table (QEMU's
// qcow2_alloc_host_offset). Under mu a step first waits for any allocation
// in flight that covers its first cluster (and stops short of one further
// on), then reads its L2 entries:
//
//   - a run of COPIED clusters (extended L2: the touched subclusters
//     allocated) with contiguous host offsets is written in place after
//     unlocking: no metadata I/O, no serialisation beyond the lookup;
//   - otherwise an allocation is registered in image.allocs: new host
//     clusters from rc.allocLocked (contiguous for the whole run of clusters
//     that need one; the guest offset itself with an external data file), or
//     the existing host cluster of a COPIED cluster that only needs its
//     subcluster bits or zero flag changed. The L2 table is made writable
//     first (allocated, or copied if its L1 entry lacks COPIED). After
//     unlocking, the data is written merged with the COW head and tail,
//     which are read through ReadAt from the old mapping (backing file,
//     zeros, decompressed or shared cluster); with extended L2 only
//     partially written subclusters are copied. Then, under mu again, the
//     entries are linked (offset|COPIED; bitmaps: alloc bits set, zero bits
//     cleared), the replaced clusters lose a reference, the allocation is
//     removed and its waiters restarted: they redo their lookup.
//
// Every entry written has COPIED iff its refcount is 1.
//
// # One walk over L2
//
// Every operation that reads or changes L2 entries — mapLocked (reads,
// block status), writeRunLocked (planning a write step), zeroStepLocked
// (discard, write zeroes) and linkLocked (publishing an allocation) —
// walks them through one cursor, l2Slice (QEMU's l2_slice with
// get_l2_entry, get_l2_bitmap and qcow2_get_subcluster_range_type):
// sliceLocked locates the step's slice of one L2 table and pins the table
// once (for an update, after making it writable), the caller defers close;
// entry and set read and write an entry with its bitmap, touched gives the
// subclusters a step covers, typeAt classifies and validates an entry
// (type, span of subclusters with that type, host cluster), and errorf
// names the table, entry and guest offset in every error. The checker
// walks every table through the same cursor: tableSlice over a table it
// read from the file (entries decoded by the image's l2Format, which a
// header alone gives, so a check needs no open image), tableSliceLocked
// over a cached table for the COPIED repairs. The callers keep
// only their decisions: the run a read maps, the class of a write step
// (in place, keep, new), the zeroed entry (zeroEntry), the linked entry.
// References an update drops are collected (releases) and released by one
// helper.
//
// Ordering (qcow2.md §1.13), one named helper per rule, called by the
// update it protects: refcountsBeforeL2Locked (linkLocked, for fresh
// clusters) makes the L2 cache depend on the refcount cache, so refcount
// increases reach the disk before an L2 table pointing at the clusters;
// dataBeforeL2 (a link after COW) sets DependOnFlush on the L2 cache, so
// the copied data is synced before the table is written; releaseLocked
// lowers refcounts after the entries changed, and every decrease makes the
// refcount cache depend on the L2 cache (rc.updateLocked). New
// L2 tables and L1 moves flush the refcount cache, write and sync the new
// table, and only then write the L1 entry or header with a sync write; the
// old table is freed last. With lazy refcounts the dirty bit is set with a
// sync header write before the first L2 or L1 update instead, Flush skips
// the refcount cache, and Close flushes everything and clears the bit.
// Close always flushes a writable image completely before clearing the
// dirty bit, whatever the caller did before.
//
// A metadata error that wraps drivers.ErrCorrupt during a write sets the
// corrupt bit and makes every later write fail (signalCorruptionLocked).
//
// # Overlap checks
//
// A damaged image can make a write land on metadata: a refcount of 0 for
// a table hands the table out as a free cluster, a refcount block placed
// on a table turns refcount updates into table damage, an L2 entry
// pointing into metadata sends guest data there. As QEMU does with its
// default overlap-check=cached, every write to the image file is first
// compared with the metadata whose location is in memory
// (checkWriteLocked, overlap.go): the header cluster, the active L1
// table, every L2 table the active L1 names, the refcount table, every
// refcount block it names, the snapshot table and the snapshots' L1
// tables (their L2 tables would need reads: not checked, as in QEMU's
// cached mode). The write says which kind of metadata it is (ign), which
// it may hit. The checks sit where writes start, not in each caller:
//
//   - data: the write planner checks the host clusters of every step, in
//     place or allocated (not for an external data file);
//   - new clusters: rc.allocLocked checks every cluster it found free
//     before counting it, whatever it is for (data, L2 table, L1 table),
//     and so do new refcount blocks and refcount areas;
//   - cached tables: the L2 and refcount cache backends check every
//     write-back (and refuse it once the image is corrupt);
//   - direct writes: syncWriteLocked (L1 entries, new L1 tables, header
//     fields) and rc.syncWriteLocked (reftable entries, new reftables);
//   - repairs (check -r): COPIED fixes change L2 tables in the cache and L1
//     entries with writeL1EntryLocked, and a rebuild checks its new
//     refcount blocks (the old ones excepted: it replaces them) before it
//     writes them, so a repair never writes over metadata either.
//
// On a hit the error wraps drivers.ErrCorrupt ("preventing invalid write
// ... (overlaps with the active L1 table at 0x30000)"), the corrupt bit is
// set (the header write passes the same check), and no further write,
// flush or write-back happens on this open image; reads go on, except one
// that would have to evict a dirty L2 table, which fails with EIO rather
// than write it.
//
// Reads are checked as well, which QEMU does not do: there an L2 entry
// pointing at the L1 table returns the table's bytes as guest data.
// ReadAt passes every run it maps from the image file — the host range
// of normal clusters, the byte range of a compressed cluster — through
// the same checker (checkReadLocked), plus the L2 table the run was
// mapped from; clusters in an external data file are another file's
// and are not checked, and a backing layer checks its own reads against
// its own tables. A run that reaches metadata past its first cluster is
// cut before it (the clusters before still read); one that starts in
// metadata fails with ErrCorrupt (EIO to the reader) naming the table.
// The first such read of an open image is logged (OpenOptions.Logf).
// On a writable image it also sets the corrupt bit, as a write overlap
// does: its mapping sends guest data into metadata, and the next write
// or allocation would build on that; on a read-only image nothing is
// written. What a read-only image knows: the header's tables and the
// snapshots' L1 tables as above; the L2 table offsets of its L1 table,
// sorted on the first checked read when the table was read whole (not
// for one read in pieces: walking it would read up to 32 MiB, so only
// the run's own L2 table is checked there); and the refcount block
// offsets, from the refcount table read once on the first checked read
// if it is at most 1 MiB (readMetaLocked). These sets cost 8 bytes per
// table, charged to the chain's metadata budget.
//
// Cost: the L2 table and refcount block offsets are kept sorted
// (image.l2Set, maintained by setL1Locked; rc.blocks, rebuilt when the
// reftable changes), so a check is a few range comparisons, one per
// snapshot, and two binary searches: BenchmarkOverlapCheck (16384 L2
// tables, 256 refcount blocks) measures a few hundred ns, no allocation,
// under the metadata lock the write holds anyway — against 100 µs and
// more for the device write. QEMU's check walks the L1 table and the
// reftable instead, O(tables) per write. Memory: 8 bytes per L2 table and
// per refcount block. A read pays one check per mapped run (one extent,
// not one per sector or cluster), under the metadata lock it takes for
// the mapping anyway, with no allocation: BenchmarkOverlapCheck measures
// 38 ns for 16384 L2 tables, and BenchmarkRead (page-cached, 2 vCPUs,
// loaded machine) showed no change beyond its noise: 4 KiB random reads
// 1.4–1.8 µs, 64 KiB sequential 6.0–7.4 µs, before and after.
//
// # Lock order
//
//	image.mu (CoMutex, metadata; rc.mu points at it)
//	├── allocation.wait (CoQueue: waited on with image.mu released by Wait)
//	├── cache.Cache of L2 tables   (not locked themselves; used only under
//	├── cache.Cache of refcounts    image.mu; dependencies between the two;
//	└── cache.Cache of L1 pieces    the last only for a large read-only L1)
//	image.zmu (sync.Mutex, the small decompressed-cluster cache; never held
//	          across a yield, taken with or without image.mu)
//	aio range lock (inside aio.File): metadata writes under image.mu may
//	          wait for a data write's range; data writes never take image.mu.
//
// A backing image is a separate driver with its own locks; it is only ever
// called with no lock of this image held.
//
// # Numbers behind the choices
//
//   - L2 cache: one table per cluster, enough tables to map the whole disk,
//     capped at 32 MiB and at least 2 tables (QEMU's Linux default). A
//     64 KiB-cluster image maps 512 MiB per L2 table, so 64 tables cover
//     32 GiB with no misses; a 4 KiB random read then costs a cache hit and
//     a pread.
//   - Memory of a backing chain (issue 7: eight layers with 32 MiB L1
//     tables took 397 MiB). Each table is in memory once: an L1 table is
//     decoded through a 64 KiB buffer; a read-only layer's L1 table larger
//     than 1 MiB (l1LoadMax) is not loaded at all but read in 4 KiB pieces
//     through a 64-piece cache (256 KiB) as lookups reach them; cache
//     memory is allocated as tables are read, not at open. The L2 caches
//     of a chain share 64 MiB (l2ChainMax): the top image gets what it
//     would alone, the layers below the rest, each at least 2 tables.
//     What each layer may hold (L1, L2 cache, snapshot table, reftable)
//     is charged to the chain, and an open that would pass 512 MiB
//     (maxChainMetadata) is refused with ErrUnsupported rather than
//     risking an OOM kill. Measured (TestChainMetadataMemory, 8 layers of
//     4 MiB L1 tables, 512-byte clusters): 15 MiB of heap read-only, 19
//     MiB with a writable top layer, against 288 MiB before; most of what
//     is left is the bookkeeping of 65536 cache slots of 512-byte tables
//     in the top two layers.
//   - Backing chains deeper than 64 images are refused (QEMU has no limit
//     but recursion this deep is a crafted image), as is any file appearing
//     twice in a chain (compared by device and inode), so a loop is an
//     error, never a hang.
//   - Four decompressed clusters are kept (plus two spare buffers, so at
//     most 12 MiB with 2 MiB clusters, allocated only once a compressed
//     cluster is read): sequential 4 KiB reads over a 64 KiB compressed
//     cluster then decompress it once instead of 16 times (at 2 MiB
//     clusters, 512 times). Measured (BenchmarkRead, page-cached 64 MiB
//     zstd image, 2 vCPUs): 2.5 µs per sequential 4 KiB read against
//     44 µs per random one, which pays a 64 KiB decompression each.
//   - Mapping cost: a 4 KiB random read of an allocated, page-cached image
//     takes 1–2 µs in all (lock, L2 cache hit, pread) and 64 KiB
//     sequential reads run at 4.8–6 GB/s, from a single coroutine.
//   - Writes (bench_write_test.go, O_DIRECT on ext4/virtio, 2 vCPUs): a
//     4 KiB in-place write into a COPIED cluster takes 100–130 µs from one
//     coroutine, all of it the device round trip (1 allocation, 16 B), and
//     12 µs per write (~83k writes/s) from 32 goroutines at once, since
//     in-place writes share only the lookup under mu; a 64 KiB write into a
//     fresh cluster takes 155–190 µs (2 allocations, ~100 B): allocation
//     and the L2 update are cache operations written back at Flush.
package qcow2
