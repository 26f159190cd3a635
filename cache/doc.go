// Package cache is a fixed-size cache of metadata tables (qcow2 L2 slices
// and refcount blocks), modelled on QEMU's Qcow2Cache but knowing nothing of
// qcow2: a table is tableSize bytes at a file offset, read and written
// through a Backend.
//
// # What it owns
//
//   - The tables' memory, aligned to 4096 so tables can be read and
//     written with O_DIRECT, allocated 256 KiB at a time as slots are
//     first used: a cache sized to map a large disk (32 MiB of L2 tables)
//     costs only what the image's tables fill, which for a sparse layer of
//     a backing chain is a few tables. The memory is mapped outside the Go
//     heap (see alignedSlab): as heap it raised the collector's goal by the
//     cache's size, and garbage grew to match.
//   - Pinning: Get/GetEmpty pin a table, Put unpins it. A pinned table is
//     never evicted. A table's memory (Table.Bytes) is only valid while it
//     is pinned: once unpinned its slot may be reused for another offset at
//     the next miss.
//   - LRU replacement among unpinned tables; free slots are used first.
//   - Dirty tracking and write-back: MarkDirty, Write, Flush, and the
//     write-back of a dirty victim on eviction. A failed write leaves the
//     table dirty, so a later Write retries it.
//   - Write ordering: SetDependency(dep) flushes all of dep (write + Sync)
//     before any table of c is written (refcount blocks before the L2 tables
//     that point at the clusters they count); DependOnFlush makes a Sync
//     happen before c's next write (data written before the L2 entry that
//     publishes it). Both are dropped once satisfied, as in QEMU.
//
// # Concurrency
//
// A Cache is not internally locked. Every method, and every access to a
// table's bytes, must be made by a coroutine holding the owning image's
// metadata CoMutex. Backend I/O may yield with that lock held (metadata I/O
// under the lock), so while one coroutine waits for a table read no other
// coroutine can touch the cache — which is what makes an unlocked cache
// safe: the lock serialises all users, and yields only happen inside
// Backend calls. (QEMU 4.1 corrupted images when one path read refcounts
// without the lock: two coroutines used one cache slot for different
// tables.)
//
// Lock order: the cache takes no locks; Backend calls are made with the
// caller's metadata lock held and must not try to take it.
//
// # Costs
//
// Every guest read maps through Get, so a hit must be cheap: the index is an
// open-addressed hash table at most half full (one or two probes, no
// allocation), and the LRU is an intrusive list updated in O(1) by Get and
// Put. QEMU instead scans the whole cache on a miss and keeps an LRU counter
// that eviction scans for; our miss costs O(1) bookkeeping plus the I/O.
// BenchmarkGetPutHit measures a hit: ~7 ns for Get+Put in a 1024-table
// cache on the development machine, allocation-free.
//
// # Invariants
//
// Building or testing with -tags invariants turns on self-checks of pin
// counts, the LRU list, the index and the dirty count after each operation,
// and turns misuse (Put of an unpinned table, Discard of a pinned one) into
// panics. Without the tag the checks compile away.
package cache
