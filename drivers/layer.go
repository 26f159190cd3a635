package drivers

import (
	"fmt"
	"os"
	"syscall"
)

// What the formats with a parent image (VHD, VHDX, VMDK) answer alike for
// the capabilities that look down the chain.

// LayerFiles is FileLister.Files for the image at path, made of the files
// own (the image, then any extents), above parent (nil for none): the
// parent's files follow, its image as the backing file of path.
func LayerFiles(path string, own []ChainFile, parent Driver) []ChainFile {
	out := own
	if parent == nil {
		return out
	}
	for _, f := range FilesOf(parent) {
		if f.Role == "image" {
			f.Role, f.Of = "backing file", path
		}
		out = append(out, f)
	}
	return out
}

// LayerDamage is Damaged.Damage for a layer that found the damage own
// itself (nil for none), above parent (nil for none).
func LayerDamage(own *DamageError, parent Driver) error {
	if own != nil {
		return own
	}
	if parent != nil {
		return DamageOf(parent)
	}
	return nil
}

// SetBacking names parent, opened from name as format, as info's backing
// file, with its own description below, as qemu-img info does.
func (info *ImageInfo) SetBacking(name, format string, parent Driver) {
	info.BackingFilename, info.BackingFormat = name, format
	if in, ok := parent.(Informer); ok {
		pi := in.Info()
		info.Backing = &pi
	}
}

// DiskUsage is the space the files occupy on their filesystems, what
// qemu-img info calls the disk size (st_blocks × 512); a file that cannot
// be examined counts nothing.
func DiskUsage(paths ...string) int64 {
	var blocks int64
	for _, p := range paths {
		if fi, err := os.Stat(p); err == nil {
			if st, ok := fi.Sys().(*syscall.Stat_t); ok {
				blocks += st.Blocks
			}
		}
	}
	return blocks * 512
}

// InDisk checks a request [off, off+n) of operation op against a disk of
// size bytes: nil inside it, otherwise an error naming the format and the
// image at path that wraps EINVAL (a request the kernel should never have
// sent) or, for writes to a disk that never grows, ErrNoSpace.
func InDisk(format, path, op string, off, n, size int64, errNo error) error {
	if off >= 0 && n >= 0 && off <= size && n <= size-off {
		return nil
	}
	where := "outside the disk"
	if errNo == ErrNoSpace {
		where = "past the end"
	}
	return fmt.Errorf("%s: %s: %s [%#x, +%#x) %s (size %#x): %w", format, path, op, off, n, where, size, errNo)
}
