// Package raw is the raw image format: the image file is the disk, byte for
// byte. It serves raw images given on the command line and raw backing
// files of qcow2 images.
//
// # Concurrency
//
// A Driver's only mutable state is its size, which only grows: Truncate to
// a larger size, or a write past the end of a disk opened Growable. Every
// such change holds the Driver's resizeMu (a coroutine.CoMutex, held across
// the file operation) and publishes the new size with an atomic store once
// the file has its new length, so readers load the size without a lock and
// never see a size the file does not have yet. Reads, and writes inside the
// disk, take no lock: the disk never shrinks, so what was inside stays
// inside, and the aio.File is safe for concurrent use. Many coroutines (and
// ReadDirect callers) use one Driver at once. Lock order: the probe guard's
// mu, then resizeMu, then aio's internal locks.
//
// A writable image whose format was probed (drivers.OpenOptions.Probed)
// has a guard on what the next probe reads (probeguard.go): a write,
// write-zeroes, discard or growth that would leave a first sector (or, for
// a fixed VHD, a last sector) that another format's probe recognises fails
// with EPERM, logged once, so that a guest cannot turn its disk into a
// qcow2 image with a host file as backing file for the next probing open
// (CVE-2008-2004; QEMU restricts block 0 the same way), nor into any other
// format. Changes of those sectors and of the size are serialised by the
// guard's CoMutex, taken before resizeMu, so that each is checked against
// what it lands on. Naming the format (--format raw) removes the guard.
//
// Shrinking is refused (drivers.ErrUnsupported): a shell's '>' onto the
// exposed file opens it with O_TRUNC, and a disk must not be destroyed by a
// typo.
//
// # Paths
//
//   - ReadDirect is the fast path: a read whose buffer, offset and length
//     suit O_DIRECT goes to aio.File.PreadAlignedCo: one iocb, no bounce
//     and no splitting. (It used to skip the coroutine as well.) Through a FUSE mount (fio, 4k random reads,
//     O_DIRECT, 1 GiB image on ext4, 2 vCPUs) it gave 37.8k IOPS at QD32
//     and 9.4k at QD1, against 35.1k and 9.1k with every read in a
//     coroutine: a FUSE round trip (~45 µs) dwarfs a coroutine (~0.4 µs to
//     create, enter and finish), so the gain is a few percent.
//   - ReadAt and WriteAt go through aio's coroutine API, which bounces
//     unaligned requests.
//   - Discard and WriteZeroes use fallocate (PUNCH_HOLE, or ZERO_RANGE when
//     the range must stay allocated) and fall back to writing zeros, at
//     most 1 MiB per write from one shared zero buffer, on filesystems that
//     refuse the mode. mkfs.ext4 through a loop device discards the whole
//     disk: a hole costs nothing, zeros cost a write of the whole disk.
//   - BlockStatus answers from the image file's holes (SEEK_DATA and
//     SEEK_HOLE), as qemu-img map does.
//   - Allocated (drivers.Allocator, st_blocks of the exposed file) is the
//     image file's st_blocks, clamped to the disk size; a block device
//     counts as fully allocated.
//   - LendBackingFd (drivers.FileBacked) lends aio's descriptor so that
//     fusefs can register the image file for FUSE passthrough, where the
//     kernel serves read-only opens of the disk from the file itself. The
//     descriptor's O_DIRECT does not matter: the kernel opens the file anew
//     with each reader's flags. A block device cannot back a FUSE file:
//     refused with ErrUnsupported.
//   - Truncate grows the file with ftruncate (the new range is a hole and
//     reads as zeros); a growing write just writes past the end (aio keeps
//     O_DIRECT's whole-block writes from leaving the file longer).
package raw
