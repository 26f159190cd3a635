package qcow2

import (
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"syscall"

	"imgfuse/aio"
	"imgfuse/coroutine"
	"imgfuse/drivers"
)

// fileID identifies a file independently of the path used to reach it.
type fileID struct{ dev, ino uint64 }

// maxChainMetadata bounds the metadata a whole chain keeps in memory (see
// the package doc); a variable for tests.
var maxChainMetadata int64 = 512 << 20

// l2ChainMax bounds the L2 caches of a chain together: the top image gets
// what it would alone (at most l2CacheMax), the layers below share the
// rest, each at least 2 tables.
const l2ChainMax = 2 * l2CacheMax

// l2Share returns how many L2 tables of size cs the next layer's cache
// gets, of the want it would have alone. limit is the cache size the user
// asked for (OpenOptions.CacheSize, 0 for the default): the chain's caches
// together then get twice that, if more than l2ChainMax.
func (ch *chain) l2Share(want int, cs, limit int64) int {
	left := (max(l2ChainMax, 2*limit) - ch.l2Bytes) / cs
	return int(max(2, min(int64(want), left)))
}

// charge adds the metadata memory of img, just opened with an L2 cache of
// l2Tables tables, to the chain, and refuses the open if the chain would
// then pass maxChainMetadata. It counts what the image may hold at most:
// its L1 table (or the cache of its pieces) and the sorted L2 table
// offsets of the overlap checks (at most as large), its L2 cache, its
// snapshot table and, if writable, its refcount table, else the refcount
// block offsets of the read-side overlap check (readMetaLocked).
func (ch *chain) charge(img *image, l2Tables int) error {
	l2 := int64(l2Tables) * img.clusterSize
	ch.l2Bytes += l2
	n := 2*int64(len(img.l1))*8 + l2 + img.snapTableBytes
	if img.l1c != nil {
		n += l1CacheChunks * l1Chunk
	}
	rt := int64(img.h.ReftableClusters) << img.clusterBits
	if !img.writable {
		rt = min(rt, readReftableMax)
	}
	n += rt
	ch.meta += n
	if ch.meta > maxChainMetadata {
		return fmt.Errorf("the backing chain would keep %d MiB of metadata in memory (limit %d MiB): %w",
			ch.meta>>20, maxChainMetadata>>20, drivers.ErrUnsupported)
	}
	return nil
}

// enter records that path is the next layer of the chain. It refuses a
// chain deeper than maxChainDepth and a file already in the chain: without
// that a backing name pointing at the image itself (or at an image above
// it) would recurse for ever.
func (ch *chain) enter(path string) error {
	if ch.depth >= maxChainDepth {
		return fmt.Errorf("backing chain deeper than %d images: %w", maxChainDepth, drivers.ErrCorrupt)
	}
	if aio.IsURL(path) {
		// A remote image is read-only and names no local file: it
		// ends the chain or names other URLs, told apart by name.
		for _, u := range ch.urls {
			if u == path {
				return fmt.Errorf("backing chain loop: the URL appears twice in the chain: %w", drivers.ErrCorrupt)
			}
		}
		ch.depth++
		ch.urls = append(ch.urls, path)
		return nil
	}
	fi, err := os.Stat(path)
	if err != nil {
		return &imageError{err: err}
	}
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok {
		return fmt.Errorf("cannot identify the file: %w", drivers.ErrUnsupported)
	}
	id := fileID{dev: uint64(st.Dev), ino: st.Ino}
	for _, s := range ch.seen {
		if s == id {
			return fmt.Errorf("backing chain loop: the file appears twice in the chain: %w", drivers.ErrCorrupt)
		}
	}
	ch.depth++
	ch.seen = append(ch.seen, id)
	return nil
}

// resolve makes a file name found inside the image relative to the image's
// directory, as QEMU does, unless it is absolute.
//
// A URL (a remote image, see package remote) stays as it is.
func (img *image) resolve(name string) string {
	if filepath.IsAbs(name) || aio.IsURL(name) {
		return name
	}
	if aio.IsURL(img.path) {
		// Relative to a remote image: the URL's last segment replaced.
		return img.path[:strings.LastIndexByte(img.path, '/')+1] + name
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
		return fmt.Errorf("backing file %q: %w", img.h.BackingFile, backingCause(err, path))
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

// backingCause is err, the failure to open the backing file at path,
// reworded without the names that the backing file's own layers put in
// front (the driver's "FORMAT: PATH: ", the "open PATH: " of package os),
// since the caller names the file itself, so that a chain's message names
// each file once:
//
//	qcow2: /a/top: backing file "mid": backing file "top": backing chain loop: ...
//
// The layers are recognised by their types, never their text; the errors
// err wraps stay matchable.
func backingCause(err error, path string) error {
	cause := err
	for {
		var next error
		switch e := cause.(type) {
		case *imageError:
			if e.path == path || e.path == "" {
				next = e.err
			}
		case *drivers.FileError:
			if e.Path == path || e.Path == "" {
				next = e.Err
			}
		case *fs.PathError:
			if e.Path == path {
				next = e.Err
			}
		}
		if next == nil {
			break
		}
		cause = next
	}
	if cause == err {
		return err
	}
	return rewordedError{cause.Error(), err}
}

// rewordedError is err with another message.
type rewordedError struct {
	msg string
	err error
}

func (e rewordedError) Error() string { return e.msg }
func (e rewordedError) Unwrap() error { return e.err }

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
		return fmt.Errorf("the image needs an external data file but names none: %w", drivers.ErrCorrupt)
	}
	path := img.resolve(img.h.DataFile)
	// The data file is written with the image: guest data lives there.
	f, err := aio.Open(path, aio.Options{ReadOnly: !img.writable, NoDirectIO: opts.NoDirectIO, NoLock: opts.ForceShare && !img.writable})
	if err != nil && opts.NoDataFile && !img.writable {
		img.data = nil
		img.dataPath = path
		img.dataErr = fmt.Errorf("external data file: %v: %w", err, syscall.EIO)
		return nil
	}
	if err != nil {
		return fmt.Errorf("external data file: %w", err)
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
		return drivers.Extent{}, fmt.Errorf("backing block status at %#x returned [%#x,+%#x)", off, e.Off, e.Len)
	}
	e.Len = min(e.Len, n, img.backingSize-off)
	return e, nil
}
