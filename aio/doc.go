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
// The AIO engine (engine.go) is one context per process, created on first
// use with room for maxInflight (128) requests. One context because contexts
// count against the system-wide fs.aio-max-nr, a qcow2 backing chain opens
// many files, and one reaper goroutine then serves them all; each File counts
// its own operations so that Close can wait for them.
//
//   - Submission: a request is appended to a FIFO pending queue. The first
//     goroutine to find nobody submitting becomes the submitter and moves
//     pending requests into free slots and into io_submit, in batches: all
//     requests queued while its previous io_submit was in the kernel go out
//     in one call. Others only append and wait. At most maxInflight requests
//     are in the kernel; the rest wait in the queue.
//   - Identification: iocb.data is the index of the request's slot in a
//     table of in-flight requests, never a Go pointer. The request holds its
//     data buffer ([]byte) until the completion is reaped, so the memory the
//     kernel writes to stays reachable (Go's heap does not move objects, and
//     storing the slice in the heap makes callers' buffers escape to it).
//   - Completion: every iocb carries IOCB_FLAG_RESFD with one non-blocking
//     eventfd, wrapped by os.NewFile, so the single reaper goroutine sleeps
//     in the netpoller (no thread blocked or spinning). On wake-up it calls
//     io_getevents with a zero timeout, wakes each waiter (co.Wake for a
//     coroutine, a channel for a plain caller) and moves queued requests into
//     the freed slots.
//   - The leader: a request that finds the engine idle (nothing in flight
//     or queued, the reaper not reaping) is submitted without the eventfd,
//     and its issuer waits in io_getevents(min_nr=1) itself, reaping for
//     everyone meanwhile and waking their waiters; the reaper reaps nothing
//     while a leader leads, so the leader's completion cannot be taken from
//     it, and reaps once more when the leader hands back. At QD1 every
//     request is a leader: its thread sleeps and wakes once, as with
//     pread(2), instead of the completion crossing the netpoller, the
//     reaper goroutine and a wake-up of the waiter. At QD32 requests
//     overlap and go through the reaper, which batches completions.
//   - One reaps at a time (the leader, or whoever holds the reaping), and
//     a reapAll that finds another at work marks it to make one more pass
//     before it stops: the eventfd signal its caller consumed may belong to
//     a completion the other had already looked past. Without that mark a
//     completion was lost once in a while under load, and with it every
//     request queued behind the qcow2 lock its issuer held
//     (TestReapAgain provokes the interleaving with test hooks).
//   - Back-pressure: EAGAIN from io_submit puts the refused requests back at
//     the head of the queue; the next completion resubmits them, or, if none
//     of ours is in flight, a 1 ms timer does. Nothing is dropped and nothing
//     spins. A partial acceptance resubmits the rest; any other error fails
//     only the iocb the kernel stopped at.
//   - fdatasync goes through IOCB_CMD_FDSYNC; on EINVAL (filesystems without
//     asynchronous fsync) the File remembers it and calls fdatasync(2) on a
//     worker goroutine (coroutine.RunInWorker) from then on.
//
// The fallback engine runs a coroutine's pread/pwrite on the coroutine's own
// goroutine: coroutine.Run gives each coroutine a goroutine of its own, so
// blocking it in a system call stalls no other request, and the Go runtime
// hands its P to another thread meanwhile. Measured against handing each call
// to a worker goroutine (BenchmarkFallbackRead4k, 4 KiB reads from tmpfs by
// 32 goroutines): 409–424k IOPS at 1.6 µs CPU per read on the own
// goroutine, 196–230k IOPS at 2.7 µs with a worker. fdatasync, which takes milliseconds, does
// use a worker, as the AIO engine's fallback does.
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
// caller": every wait blocks on a channel instead of yielding. Locks, outer
// to inner; none is held across a wait or a system call except where noted:
//
//	rangeLock (logical: held across the I/O of one write, waited on by
//	│          yielding or blocking; rangeLock.mu is a leaf sync.Mutex)
//	├── File.mu       (sync.Mutex: the operation count for Close; leaf)
//	└── engine.mu     (sync.Mutex: slots, pending queue; leaf, dropped
//	                   around io_submit; the reaper wakes waiters without it)
//
// # Numbers (2 vCPUs, ext4 on virtio, Linux 6.18, go test -bench . ./aio/)
//
// 4 KiB random reads from a 256 MiB O_DIRECT file (BenchmarkRandRead4k), three
// runs on a machine shared with other work:
//
//	                     QD1 IOPS (CPU µs/op)    QD32 IOPS (CPU µs/op)
//	PreadCo (coroutine)  9.7–10.9k (48–51)       72–93k  (6.5–7.3)
//	PreadAligned         10.4–10.6k (49–53)      77–92k  (5.8–6.2)
//	unix.Pread O_DIRECT  12.0–17.1k (23–31)      44–54k  (7.5–13.8)
//
// At QD32 the engine does 1.5–1.9× the IOPS of 32 goroutines blocked in
// pread(2), at less CPU per I/O, with 1.5–1.7 iocbs per io_submit. At QD1 it
// cost 15–35 µs more per read than pread when every completion went through
// the reaper (the completion crosses the netpoller, the reaper goroutine and
// a wake-up of the waiter). A variant whose reaper blocked a thread in
// io_getevents(min_nr=1) instead of the eventfd measured the same at QD1
// (10.9–11.0k IOPS), so the netpoller is not the cost: the completion is a
// cross-thread wake-up where pread sleeps and wakes on one thread. Hence the
// leader, which sleeps and wakes on its own thread like pread. The same
// benchmark before and after it, alternated on a loaded machine (load
// average ~14, so absolute numbers are low):
//
//	                     QD1 IOPS (CPU µs/op)    pread QD1 in the same run
//	reaper only          5.8k (68)               5.7k (33)
//	with the leader      8.6k (35)               6.2k (39)
//
// QD32 is unchanged (23–36k either way on that machine: requests overlap,
// so they rarely lead).
package aio
