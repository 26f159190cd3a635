#!/bin/sh
# make-sample.sh regenerates the demo images embedded in the imgfuse binary:
#
#   backing.qcow2  qcow2 (4 KiB clusters) holding an 8 MiB ext4 filesystem
#   overlay.qcow2  qcow2 (16 KiB clusters) on top of it: backing name
#                  "backing.qcow2" (relative), backing format qcow2, with
#                  - compressed clusters: the superblock cluster (same bytes as
#                    the backing) and the cluster holding layer.txt (new text:
#                    the overlay's version of the file wins);
#                  - zero clusters over free space where the backing file holds
#                    junk, so a reader that lets backing data show through a
#                    zero cluster is caught.
#
# The filesystem seen through overlay.qcow2 is consistent (e2fsck -fn is
# clean), and so is the one in backing.qcow2 alone.
#
# Requires qemu-img, qemu-io, mkfs.ext4 (e2fsprogs >= 1.43 for -d), debugfs.
# Output is deterministic for a given e2fsprogs/QEMU version: fixed UUID, hash
# seed, fake time, and inode times reset after population.
#
# Usage: make-sample.sh [OUTDIR]   (default: the directory of this script)
set -eu

out=${1:-$(cd "$(dirname "$0")" && pwd)}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

uuid=6d9c3f1e-1b8e-4a55-9d2f-2a7f0c8e5b11
epoch=1700000000 # 2023-11-14 22:13:20 UTC
export E2FSPROGS_FAKE_TIME=$epoch
export TZ=UTC LC_ALL=C
umask 022

fsblock=4096
ovl_cluster=16384
junk_off=$((4 * 1024 * 1024)) # free space in the fs: zeroed by the overlay
junk_len=$((4 * ovl_cluster))

# --- the files inside the filesystem -------------------------------------
src=$work/src
mkdir -p "$src/docs"
cat >"$src/README.txt" <<'EOF'
Hello from inside a qcow2 image!

You are reading this file through:
  ext4 (this filesystem)
  -> a loop device
  -> the file "disk" that imgfuse exposes over FUSE
  -> overlay.qcow2 (compressed clusters, zero clusters)
  -> backing.qcow2 (the rest of the filesystem)

Try:
  cat layer.txt         # which layer did this file come from?
  sha256sum -c SHA256SUMS
  imgfuse info overlay.qcow2

When done: umount the loop mount first, then `imgfuse unmount DIR/mnt`.
EOF
# layer.txt must keep the same length in both layers (the inode's size is
# the same in both): pad with spaces.
printf '%-63s\n' "this text comes from the overlay (a compressed cluster)" >"$src/layer.txt"
printf 'hello, world\n' >"$src/docs/hello.txt"
seq 1 5000 >"$src/docs/numbers.txt"
(cd "$src" && sha256sum README.txt docs/hello.txt docs/numbers.txt >SHA256SUMS)
find "$src" -exec touch -h -d "@$epoch" {} +

# --- the filesystem --------------------------------------------------------
fs=$work/fs.raw
truncate -s 8M "$fs"
mkfs.ext4 -q -F -b $fsblock -N 64 -O ^has_journal -L imgfuse-demo \
	-U $uuid -E hash_seed=$uuid,root_owner=0:0 -d "$src" "$fs"
# mkfs -d copies the source's ctime, which touch cannot set: reset it.
for p in / /README.txt /layer.txt /SHA256SUMS /docs /docs/hello.txt /docs/numbers.txt /lost+found; do
	debugfs -w -R "sif $p ctime $epoch" "$fs" >/dev/null 2>&1
	debugfs -w -R "sif $p crtime $epoch" "$fs" >/dev/null 2>&1 || true
done
e2fsck -fn "$fs" >/dev/null 2>&1

# Where layer.txt lives, and check that the junk range is free space.
layer_blk=$(debugfs -R "blocks /layer.txt" "$fs" 2>/dev/null | awk '{print $1}')
[ -n "$layer_blk" ] || { echo "make-sample: layer.txt has no block" >&2; exit 1; }
layer_off=$((layer_blk * fsblock))
layer_cl=$((layer_off / ovl_cluster * ovl_cluster))
if debugfs -R "testb $((junk_off / fsblock)) $((junk_len / fsblock))" "$fs" 2>/dev/null | grep -q "marked in use"; then
	echo "make-sample: junk range is not free space" >&2
	exit 1
fi
if [ "$layer_cl" -eq 0 ]; then
	echo "make-sample: layer.txt shares the superblock cluster; adjust the layout" >&2
	exit 1
fi

# --- the backing filesystem: layer.txt says "backing", junk in free space ---
base=$work/base.raw
cp "$fs" "$base"
printf '%-63s\n' "this text comes from the backing file" |
	dd of="$base" bs=1 seek="$layer_off" conv=notrunc status=none
yes "imgfuse: backing junk that a zero cluster must hide" | head -c "$junk_len" |
	dd of="$base" bs=1M seek="$junk_off" oflag=seek_bytes conv=notrunc status=none
e2fsck -fn "$base" >/dev/null 2>&1

rm -f "$out/backing.qcow2" "$out/overlay.qcow2"
qemu-img convert -f raw -O qcow2 -o cluster_size=4096 "$base" "$out/backing.qcow2"

# --- the overlay ----------------------------------------------------------
cd "$out"
qemu-img create -q -f qcow2 -o cluster_size=$ovl_cluster \
	-b backing.qcow2 -F qcow2 overlay.qcow2
dd if="$fs" of="$work/c0" bs=$ovl_cluster count=1 status=none
dd if="$fs" of="$work/c1" bs=$ovl_cluster skip=$((layer_cl / ovl_cluster)) count=1 status=none
qemu-io -f qcow2 \
	-c "write -q -c -s $work/c0 0 $ovl_cluster" \
	-c "write -q -c -s $work/c1 $layer_cl $ovl_cluster" \
	-c "write -q -z $junk_off $junk_len" \
	overlay.qcow2

# --- check: the chain reads as the final filesystem ------------------------
qemu-img check -q backing.qcow2
qemu-img check -q overlay.qcow2
qemu-img convert -O raw overlay.qcow2 "$work/check.raw"
cmp "$work/check.raw" "$fs"
e2fsck -fn "$work/check.raw" >/dev/null 2>&1
echo "make-sample: wrote $out/backing.qcow2 $out/overlay.qcow2"
ls -l "$out/backing.qcow2" "$out/overlay.qcow2"
