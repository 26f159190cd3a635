#!/usr/bin/env bash
# tests/testdata/qemu-versions/make.sh — regenerates the images of
# TestQemuVersions: with qemu-img 10.0 (Debian bookworm-backports) and 11
# (trixie-backports), fetched as bench/run fetches them (bench/fetch-qemu.sh),
# one small image per format and subformat, filled with data, written zeros
# and unallocated ranges, of an odd size. Each is stored gzip-compressed
# (VERSION/NAME.gz; a split or flat VMDK's extent files beside it) and
# SUMS lists, for each, the format and the sha256 of what that same
# qemu-img converts it to (-O raw). Run as root from anywhere in the
# checkout:
#
#   sudo tests/testdata/qemu-versions/make.sh
#
# Needs: apt-get, dpkg, gzip, sha256sum; qemu-io from the fetched
# packages fills the images.
set -Eeuo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(cd "$here/../../.." && pwd)
cachedir=/var/cache/imgfuse-bench
log() { printf '[make.sh %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
work=$(mktemp -d /tmp/qemu-versions.XXXXXX)
trap 'rm -rf "$work"' EXIT
mkdir -p "$cachedir"
# shellcheck source=bench/fetch-qemu.sh
. "$repo/bench/fetch-qemu.sh"

fetch_qsd10 || { echo "qemu 10.0: $qsd10_why" >&2; exit 1; }
fetch_qsd11 || { echo "qemu 11: $qsd11_why" >&2; exit 1; }
declare -A img=(
	[10.0]=$cachedir/qemu-10.0/usr/bin/qemu-img
	[11]=$cachedir/qemu-trixie-backports/run-qemu-img
)
declare -A io=(
	[10.0]=$cachedir/qemu-10.0/usr/bin/qemu-io
	[11]=$cachedir/qemu-trixie-backports/run-qemu-io
)

# NAME FORMAT CREATE-OPTIONS: every image is 5 MiB + 3 KiB + 512 bytes
# (odd, but whole sectors, which every format keeps), filled the same way.
images=(
	"sparse.vmdk vmdk subformat=monolithicSparse"
	"stream.vmdk vmdk subformat=streamOptimized"
	"split.vmdk vmdk subformat=twoGbMaxExtentSparse"
	"dynamic.vhd vpc subformat=dynamic"
	"fixed.vhd vpc subformat=fixed"
	"dynamic.vdi vdi static=off"
	"static.vdi vdi static=on"
	"default.qcow2 qcow2 "
	"fixed.vhdx vhdx subformat=fixed"
	"dynamic.vhdx vhdx subformat=dynamic"
)
size=$((5 * 1024 * 1024 + 3584))
fill=(-c "write -P 0xa5 0 4k" -c "write -P 0x5b 1M 300k" -c "write -z 2M 64k"
	-c "write -P 0x3c 3000000 70000" -c "write -P 0xee $((size - 1024)) 1024")

for v in 10.0 11; do
	out=$here/$v
	rm -rf "$out" && mkdir -p "$out"
	"${img[$v]}" --version | head -n1 >"$out/VERSION"
	for spec in "${images[@]}"; do
		read -r name fmt opts <<<"$spec"
		d=$work/$v && rm -rf "$d" && mkdir -p "$d"
		if [[ $fmt == vmdk && $opts == *streamOptimized* ]]; then
			# streamOptimized is written once: convert a filled image.
			"${img[$v]}" create -q -f vmdk "$d/src.vmdk" "$size"
			"${io[$v]}" -f vmdk "${fill[@]}" "$d/src.vmdk" >/dev/null
			"${img[$v]}" convert -f vmdk -O vmdk -o "$opts" "$d/src.vmdk" "$d/$name"
			rm "$d/src.vmdk"
		else
			"${img[$v]}" create -q -f "$fmt" ${opts:+-o "$opts"} "$d/$name" "$size"
			"${io[$v]}" -f "$fmt" "${fill[@]}" "$d/$name" >/dev/null
		fi
		"${img[$v]}" convert -f "$fmt" -O raw "$d/$name" "$d/ref.raw"
		sum=$(sha256sum "$d/ref.raw" | cut -d' ' -f1)
		rm "$d/ref.raw"
		for f in "$d"/*; do
			gzip -9 -n -c "$f" >"$out/$(basename "$f").gz"
		done
		echo "$name $fmt $sum" >>"$out/SUMS"
		log "$v $name: $(du -cb "$out/${name%.*}"*.gz | tail -n1 | cut -f1) bytes compressed"
	done
done
