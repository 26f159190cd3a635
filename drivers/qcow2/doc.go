// Package qcow2 is the qcow2 image driver: it opens a qcow2 file (v2 or v3),
// follows its backing chain and external data file, and serves the virtual
// disk through the drivers.Driver contract.
//
// # Files and their concerns
//
//   - layout.go: on-disk constants and the parsed header struct.
//   - header.go: header and extension parsing and validation (parseHeader).
//   - qcow2.go: Format (name, probe, open), the image type, open-time setup
//     (header, L1, L2 cache, backing file, data file, snapshot selection), the
//     Driver methods that are not reads, Info and Snapshots.
//   - cluster.go: guest → host translation (mapLocked), cluster and
//     subcluster types, L2 entry validation, the compressed descriptor.
//   - read.go: ReadAt and BlockStatus: map under the lock, then data I/O
//     (image or data file, backing file, zeros, decompression) without it.
//   - backing.go: opening the backing chain (loop and depth checks) and the
//     external data file; reads from the backing layer.
//   - compress.go: deflate and zstd decompression of one cluster.
//   - snapshot.go: the internal snapshot table.
//   - info.go: the format-specific part of Info.
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
// compressed cluster). Decompression runs in a worker goroutine
// (coroutine.RunInWorker) so a 2 MiB zstd cluster neither holds the
// metadata lock nor stalls the goroutine driving the coroutine.
//
// # Lock order
//
//	image.mu (CoMutex, metadata)
//	└── cache.Cache of L2 tables (not locked itself; used only under image.mu)
//	image.zmu (sync.Mutex, the small decompressed-cluster cache; never held
//	          across a yield, taken without image.mu)
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
//
// The driver is read-only for now: writes, discards, zero writes and
// truncation return drivers.ErrReadOnly.
package qcow2
