// Package tests holds the end-to-end tests of imgfuse: they build the
// binary, mount images on a real kernel FUSE mount and compare what the
// kernel reads with what the reference implementation (qemu-img) says the
// disk holds, byte for byte.
//
// Prerequisites are root, /dev/fuse, qemu-img and qemu-io (and for some
// tests mkfs.ext4 and loop devices; for the rootless ones fuse2fs and a
// /dev/fuse the unprivileged user can open). Without them the tests skip, unless
// IMGFUSE_REQUIRE_E2E=1 or CI=true, where they fail.
//
// Every mount gets its own mountpoint under t.TempDir() and a cleanup that
// unmounts it with `imgfuse unmount`, falling back to a lazy unmount, so a
// failed test never leaves a stale mount behind. Independent tests run in
// parallel. When the tests are built with -race the binary is too, and a
// data race reported by a daemon fails the test that started it.
//
// What is covered, by file:
//   - qcow2_test.go: every image of driverstest.Catalogue (v2/v3, clusters
//     512 B to 2 MiB, refcount widths, zlib/zstd compression, extended L2,
//     zero writes and discards over backing files, chains, short backing
//     files, external data files, snapshots, odd sizes) read through the
//     mount and compared with `qemu-img convert -O raw`; snapshots by name
//     and id; a 1 TiB sparse image; SEEK_DATA/SEEK_HOLE against
//     `qemu-img map`.
//   - mount_test.go: file mountpoints, --name, read-only semantics (EROFS,
//     0444, the image's mtime), writes reaching the image, unmount waiting
//     for the daemon, SIGTERM, kill -9 and clearing the dead mount, info.
//   - write_test.go: parallel O_DIRECT writes (qemu-img convert, fio with
//     verification), PUNCH_HOLE, concurrent readers.
//   - ext4_test.go: loop-mounted ext4 read-only from a compressed qcow2 and
//     read-write from a raw image with fstrim, checked by e2fsck.
//   - badinput_test.go: damaged images and bad command lines.
//   - write_qcow2_test.go (helpers in helpers_write_test.go): the seeded
//     metamorphic write workload (writes, O_DIRECT, punch-hole, zero-range,
//     fsync, read-back) against a raw model over every image variant the
//     write path must handle, judged by qemu-img compare and check; racing
//     writers; qemu-img convert -t none, fio --verify, loop --direct-io=on,
//     punch-hole over backing data; --read-only never writes a byte.
//   - crash_test.go: kill -9 of the daemon mid-workload, many times: check
//     never reports corruption (lazy refcounts: the next mount repairs),
//     fsynced data survives. IMGFUSE_CRASH_ROUNDS sets the number of kills
//     (make crash: 300, printing "N passed, N failed").
//   - hostile_test.go: crafted images through `info` and a read-only mount:
//     a one-line refusal, or EIO for the damaged range only; bounded daemon
//     RSS; no file written. special_files_test.go: FIFOs, devices,
//     directories, sockets as image or backing file fail at once.
//     probe_guard_test.go: a probed raw image refuses a qcow2 header in its
//     first sector (CVE-2008-2004); --format raw allows it.
//   - storage_test.go: ENOSPC from a full tmpfs or ext4 under the image
//     (qemu-img check clean, fsynced data intact); EIO from the storage
//     under the image confined to its range.
//   - soak_test.go: fio and an ext4 file workload on -race daemons for
//     IMGFUSE_SOAK_SECONDS (30): no race, no deadlock, no RSS or thread
//     growth.
//   - fs_rw_test.go: mkfs.ext4, loop read-write, copy, fstrim (space really
//     freed), check clean, remount, every file's checksum.
//   - grow_test.go: truncate grows, shrink refused, ENOSPC past the end,
//     --growable, header bits and extensions preserved.
//   - lock_test.go: QEMU's image locks.
//   - lint_test.go: package import boundaries, no exits in library code,
//     image syscalls only in aio.
//   - bench_smoke_test.go: `bench/run --smoke` (imgfuse against
//     qemu-storage-daemon and the file) finishes, reports a positive number
//     for every workload and target in a table that parses, and leaves
//     nothing mounted; in parallel with the rest (its numbers mean nothing).
//   - qemucompat_test.go: `imgfuse info|map|check --output=json` against
//     qemu-img's on a matrix of images (decoded and compared key by key;
//     map byte for byte); check and check -r verdicts and counts on leaked
//     and corrupted copies, qemu-img check clean after the repair; the
//     corrupt bit cleared by a repair; the progress bar only on a terminal.
//   - create_test.go: `imgfuse create` byte for byte against qemu-img create
//     for each option (and data files), mounted and written; overlays.
//   - exitcodes_test.go: every documented exit code provoked once.
//   - rootless_test.go: imgfuse as an unprivileged user (IMGFUSE_TEST_USER,
//     default nobody; /dev/fuse must be open to users, as .ci/run makes
//     it): a qcow2 mount written and read, status, unmount, judged by
//     qemu-img check and compare; the README's no-root recipe on a GPT
//     disk (sfdisk, mkfs.ext4 on MNT/part1, fuse2fs -o fakeroot,
//     fusermount3 -u, imgfuse unmount) judged by e2fsck and debugfs; a
//     SIGKILLed server's dead mount cleared by the user; fusermount3's
//     refusals (a root-owned mountpoint, /dev/fuse 0600 in a private
//     mount namespace) printed in its own words with exit code 7; the
//     demo's commands for a user (fuse2fs) run as printed.
//
// Images are kept at 32 MiB virtual (the 1 TiB sparse image aside) so the
// package runs in well under five minutes on two cores.
package tests
