package drivers

import (
	"fmt"
	"os"
	"syscall"

	"imgfuse/coroutine"
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

// LayerBlockStatus is Driver.BlockStatus for a layer above parent (nil for
// none), from the layer's own status st at off: what the layer stores as
// it is (data, or zeros it records), the rest as the parent has it, and
// zeros past the parent's end or where there is none.
func LayerBlockStatus(co *coroutine.Co, st LayerStatus, off int64, parent Driver) (Extent, error) {
	switch {
	case st.Data:
		return Extent{Off: off, Len: st.Len, Flags: ExtentData}, nil
	case st.Zero || parent == nil || off >= parent.Size():
		return Extent{Off: off, Len: st.Len, Flags: ExtentZero}, nil
	}
	e, err := parent.BlockStatus(co, off)
	if err != nil {
		return Extent{}, err
	}
	if e.Off != off || e.Len <= 0 {
		return Extent{}, fmt.Errorf("parent block status at %#x returned [%#x,+%#x)", off, e.Off, e.Len)
	}
	e.Len = min(e.Len, st.Len, parent.Size()-off)
	return e, nil
}
