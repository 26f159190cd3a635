// Package aio owns the image file descriptors: it opens image files, moves
// their data with Linux native AIO (io_setup / io_submit / io_getevents) on
// an O_DIRECT descriptor, and falls back to plain pread/pwrite where direct
// I/O is unavailable. No other package touches an image's descriptor; the
// few other system calls drivers need on it (ftruncate, fallocate, lseek
// SEEK_DATA/SEEK_HOLE, OFD locks) are methods of File too. The one
// exception is LendFd, which lends the descriptor for the length of a call
// to a caller that hands it to the kernel without doing I/O on it (FUSE
// passthrough registers the image file as a backing file).
//
// # What Open accepts
//
// Only regular files and block devices. Anything else named as an image or
// backing file (a FIFO, a character device such as /dev/zero, a directory,
// a socket, a symlink to one) is refused with a *NotImageError by kind. The
// check must not block: a plain open of a FIFO waits for a writer for ever,
// before any daemon exists. Files are opened with O_NONBLOCK, checked with
// fstat on the descriptor (a stat of the path first could be raced), and
// then switched back to blocking I/O (filetype.go). OpenHead does the same
// for callers that read a file's head to probe its format.
//
// # Engines
//
// Open tries O_DIRECT first and keeps it when the file can really do direct
// I/O: statx reports STATX_DIOALIGN with a non-zero offset alignment (Linux
// ≥ 6.1), or the file is a block device (BLKSSZGET gives the alignment), or
// statx says nothing and the filesystem is not tmpfs/ramfs (4096 is assumed).
// A one-block probe read must succeed, and the process-wide AIO context must
// exist. Otherwise, or with Options.NoDirectIO, the fallback engine serves
// the file with pread/pwrite on a buffered descriptor; File.Engine says which
// engine was chosen and why. tmpfs accepts O_DIRECT since Linux 6.6 but
// serves it from the page cache, so io_submit would run each request
// synchronously: it gets the fallback.
//
// The AIO engine (engine.go) is one context per event loop
// (coroutine.Loops, one per CPU), as QEMU keeps one LinuxAioState per
// AioContext, created on the loop's first request with room for
// maxInflight (128) requests and kept in the loop (coroutine.Loop.Value).
// Everything in it is touched on its loop's thread only, so it has no lock.
// A File is not tied to a loop: each request goes to the context of the
// loop its coroutine runs on. Each File counts its own operations so that
// Close can wait for them.
//
//   - Submission: a coroutine appends its iocb to the loop's pending queue
//     and yields. When the loop has run everything that was ready (every
//     request read from /dev/fuse in this iteration has run up to its
//     first wait), its idle hook submits all pending iocbs in one
//     io_submit (TestBatchSubmit: 32 reads issued in one iteration, one
//     call). At most maxInflight are in the kernel; the rest stay queued.
//   - Identification: iocb.data is the index of the request's slot in a
//     table of in-flight requests, never a Go pointer. The request holds its
//     data buffer ([]byte) until the completion is reaped, so the memory the
//     kernel writes to stays reachable (Go's heap does not move objects, and
//     storing the slice in the heap makes callers' buffers escape to it).
//   - Completion: every iocb carries IOCB_FLAG_RESFD with the loop's AIO
//     eventfd, which is in the loop's epoll. Its handler resets the
//     counter and reaps with io_getevents(min_nr 0) until a call returns
//     fewer events than asked for, waking each coroutine; the loop enters
//     them next. No goroutine and no other thread is involved: at QD1 the
//     loop sleeps once for the request and once for its completion.
//   - Back-pressure: EAGAIN from io_submit puts the refused requests back at
//     the head of the queue; the next completion's iteration resubmits them,
//     or, if none of the loop's is in flight, a 1 ms timer posts to the
//     loop. Nothing is dropped and nothing spins. A partial acceptance
//     resubmits the rest; any other error fails only the iocb the kernel
//     stopped at (TestSubmitErrors).
//   - What leaves the loop: fdatasync goes through IOCB_CMD_FDSYNC; on
//     EINVAL (filesystems without asynchronous fsync) the File remembers it
//     and runs fdatasync(2) through coroutine.RunInWorker from then on, as
//     it does ftruncate and fallocate: each may wait for the device for
//     milliseconds. fstat (Size) and lseek SEEK_DATA/SEEK_HOLE run in place
//     (answered from memory on ext4 and xfs). io_submit itself blocks for a
//     write that extends an O_DIRECT file (the kernel does it
//     synchronously): rare (growth), and bounded by one device write.
//
// Plain callers (Pread, Pwrite, Fdatasync without a coroutine: opening an
// image, creating one) of a direct-I/O file run their call as a coroutine
// on one of the process's loops (coroutine.Run): drivers have one way to do
// AIO.
//
// The fallback engine (pread/pwrite on a buffered descriptor) runs in
// place on the loop for tmpfs/ramfs files, where a call only copies memory:
// BenchmarkFallbackRead measured 1.8 µs for 4 KiB and 160 µs for 1 MiB at
// QD1, the longest a loop is held; a worker would add two hand-offs and a
// thread wake-up to every call. A file that refused O_DIRECT on any other
// filesystem may wait for its device, so its calls leave the loop through
// coroutine.RunInWorker. Plain callers pread in place.
//
// # Alignment
//
// Align and MemAlign are the direct engine's offset/length and buffer
// address alignments (512/512 on ext4 here; 1/1 for the fallback). Requests
// that meet them go to the kernel as they are (PreadAligned serves only
// those). Others go through a bounce buffer covering the aligned range,
// at most 1 MiB per piece: reads copy out of it; writes read the partial edge
// blocks first (read-modify-write). Every direct-engine write holds its
// aligned range in the File's range lock (rangelock.go) for its whole
// duration, aligned writes included, so an RMW can neither race another RMW
// of the same block nor slip between another write's read and write-back.
// A write reaching past the end of the file holds everything from its first
// block on: O_DIRECT writes whole blocks, so it leaves the file up to a block
// too long and truncates it back to the exact size, and no other write may
// run past its start meanwhile. The range lock also caches the file size for
// that decision (the images are locked against other writers).
//
// Reads fill all of p: bytes past the end of the file read as zeros (image
// files need not be a multiple of the cluster size). A short transfer
// re-checks the size with fstat; a read that returns 0 bytes before the end
// of the file is an error wrapping io.ErrUnexpectedEOF, not a retry loop.
// Writes that extend an O_DIRECT file are synchronous in the kernel; they are
// correct, just not asynchronous.
//
// # Concurrency and lock order
//
// All File methods are safe for concurrent use. Methods with a Co suffix may
// yield and must be called from a coroutine; the others block the calling
// goroutine and must not be called from one. Internally a nil co means "plain
// caller" (fallback engine, truncate, fallocate): every wait blocks it
// instead of yielding. Locks, outer to inner; none is held across a wait or
// a system call except where noted:
//
//	rangeLock (logical: held across the I/O of one write, waited on by
//	│          yielding or blocking; rangeLock.mu is a leaf sync.Mutex)
//	└── File.mu       (sync.Mutex: the operation count for Close; leaf)
//
// The engine has no lock: it belongs to its loop's thread.
//
// # Numbers (2 vCPUs, ext4 on virtio, Linux 6.18, go test -bench RandRead4k ./aio/)
//
// 4 KiB random reads from a 256 MiB O_DIRECT file, coroutines on one
// private loop (PreadCo; PreadAlignedCo skips the bounce checks) against
// goroutines blocked in pread(2) on an O_DIRECT descriptor, 2000 reads
// each, while the full test suite ran on the same 2 vCPUs:
//
//	                     QD1 IOPS (CPU µs/op)    QD32 IOPS (CPU µs/op)   iocbs/io_submit
//	PreadCo (loop)       5.5k (55)               26.4k (8.5)             1.0 / 30.8
//	PreadAlignedCo       7.0k (57)               33.8k (7.7)
//	unix.Pread O_DIRECT  5.6k (55)               23.0k (25.5)
//
// At QD1 the loop costs what pread does (both sleep once per read on one
// thread); the previous engine needed a "leader" (its issuer waiting in
// io_getevents itself) to get there, and a reaper goroutine plus a
// cross-thread wake-up otherwise (15–35 µs more per read). At QD32 one loop
// thread reads 1.1–1.5× as fast as 32 blocked threads at a third of the
// CPU per read, the whole queue in each io_submit.
//
// # Remote images
//
// Open and OpenHead of a URL go through the RemoteOpener a program
// installed (package remote): the File reads the object's local cache
// file, read-only and buffered, and every read first calls the opener's
// Filler for its range, on a worker for a coroutine (remote.go). Writes
// are refused (ErrReadOnly), the descriptor is never lent (ErrNoLend), and
// no image lock is taken: the cache file is no one's image.
package aio
