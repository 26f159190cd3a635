// Package partition reads a disk's MBR or GPT partition table, so that
// fusefs can expose each partition as a file (part1, part2, …) on kernels
// and in containers that cannot scan partitions themselves (no
// `losetup -P`, no nbd).
//
// # Numbers
//
// Partitions are numbered as Linux numbers them (block/partitions/msdos.c,
// efi.c): MBR primaries keep their slot number 1–4 (empty slots leave a
// gap), logical partitions are numbered from 5 in the order of the
// extended chain; GPT partitions are numbered entry index + 1, empty
// entries skipped but counted. An extended partition gets no number of its
// own here: the kernel exposes it as a 1 KiB stub, which is of no use as a
// file. At most MaxPartitions partitions are read (the kernel's
// DISK_MAX_PARTS).
//
// # What is accepted
//
// Sectors are 512 bytes. A GPT is looked for only behind a protective MBR
// (an entry of type 0xEE), as the kernel does without its "gpt" boot
// option; the primary header at LBA 1 must have the "EFI PART" signature,
// a header size of 92–512 bytes, a matching header CRC32, MyLBA 1, 128-byte
// entries (the only size the kernel accepts), a bounded entry count (at
// most 1 MiB of entries) and a matching entry-array CRC32; otherwise the
// backup header at the last LBA is tried with the same checks. An MBR needs
// the 0x55AA signature and boot flags 0x00 or 0x80 in every slot (a
// filesystem boot sector is not a table). The extended chain is followed
// like the kernel follows it (data entries first, then the first link),
// bounded by MaxPartitions and a chain length of 256; an EBR visited twice
// is a loop and makes the whole table malformed. A chain that ends in a
// sector without the signature simply ends, as in the kernel.
//
// A partition that starts at or past the end of the disk is skipped, one
// that runs past it is clamped, each with a warning in Table.Warnings (the
// kernel does the same: "beyond EOD, truncated"). Overlapping partitions
// are kept, as the kernel keeps them.
//
// Read never panics on any input, reads at most 1 MiB + a few sectors for a
// GPT and MaxPartitions sectors for an MBR chain, and every partition it
// returns lies inside the disk (checked by FuzzRead).
//
// # Why not a library
//
// github.com/diskfs/go-diskfs's partition/gpt and partition/mbr were
// considered: they read from a backend.File (fs.File + io.Seeker +
// io.Closer, not an io.ReaderAt), its module pulls in logrus, uuid, lz4,
// xz, go-lzo, xattr and more, and its MBR reader does not walk the extended
// chain, so logical partitions would still need code here. The format
// subset needed is small; it is parsed here against the kernel's rules.
package partition
