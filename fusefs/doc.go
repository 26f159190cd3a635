// Package fusefs exposes one drivers.Driver as one regular file through FUSE.
// It is the only package that imports go-fuse (lint_test.go enforces it);
// errors cross into FUSE status codes in exactly one function, toErrno.
//
// # I/O errors are counted
//
// The handlers call toErrno through fail (failFlush for fsync and flush),
// which counts every error that reaches the caller as EIO (an atomic add)
// and keeps the last one — time, request, disk offset, the driver's text,
// at most 512 bytes — under a small leaf lock (errno.go, ioErrors). The
// first ten are logged, then at most one line a second, so a dd over a
// damaged range cannot flood the log. A successful request never touches
// the counter. Server.IOErrors reads it; Server.IOErrorNotify wakes the
// owner (cmd/imgfuse publishes the count in its state file for `imgfuse
// status`) without ever blocking a handler.
//
// # Shape
//
// fusefs speaks go-fuse's raw protocol API (fuse.RawFileSystem), not its fs
// package, for two reasons:
//   - a regular-file mountpoint (the disk itself at the mountpoint, as
//     QEMU's FUSE export does) needs a root inode that is a file; the fs
//     package forces a directory. DirectMount passes rootmode from
//     stat(mountpoint), so the kernel accepts either kind;
//   - the fs package answers GETXATTR with ENOATTR, and the kernel then asks
//     for security.capability on every write: 4k random writes fell from
//     139k to 17k IOPS in measurements on this kind of machine.
//
// The tree is either a directory (inode 1) holding the disk (inode 2,
// Options.Name) and its partitions (inodes 3…, see Partitions), or the
// root inode is the disk. It changes only when the partition table does
// (see "Partitions follow the table"), and then we tell the kernel.
// Entries and attributes are cached by the kernel for 24 h. The only attribute that
// changes, the size, changes only through requests the kernel sends and so
// knows about: SETATTR (truncate, O_TRUNC), whose reply carries the new
// size; a WRITE past the end (Options.Growable), after which the kernel
// raises its cached size itself and marks the size stale
// (fuse_write_update_attr), so the next stat asks GETATTR, which reads the
// driver's size; a ZERO_RANGE fallocate without KEEP_SIZE, likewise.
// TestGrowable checks fstat, stat by path, an older descriptor and
// SEEK_END after each kind, so no InodeNotify is needed. Times are
// Options.ModTime (the image's mtime), never "now". st_blocks changes too,
// with every write (see Allocation).
//
// # Partitions
//
// Mount reads the disk's MBR or GPT (package partition, through
// drivers.ReaderAt) when the mountpoint is a directory, and serves each
// partition as "partN" (N as the kernel numbers it), from inode 3 on. A
// table that cannot be read is logged (Options.Logger) and ignored.
//
// A partition file is a window: Read, Write, Fallocate and Lseek add the
// partition's start and clamp at its end (or at the disk's end, should the
// disk have been truncated below it); a write crossing the end writes what
// fits, one at the end is ENOSPC, a size change is refused (EPERM/EROFS),
// and it never grows, even on a growable disk. Fsync and Flush flush the
// whole driver. Opens of a partition always get FOPEN_DIRECT_IO and never
// FOPEN_PASSTHROUGH: a backing file maps file offset to offset, and a
// partition starts elsewhere. The kernel's rule against mixing passthrough
// and non-passthrough opens (fs/fuse/iomode.c) is kept per inode
// (fuse_inode.iocachectr), so a partition's opens do not disturb the
// disk's passed-through ones; TestPartitionFiles reads a partition through
// the driver while the disk is open, and TestOpenFlagsPartition checks the
// flags.
//
// # Partitions follow the table
//
// A disk repartitioned through the mount (sfdisk on the disk, or on a loop
// device over it) must not keep serving the old ranges: mkfs on a stale
// part2 would overwrite the new partition 1. A block device gets the
// kernel's re-read (BLKRRPART, which sfdisk asks for when it is done); a
// FUSE file gets no ioctl for it, so we watch the writes instead:
//
//   - The footprint: the table read is a function of the bytes the parser
//     read (and the disk's size), so readPartitions reads through a
//     recorder and keeps those ranges, merged – the MBR, each EBR of the
//     chain, the GPT header and entry array in use (the primary, or the
//     backup when the primary is damaged; the other copy cannot change the
//     outcome until the one in use breaks, and that write is seen). With no
//     table at all it is the MBR sector, so a table written on a blank disk
//     appears too.
//   - Every write, discard and zeroing, through the disk or a partition,
//     compares its range with the footprint once the driver call is done
//     (noteWrite: an atomic load and a binary search over a few ranges,
//     no allocation, TestTableChecksAllocateNothing) and on a hit sets a
//     flag. Nothing else happens on the write path.
//   - The flag is acted on (settleTable) when the writer is done: at its
//     FLUSH (close), FSYNC or RELEASE (a loop device's file is released
//     without a FLUSH; its flushes arrive as FSYNC) – or before the next
//     LOOKUP, OPENDIR, READDIR or OPEN, whichever comes first. That is when
//     the kernel re-reads a block device's table after sfdisk. The table is
//     read again through the driver, off the write path.
//   - A partition whose number and range are unchanged keeps its inode, so
//     its open handles go on working (its type or name may change). Any
//     other gets an inode number never handed out before (diskFS.nextIno),
//     so the kernel's old inode, and every handle on it, can never reach a
//     new range: I/O on it answers ESTALE, as do GETATTR and OPEN (on which
//     the kernel retries the path lookup once, which finds the new file).
//     Partition I/O holds diskFS.ioMu for reading from finding its range
//     to the end of its driver calls, and publishing a new table takes it
//     for writing: once settleTable returns, no request is still writing
//     an old range.
//   - The kernel is told: EntryNotify for each name whose inode changed,
//     appeared or went away (a new partition may have a cached negative
//     entry), InodeNotify on the directory (its cached listing: OpenDir
//     lets the kernel keep it) and on the disk (its attribute timeout
//     depends on whether there are partitions). From FLUSH, FSYNC and
//     RELEASE this is done before answering, so `ls -l` right after sfdisk
//     shows the new table. LOOKUP and READDIR hold the directory's lock in
//     the kernel while they wait for us, and invalidating an entry takes
//     that lock, so there the answer comes from the new table at once and
//     the invalidation from a goroutine (OPENDIR drops KEEP_CACHE when the
//     table just changed, so the listing it opens is not the cached one).
//     DeleteNotify is not used: it locks the child inode, which an FSYNC on
//     that very partition holds.
//
// Alternatives weighed: reading the table at every FLUSH/FSYNC (a read of
// up to 1 MiB + 34 sectors through the driver on every fsync of any file,
// where today the check costs a comparison per write); comparing the table
// bytes themselves (the footprint says the same without a copy); keeping
// the numbers and bumping a generation per partition (the kernel would
// replace its inode, but a READ or WRITE carries only the node ID, so we
// could not tell an old handle's request from a new one's; a fresh number
// says it by itself, and 64 bits never run out).
//
// # Allocation: st_blocks
//
// st_blocks tells du how much of the file is stored, and cp --sparse=auto
// and tar --sparse whether to look for holes (SEEK_DATA) at all. The
// simple answer, size/512, makes every disk look fully allocated: du of an
// empty 1 TiB image says 1 TiB, and cp skips its SEEK_DATA path and reads
// a terabyte of zeros. So st_blocks is the driver's drivers.Allocator
// estimate (drivers.AllocatedOf: the size for a driver without one), in
// 512-byte units rounded up, never more than the size's. What the estimate
// counts is each driver's to say:
//
//   - raw: the image file's st_blocks (one fstat), clamped to the size;
//     a block device counts as full;
//   - qcow2: each layer's file allocation (one fstat per layer) less the
//     metadata it is known to hold (header, L1, refcount and snapshot
//     tables, one cluster per L2 table, the refcount blocks for that much
//     file), with an external data file that file's allocation; the
//     layers of a chain summed; the total clamped to the size. It counts
//     clusters freed by a discard until they are reused (nothing punches
//     them out of the file), snapshot-only clusters and ranges stored in
//     several layers too much, compressed clusters at their compressed
//     size.
//
// An empty 1 TiB qcow2 image (qemu-img create: 208 KiB of metadata)
// reports 0 blocks, a fully written disk its size, and writing N MiB
// through the mount adds N MiB (tests/blocks_test.go checks du, cp
// --sparse=always against qemu-img convert, a raw sparse file and an
// overlay over a full base). QEMU's FUSE export reports the image file's
// own allocation, metadata and all, and nothing of the backing chain
// (QSD 7.2: 208 KiB for the empty 1 TiB image, 196 KiB for an empty
// overlay over a full 32 MiB base, which imgfuse shows as 32 MiB).
//
// The options weighed: an exact count of data clusters needs every L2
// table of every layer (2048 tables, 128 MiB of reads, for a full 1 TiB
// qcow2 with 64 KiB clusters) at open or in the background, then a count
// kept by every allocation and free under the metadata lock, and for a
// chain the union of the layers, i.e. a walk of all of them; the refcount
// blocks give the file's used clusters without the chain (32 MiB of reads
// for the same image). The file's own allocation needs neither, and is
// right wherever the file is: a preallocated image, a sparse raw file, a
// qcow2 file whose holes stayed holes.
//
// Cost, the handler alone (BenchmarkGetAttr, fillAttr, 2 vCPUs):
// 40 ns for a driver without Allocated, 0.8–1.5 µs for a raw or qcow2
// image (one fstat), 3–3.8 µs for a chain of three layers; a stat that
// reaches the daemon (statx with AT_STATX_FORCE_SYNC) takes 22–45 µs
// either way, the FUSE round trip. GETATTR is rare anyway: attributes are
// cached and only a write makes the kernel ask again.
//
// Freshness: the kernel marks st_blocks stale after each write, fallocate
// and truncate it sends (fuse_write_update_attr, FUSE_STATX_MODIFY), so
// the next stat of the written file asks GETATTR. Writes through one file
// change the others' st_blocks, which the kernel cannot know: in a
// directory mount with partitions, the disk and the partition files get a
// 1 s attribute timeout instead of 24 h (the directory keeps 24 h).
//
// Partitions: a partN file reports its share of the disk's allocation,
// allocated × partition size / disk size: exact for an empty and a full
// disk, never more than the partition, but an even spread otherwise (a
// full partition of a half-empty disk shows half full). The exact
// intersection would walk the partition's extents (BlockStatus) on every
// GETATTR – thousands of L2 lookups on a large disk – which is what
// st_blocks must not cost. An underestimate only sends cp to SEEK_DATA,
// which answers exactly.
//
// # Serving
//
// go-fuse mounts the filesystem and answers INIT (fuse.NewServer), but its
// reader loop does not serve it. The process's event loops do
// (coroutine.Loops, one per CPU; loop.go), as QEMU 11's FUSE export does
// with one cloned /dev/fuse per thread: Mount opens one clone of the
// connection per loop (FUSE_DEV_IOC_CLONE), non-blocking, in that loop's
// epoll with EPOLLEXCLUSIVE (the clones share one request queue; a request
// wakes one sleeping loop, not all). The loop reads requests until EAGAIN
// and starts each in a coroutine of its own (Loop.Go), which runs at once
// up to its first wait; go-fuse's exported fuse.ProtocolServer (one per
// loop, INIT replayed into it) decodes the request, calls the handler and
// encodes the reply into our buffers; the reply goes out with one writev
// on the loop's clone. The driver's AIO goes into the loop's own context,
// one io_submit per loop iteration, and its completions come back through
// the same epoll. A request is never handed to another goroutine or
// thread. If the clones cannot be made, the mount fails.
//
// INTERRUPT is dropped: no handler looks at go-fuse's cancel channel, and
// a protocol server only knows its own loop's requests, so it would answer
// EAGAIN and the kernel would requeue the interrupt for as long as the
// request runs. An interrupt needs no reply.
//
// Measured with measure.sh-style runs (mount, drop caches, fio libaio
// --direct=1 --rw=randread --bs=4k --runtime=5, daemon CPU and context
// switches of all its threads from /proc, unmount) on a preallocated 512
// MiB qcow2 image on ext4, 2 vCPUs, the previous shape (a netpoller reader
// handing the reading on, an AIO leader/reaper) and the loops alternated,
// two rounds, while the full test suite ran (load average 3–4):
//
//	                     netpoller + reaper   event loops
//	QD1  IOPS            4.7–5.1k             5.3–6.8k
//	     CPU µs/IO       135–153              85–102
//	     ctx switches/IO 4.6–4.8              2.7–3.3
//	QD32 IOPS            15.2–20.0k           20.7–29.0k
//	     CPU µs/IO       39–45                20–27
//	     ctx switches/IO 1.05–1.31            0.30–0.64
//
// Per thread at QD1: the serving loop's thread switches 1.8 times per
// request (its two sleeps, and preemption by the test suite's work); most
// of the rest is sysmon and the garbage collector's workers.
//
// # FUSE-over-io_uring (--io-uring)
//
// Options.IOURing (imgfuse mount --io-uring) serves the connection through
// FUSE-over-io_uring (Linux 6.14+, fs/fuse/dev_uring.c) where the kernel
// offers it: the fuse module's enable_uring parameter, off by default and
// never set by imgfuse (tests and bench/run turn it on while they need it,
// internal/testenv.URingLock). The INIT reply then carries
// CAP_OVER_IO_URING, and the kernel holds new requests back until every
// possible CPU's queue has a ring entry. Each loop owns one ring
// (internal/uring, SQE128) and serves the queues q with q mod len(loops)
// equal to its index: 64 entries per queue, each a 288-byte header and a
// payload buffer of the largest request (1 MiB + the WRITE header, mapped
// outside the Go heap, page-aligned, so READ data goes from the O_DIRECT
// image read straight into it and WRITE data straight out of it). A
// request arrives as the completion of an entry's IORING_OP_URING_CMD,
// laid out as header, per-opcode header and payload, which is the
// /dev/fuse layout cut in three: the protocol server takes it as an iovec
// unchanged. The reply goes back in the same entry with COMMIT_AND_FETCH,
// which re-arms it; the loop submits the iteration's replies in one
// io_uring_enter (an idle hook). The kernel delivers a request by task
// work on the thread that submitted the entry, the loop's: it interrupts
// the loop's epoll_wait, and the loop's poller finds the completion in
// memory (uring.go). Requests go to the queue of the CPU their caller runs
// on, so no loop is woken for another's request (on /dev/fuse, EPOLLEXCLUSIVE
// still woke a second loop for about half of the QD1 requests).
//
// What io_uring does not carry stays on /dev/fuse: FORGET, INTERRUPT, and
// everything if a registration is refused (the kernel then turns io_uring
// off for the connection and serves /dev/fuse, which the loops keep
// reading; the mount logs why). At unmount every entry completes with
// ENOTCONN, and the loop closes its ring when the last one has; the clone
// it was registered on closes after it.
//
// Measured alternated on a quiet moment of the 2-vCPU development machine
// (mount, drop caches, fio libaio --direct=1 --rw=randread --bs=4k
// --runtime=5 on a preallocated 1 GiB qcow2, daemon CPU time and context
// switches of all its threads from /proc; QSD 7.2 with aio=native,
// cache.direct=on):
//
//	                  QSD 7.2        event loops    loops + io_uring
//	QD1  IOPS         11.5–11.7k     10.7–10.9k     11.8–12.4k
//	     CPU µs/IO    53.5–54.5      58.1–59.6      52.0–53.4
//	     ctxsw/IO     1.98           2.23–2.28      2.19–2.21
//	QD32 IOPS         20.7k          47.9k          62.3k
//	     CPU µs/IO    47.6           21.2           15.3
//	     ctxsw/IO     0.01           0.17           0.04
//
// Tried and not kept: pinning each loop to the CPU of its queue (no faster
// at QD1, 12% slower at QD32: a loop could no longer run where a CPU was
// free) and spinning on the AIO completion ring for 20–120 µs before
// sleeping (1.25–1.4 context switches per QD1 read, but 75–120 µs of CPU
// for it against 52 and no steady gain in IOPS). A profile of the QD1
// daemon (perf record -g) shows where the time goes on this machine, a
// PVM guest: 39% in pvm_irq_enable under finish_task_switch (the cost of
// a context switch), 23% in iowrite16 (the virtio queue notification of
// each io_submit); the protocol, the driver and Go's runtime are the
// remaining third. QEMU pays the first two the same way, which is why the
// single small read is within ±10% of QEMU's either way.
//
// # Concurrency
//
// Requests are handled concurrently: each is a coroutine on the loop that
// read it, and a loop interleaves its coroutines at their waits. Handlers
// are methods of reqFS, which pairs diskFS with the coroutine of the
// request being served (set by the loop before each HandleRequest and
// copied by the handler before anything can yield). diskFS has no mutable
// state but its partition table (every other field is set before serving:
// backingID and notify just after the mount, before the first request is
// read), so handlers share little but the driver, which serialises what it
// must with its CoMutex (a waiter on another loop is woken there).
//
// Nothing a handler does may block its loop's thread: re-reading the
// partition table (reads through the driver with coroutine.Run, ioMu for
// writing, kernel notifications) runs through coroutine.RunInWorker, and so
// does waiting for ioMu for reading while a new table is being published
// (a reader suspended on this very loop may be what the writer waits for);
// the common case, no table change, is an atomic load and TryRLock.
//
// The partition table (diskFS.table) is an immutable value behind an
// atomic pointer, replaced whole. Lock order:
//
//	diskFS.refreshMu (one re-read at a time; guards nextIno; workers only)
//	  diskFS.ioMu (write side: publishing a table; workers only)
//	diskFS.ioMu (read side: a partition request, across its driver calls)
//	  the driver's locks (qcow2's CoMutex, aio's range lock)
//
// No lock is held while the kernel is notified.
//
// Buffers: a READ's output buffer and a WRITE's payload belong to the
// loop's request and are reused once its coroutine has replied. Read fills
// the output buffer and hands it back (fuse.ReadResultData); Write's driver
// call completes before the handler returns. Neither is referenced
// afterwards.
//
// # The read fast path
//
// If the driver implements drivers.DirectReader (raw images), Read first
// offers the request to ReadDirect, which reads aligned requests straight
// into the (page-aligned) reply buffer with one iocb; only requests it
// declines go through the driver's ReadAt. Measured, in the previous shape
// (where the fast path also skipped a coroutine), with fio (libaio,
// --direct=1, 6 s) on a 1 GiB raw image on ext4 through the mount, 2 vCPUs:
//
//	                     fast path   always a coroutine   the image itself
//	4k randread QD32     37.8k IOPS  35.1k IOPS           100k IOPS
//	4k randread QD1       9.4k IOPS   9.1k IOPS           18.6k IOPS
//
// The coroutine costs little next to a FUSE round trip (~45 µs here): the
// fast path saves a few percent and is kept because it is free. The bypass
// that pays for raw images is passthrough (below), where read-only opens
// never reach the daemon at all; the fast path serves the reads of
// descriptors opened for writing.
//
// # Writes: where the time goes
//
// A 4 KiB random O_DIRECT write (fio libaio, fully allocated 1 GiB raw or
// qcow2 image on ext4 on virtio) reaches the daemon as soon as the kernel
// has it, costs one io_submit and no copy beyond moving its 4 KiB out of
// the reader's big buffer, and holds no lock across the device write:
//
//   - FOPEN_PARALLEL_DIRECT_WRITES is set on every open (Options chosen,
//     below). Without it the kernel takes the inode lock exclusively for
//     each direct write and the writes reach the server one at a time,
//     whatever the queue depth: TestParallelDirectWrites sees 1 of 4
//     concurrent O_DIRECT writes inside the driver at once without the
//     flag, 4 of 4 with it. strace -f of the daemon under fio QD32 shows
//     up to 32 WRITEs in flight and no other request between them (no
//     GETATTR, xattr or flush).
//   - The payload starts writePayloadOff (80) bytes into the request;
//     loop.go lays out its read buffers so that it lands 4096-aligned, and
//     aio writes it as it is (the profile shows writeAligned, never a
//     bounce). A 4 KiB write is copied once, into a medium buffer
//     (memmove: ~1% of the daemon's CPU).
//   - raw: WriteAt, aio's range lock, io_submit. qcow2: the metadata lock
//     only around the L2 lookup of an in-place write, the data write
//     without it. The write planner takes 2% of the daemon's CPU, the
//     range lock 0.5%, CoMutex and the coroutine less (measured in the
//     previous shape, before the event loops).
//
// Daemon CPU by part in the previous shape (a netpoller reader, an AIO
// reaper goroutine; what follows motivated the event loops), raw / qcow2,
// fio randwrite 4k QD32 (perf record -g -p DAEMONPID, children): io_submit, i.e. ext4's O_DIRECT write and the
// virtio kick, which QSD's io_submit does as well: 25% / 20%; go-fuse's
// decoding 4%; the handler, driver and aio besides io_submit 6% / 8%;
// reading requests from /dev/fuse 8% / 9%; the reply writev 9%; the aio
// reaper 8%; the Go scheduler parking and finding goroutines (park_m,
// findRunnable: futex sleeps of idle threads, netpoll) 24% / 23%, readying
// them (ready, wakep) 5%; sysmon 8% / 12%. Context switches (perf record
// -e sched:sched_switch): sysmon's 20 µs ticks 0.7–1.2 per write, idle
// threads parking (stopm) 0.2–0.8, the netpoll wait and, at QD1, the
// leader's io_getevents about 1 each. What is left to cut is the runtime's
// share: one goroutine hand-off per request (the reader's, serveLoop) and
// one per completion (the reaper's Wake), each of which may wake an idle
// thread.
//
// Against QSD 7.2 (aio=native, cache.direct=on) in the same run: a script
// that mounts, drops the page cache, runs fio --direct=1 --ioengine=libaio
// --bs=4k --rw=randwrite --iodepth=1|32 --time_based --runtime=5, reads the
// daemon's CPU time and context switches (all threads) from /proc and
// unmounts; imgfuse and QSD alternated, 5 rounds, load average 5–13.
// Median IOPS (range), median daemon CPU µs and context switches per
// write, and imgfuse/QSD of each round:
//
//	                imgfuse                   QSD 7.2                  imgfuse/QSD per round
//	raw QD32     11.2k (6.9–16.2k) 56 2.17   8.9k (4.6–13.8k) 70 2.90   1.66 0.81 1.28 1.49 1.07
//	raw QD1       4.1k (2.3–5.1k) 100 4.64   3.4k (1.3–4.5k) 112 4.03   1.47 0.87 1.35 1.71 1.28
//	qcow2 QD32    8.1k (6.8–14.7k) 67 2.58   7.9k (4.3–8.8k)  66 2.94   0.99 1.66 1.03 1.59 1.14
//	qcow2 QD1     4.5k (2.4–5.0k) 104 4.67   4.1k (2.3–5.5k) 109 4.02   0.91 1.18 1.09 0.86 1.16
//
// The shared disk sets most of the noise: fio on the image file itself
// did 3.3–3.8k writes/s at QD1 (220–260 µs each) and 10.7–12.1k at QD32
// between these rounds, and 12.2–30.2k at QD32 in 4 later rounds
// alternated with imgfuse (7.7–10.8k) and QSD (5.1–8.3k). At QD1 the
// device write is most of every target's time, so a 1.5× lead there would
// need QSD to add half a device write of its own.
//
// Tried and rejected: GOMAXPROCS=1, which spares waking idle threads
// (imgfuse with and without it, alternated, 3 rounds): daemon CPU per
// write at QD1 fell from 86–107 to 53–78 µs, but QD32 IOPS fell to
// 0.47–0.99× (0.54–0.72× on qcow2), and QD1 IOPS moved 0.87–1.43×,
// within the noise. Two serve loops, each reading its own clone of the
// connection (requests from one shared queue, two readers at once; each
// loop replies on its own descriptor, as the kernel requires): raw QD32
// IOPS 1.02× of one loop (median of 10 alternated rounds, 0.78–1.91×),
// qcow2 QD32 0.76–1.30× (4 rounds): request intake is not the limit
// either.
//
// What would pay next: completing a write without a goroutine, as QEMU's
// event loop does. The reader submits an aligned, in-range raw write (or a
// qcow2 in-place write whose L2 entry is cached) itself with a completion
// callback and goes back to reading; whoever reaps the completion writes
// the reply: no hand-off to another reader, no coroutine, no Wake. A
// prototype for raw images (WRITE decoded in serveLoop before go-fuse, a
// non-blocking range-lock acquire, the reply written from the callback),
// passing fio --verify=crc32c, against this code, alternated (either
// first), 10 rounds, raw image; proto/this per round, median:
//
//	QD32  IOPS 1.03 (0.67–1.46)   daemon CPU/write 0.69 (0.55–0.96)   ctx switches/write 0.53
//	QD1   IOPS 1.02 (0.74–1.24)   daemon CPU/write 0.85 (0.71–0.94)   ctx switches/write 0.82
//
// A third of the daemon's CPU per write saved at QD32 is not a
// single IOPS more here: the daemon's CPU is not what limits a 4 KiB
// write on this machine (nor the device: 1.3–2.9× as many), but
// the rest of the round trip on two vCPUs shared with other work: fio's
// side of FUSE in the kernel and the wake-ups between fio, the daemon and
// the device's interrupts, which every daemon pays. So it was not kept. Done properly it needs:
// INTERRUPT for such a request answered by us (go-fuse answers EAGAIN for
// a request it does not know, and the kernel requeues the interrupt until
// the write completes), callbacks kept out of engine.mu (drainLocked wakes
// early completions and refused iocbs under it), a slow path for short
// writes, partitions and growth, and the qcow2 in-place case (a
// non-blocking metadata lookup).
//
// # Passthrough (raw images)
//
// Linux ≥ 6.9 (CONFIG_FUSE_PASSTHROUGH) lets a FUSE server name a backing
// file for an open file; the kernel then does that file's reads and writes
// (and memory maps) on the backing file itself, at native speed, without a
// request to the server. The kernel maps the FUSE file 1:1 onto the one
// backing file, so only a driver whose disk is its image file byte for byte
// can use it: drivers.FileBacked, implemented by drivers/raw. Mount decides
// once, after INIT and before serving:
//
//   - it registers the image file with FUSE_DEV_IOC_BACKING_OPEN
//     (fuse.Server.RegisterBackingFd); the ID lives as long as the
//     connection. The driver lends aio's descriptor for the length of the
//     call (aio.File.LendFd): no other package holds an image descriptor;
//   - if that is refused – a kernel without passthrough, no CAP_SYS_ADMIN
//     (EPERM), an old kernel (ENOTTY), an image that is not a regular file
//     (a block device), a filesystem stacked too deep (ELOOP) – the mount
//     serves as before and Server.Passthrough says why; imgfuse logs
//     "passthrough: on" or "passthrough: off: <why>" and records it in its
//     state file. Options.NoPassthrough (--no-passthrough), and drivers
//     that are not FileBacked (qcow2), do not even negotiate
//     CAP_PASSTHROUGH, so such a mount is exactly what it was before.
//     MaxStackDepth is 2 so that an image on overlayfs can back a mount.
//
// Which descriptor: the kernel does no I/O on the registered file. Each
// passthrough open opens the image anew (backing_file_open) with the
// opener's flags and the daemon's credentials, and the opener's O_DIRECT
// decides buffered or direct I/O. So the O_DIRECT descriptor aio holds
// serves buffered readers as well (checked: cmp, dd bs=4k, one-byte reads,
// O_DIRECT reads), and no second, buffered descriptor is needed. On a
// read-only mount it is aio's O_RDONLY descriptor; that mount accepts no
// open for writing, so the kernel never opens the image for writing.
//
// Which opens: reads are passed through, writes are not. An open for
// reading only gets FOPEN_PASSTHROUGH alone, so FOPEN_DIRECT_IO (which
// disables passthrough) is not set on it. An open for writing gets
// FOPEN_DIRECT_IO|FOPEN_PASSTHROUGH: direct I/O overrides passthrough for
// read and write (fs/fuse/file.c), so its reads and writes still reach the
// driver, and only its mmap goes to the image file. Both name the backing
// file because the kernel fails (EIO) any open of an inode without
// FOPEN_PASSTHROUGH while another open of it is passed through
// (fs/fuse/iomode.c). Writes stay with the driver because the kernel bounds
// a passed-through write only by the backing filesystem's limits and the
// writer's RLIMIT_FSIZE: a write past the end of the disk would extend the
// image file, where a non-growable disk must answer ENOSPC (or write what
// fits), and on a growable disk the driver's size (GETATTR, the truncate
// and discard bounds) and aio's cached file size would go stale behind its
// back, so a later truncate could cut off data the kernel wrote. No kernel
// interface sets a per-file size limit for a regular file, so every mount
// kind keeps the driver's write path; read-only opens – what cmp, dd, fio
// --readonly, qemu-img, e2fsck -n and a read-only loop device use – are
// passed through on every kind of raw mount.
//
// What it changes, each checked by tests (fusefs/passthrough_test.go,
// tests/passthrough_test.go):
//   - Page cache: passed-through buffered reads use the image file's page
//     cache – the same inode the driver writes. The driver's O_DIRECT
//     writes invalidate (and unmap) the cached pages they cover, fallocate
//     (punch hole, zero range) drops them, and O_DIRECT reads and
//     read-modify-writes write back dirty mapped pages first. So a
//     passed-through descriptor, buffered or O_DIRECT, and a shared
//     mapping see every write, hole and growth at once: the write workload
//     compares them with the model after every step.
//   - mmap: a shared mapping maps the image file's pages (the
//     CAP_DIRECT_IO_ALLOW_MMAP path is no longer used for these files);
//     pages dirtied through it belong to the image's filesystem, which
//     writes them back without us, so the reclaim deadlock noted below
//     cannot form. fsync and fdatasync on the disk still reach the driver,
//     whose fdatasync of the image file writes those pages back (checked
//     with cachestat(2): no dirty or writeback page left).
//   - Size: truncate (SETATTR) still goes to the driver; growth shows
//     through descriptors opened before it; shrinking is still refused.
//   - Loop devices: a read-write loop device opens the disk for writing
//     and takes the driver's path as before; a read-only one (losetup -r,
//     mount -o loop,ro) is passed through, buffered or --direct-io=on.
//     mkfs.ext4 and writes through a direct-I/O loop device, then a
//     read-only loop mount and e2fsck -fn through passthrough, are clean.
//   - Liveness: a passed-through descriptor keeps reading after the daemon
//     stopped or died, and a shared writable mapping made through an open
//     for writing keeps writing the image file until it is unmapped. The
//     kernel keeps a reference to the registered open file – aio's own,
//     which carries QEMU's image locks (OFD locks live as long as the open
//     file) – while the connection or any passed-through open lives, so
//     after a kill -9 the image stays locked against QEMU until those
//     descriptors are closed and the dead mount is cleared (checked by
//     hand with qemu-io); a clean unmount releases everything before the
//     daemon exits. The end-to-end test uses the first as its proof that
//     passthrough is on: with the daemon stopped (SIGSTOP) a read on a
//     descriptor opened before completes, and waits without passthrough.
//
// Numbers: fio 4k random reads of a 1 GiB raw image (random data) on ext4
// on virtio, 2 vCPUs shared with other work (load average 4–6), page cache
// dropped before each run, the three targets alternating, four rounds of
// 6 s (IOPS, mean of the rounds, then the rounds):
//
//	fio --name=b --filename=TARGET --direct=1 --ioengine=libaio --bs=4k \
//	    --rw=randread --iodepth=32|1 --readonly --time_based --runtime=6
//
//	          passthrough                    --no-passthrough              the image file
//	QD32   33.0k (17.9 41.9 30.3 42.0k)   13.7k (16.5 14.2 12.6 11.4k)   32.0k (25.7 38.0 34.2 30.3k)
//	QD1     9.2k (9.2 10.1 11.2 6.2k)      3.8k (3.8 4.5 4.2 2.7k)        8.7k (9.6 8.9 4.4 12.2k)
//
// Passthrough reads as fast as the file itself (103% and 105% of it, within
// the run-to-run noise of the shared disk); without it the mount does 43%.
// Buffered dd bs=4k of 256 MiB, cache dropped: 429 MB/s through
// passthrough (readahead on the image file), 13.4 MB/s without, 334 MB/s
// from the file. Script: mount, run, unmount, for each round and target.
//
// # Options chosen, and why
//
//   - FOPEN_DIRECT_IO on every open not passed through (above), with
//     FOPEN_PARALLEL_DIRECT_WRITES (as QEMU's newer FUSE export does):
//     every read and write reaches the driver, so the image data is cached once (by the consumer, e.g. the
//     loop device or the guest filesystem) instead of twice, and the kernel
//     never holds dirty pages of the disk (the memory-reclaim deadlock of a
//     FUSE server under a loop device feeds on those). The price is paid by
//     small buffered reads, which lose readahead: dd bs=4k reads 47 MB/s
//     (vs 609 MB/s with the page cache), bs=128k 647 MB/s, bs=1M 862 MB/s
//     (vs 673 MB/s with the page cache); O_DIRECT users see no difference.
//     CAP_DIRECT_IO_ALLOW_MMAP is negotiated so that mmap(MAP_SHARED) of the
//     disk still works (kernel ≥ 6.6; MAP_PRIVATE works regardless).
//     FOPEN_KEEP_CACHE is never set for the disk: it would serve stale pages
//     of a writable image.
//   - CAP_ASYNC_DIO: without it the kernel runs each O_DIRECT aio on a FUSE
//     file synchronously, so fio QD32 becomes QD1 (4k random read 19.9k vs
//     92.5k IOPS; 1 MiB sequential 2.6 vs 6.0 GB/s on a RAM-backed file).
//   - MaxWrite 1 MiB: 1 MiB READ and WRITE requests instead of 128 KiB.
//     MaxBackground 64 (default 12): it also bounds async direct I/O in
//     flight in the kernel.
//   - DisableXAttrs: see above. DisableSplice: go-fuse only splices
//     file-descriptor results, but tries a pipe for every READ first (and
//     logs an error for every 1 MiB read, which does not fit a pipe).
//   - DirectMount (mount(2) ourselves; go-fuse falls back to fusermount3
//     when that is refused), so a regular-file mountpoint works as root.
//     fusermount3 takes a regular file too, when the user may write it.
//     go-fuse runs fusermount3 with the process's stderr and reports only
//     its exit code; newServer points descriptor 2 at a pipe while go-fuse
//     mounts (fusermount.go, serialised by mountMu), turns fusermount3's
//     lines into a *FusermountError ("fusermount3: user has no write
//     access to mountpoint /mnt") and passes anything else written
//     meanwhile on to the real stderr. A daemon's stderr is a log file or
//     /dev/null, so without this the reason was lost.
//     default_permissions: the kernel enforces the file mode, which matters
//     with AllowOther.
//   - Open for writing on a read-only mount fails with EROFS even for root,
//     so `mount -o loop` falls back to read-only by itself.
//   - Fsync and Flush never answer ENOSYS (the kernel would stop sending
//     them for good): a failed driver Flush answers EIO (ENOSPC, EDQUOT and
//     EROFS pass as they are), so fsync(2), fdatasync(2) and close(2) report
//     it. Flush (sent on every close) flushes the driver only for
//     descriptors opened for writing.
//   - Fallocate: PUNCH_HOLE|KEEP_SIZE → Discard, ZERO_RANGE → WriteZeroes
//     (what a loop device sends for discard and write-zeroes); allocation
//     (mode 0) → EOPNOTSUPP. Lseek answers SEEK_DATA/SEEK_HOLE from
//     BlockStatus (an extent without ExtentData is a hole).
//   - A write that crosses the end of the disk writes what fits and reports
//     a short count, as a block device does; a write at or past the end
//     fails with ENOSPC. With Options.Growable such writes go to the driver
//     whole and grow the disk, and a ZERO_RANGE without KEEP_SIZE past the
//     end grows it through Truncate. An open with O_TRUNC, like any size
//     change, is passed to the driver's Truncate (drivers refuse to shrink:
//     a shell's '>' must not destroy a disk).
//
// # Readiness
//
// fuse.NewServer mounts and answers INIT before returning; Mount then
// serves in a goroutine and returns once stat(mountpoint) answers with our
// root inode on a new device. Server.WaitMount is not used: it opens a
// helper file inside the mountpoint, which cannot work for a file
// mountpoint. Instead Mount polls the disk once with poll(2): the kernel's
// POLL probe is answered ENOSYS and never sent again. Without that, the
// first os.Open of the disk in the serving process registers it with the
// runtime's epoll, whose epoll_ctl sends POLL from a thread the runtime
// considers running, and a garbage collection starting then waits for that
// thread while the server waits for the collection.
package fusefs
