package qcow2

import (
	"fmt"
	"os"
	"path/filepath"
	"syscall"

	"imgfuse/aio"
	"imgfuse/coroutine"
	"imgfuse/drivers"
)

// fileID identifies a file independently of the path used to reach it.
type fileID struct{ dev, ino uint64 }

// enter records that path is the next layer of the chain. It refuses a
// chain deeper than maxChainDepth and a file already in the chain: without
// that a backing name pointing at the image itself (or at an image above
// it) would recurse for ever.
func (ch *chain) enter(path string) error {
	if ch.depth >= maxChainDepth {
		return fmt.Errorf("qcow2: %s: backing chain deeper than %d images: %w", path, maxChainDepth, drivers.ErrCorrupt)
	}
	fi, err := os.Stat(path)
	if err != nil {
		return fmt.Errorf("qcow2: %w", err)
	}
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok {
		return fmt.Errorf("qcow2: %s: cannot identify the file: %w", path, drivers.ErrUnsupported)
	}
	id := fileID{dev: uint64(st.Dev), ino: st.Ino}
	for _, s := range ch.seen {
		if s == id {
			return fmt.Errorf("qcow2: %s: backing chain loop: the file appears twice in the chain: %w",
				path, drivers.ErrCorrupt)
		}
	}
	ch.depth++
	ch.seen = append(ch.seen, id)
	return nil
}

// resolve makes a file name found inside the image relative to the image's
// directory, as QEMU does, unless it is absolute.
func (img *image) resolve(name string) string {
	if filepath.IsAbs(name) {
		return name
	}
	return filepath.Join(filepath.Dir(img.path), name)
}

// openBacking opens the backing file named in the header, read-only, with
// the format from the backing-format extension or else probed.
func (img *image) openBacking(opts drivers.OpenOptions, ch *chain) error {
	if img.h.BackingFile == "" || opts.NoBacking && !img.writable {
		return nil
	}
	path := img.resolve(img.h.BackingFile)
	wrap := func(err error) error {
		return fmt.Errorf("qcow2: %s: backing file %q: %w", img.path, img.h.BackingFile, err)
	}
	formats := withSelf(opts.Formats)
	var f drivers.Format
	var err error
	if img.h.BackingFormat != "" {
		f, err = drivers.Lookup(formats, img.h.BackingFormat)
	} else {
		f, err = drivers.ProbeFile(formats, path)
	}
	if err != nil {
		return wrap(err)
	}
	bopts := opts
	bopts.ReadOnly = true
	bopts.Snapshot = ""
	var d drivers.Driver
	switch f.(type) {
	case Format, *Format:
		// Our own format: carry the chain so loops and depth are caught.
		var bi *image
		bi, err = openImage(path, bopts, ch)
		if bi != nil {
			d = bi
		}
	default:
		if err = ch.enter(path); err == nil {
			d, err = f.Open(path, bopts)
		}
	}
	if err != nil {
		return wrap(err)
	}
	img.backing = d
	img.backingSize = d.Size()
	return nil
}

// withSelf returns formats with qcow2 added if it is not there, so that a
// qcow2 backing file opens even when the caller listed no formats.
func withSelf(formats []drivers.Format) []drivers.Format {
	for _, f := range formats {
		if f.Name() == "qcow2" {
			return formats
		}
	}
	return append(formats[:len(formats):len(formats)], Format{})
}

// openDataFile opens the external data file (incompatible bit 2). Its name
// comes from the data-file extension, relative to the image's directory.
func (img *image) openDataFile(opts drivers.OpenOptions) error {
	if !img.h.hasDataFile() {
		return nil
	}
	if img.h.DataFile == "" {
		return fmt.Errorf("qcow2: %s: the image needs an external data file but names none: %w",
			img.path, drivers.ErrCorrupt)
	}
	path := img.resolve(img.h.DataFile)
	// The data file is written with the image: guest data lives there.
	f, err := aio.Open(path, aio.Options{ReadOnly: !img.writable, NoDirectIO: opts.NoDirectIO, NoLock: opts.ForceShare && !img.writable})
	if err != nil {
		return fmt.Errorf("qcow2: %s: external data file: %w", img.path, err)
	}
	img.data = f
	img.dataPath = path
	return nil
}

// readBacking fills p with the backing layer's bytes at off: the backing
// driver's data up to its end, zeros past it (an overlay may be larger than
// its backing file) or everywhere when there is no backing file.
func (img *image) readBacking(co *coroutine.Co, p []byte, off int64) error {
	if img.backing == nil || off >= img.backingSize {
		clear(p)
		return nil
	}
	n := min(int64(len(p)), img.backingSize-off)
	if _, err := img.backing.ReadAt(co, p[:n], off); err != nil {
		return err
	}
	clear(p[n:])
	return nil
}

// backingStatus describes at most n bytes of the backing layer from off.
func (img *image) backingStatus(co *coroutine.Co, off, n int64) (drivers.Extent, error) {
	if img.backing == nil || off >= img.backingSize {
		return drivers.Extent{Off: off, Len: n, Flags: drivers.ExtentZero}, nil
	}
	e, err := img.backing.BlockStatus(co, off)
	if err != nil {
		return drivers.Extent{}, err
	}
	if e.Len <= 0 || e.Off != off {
		return drivers.Extent{}, fmt.Errorf("qcow2: %s: backing block status at %#x returned [%#x,+%#x)",
			img.path, off, e.Off, e.Len)
	}
	e.Len = min(e.Len, n, img.backingSize-off)
	return e, nil
}
