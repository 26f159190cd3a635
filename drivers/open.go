package drivers

import (
	"errors"
	"fmt"
	"io"
	"os"

	"golang.org/x/sys/unix"

	"imgfuse/aio"
)

// Open opens the image at path as format name, or probes its format when
// name is "" or "auto" (and then sets opts.Probed for the format's Open).
// It must not be called from a coroutine.
func Open(path, name string, opts OpenOptions) (Driver, Format, error) {
	var f Format
	var err error
	if name == "" || name == "auto" {
		f, err = ProbeFile(opts.Formats, path)
		opts.Probed = true
	} else {
		f, err = Lookup(opts.Formats, name)
	}
	if err != nil {
		return nil, nil, err
	}
	d, err := f.Open(path, opts)
	if err != nil {
		var le *aio.LockError
		if errors.As(err, &le) {
			err = lockedError{err}
		}
		return nil, nil, err
	}
	return d, f, nil
}

// ProbeFile probes the file at path: its first and last ProbeSize bytes
// and its name. A path that is not a regular file or a block device is
// refused, without blocking, by aio.OpenHead.
func ProbeFile(formats []Format, path string) (Format, error) {
	file, err := aio.OpenHead(path)
	if err != nil {
		return nil, err // it names the path
	}
	in, err := readProbeInput(file, path)
	file.Close()
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	f, err := Probe(formats, in)
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return f, nil
}

// readProbeInput reads what Probe looks at. The size comes from seeking to
// the end, which a block device answers and its stat does not.
//
// It leaves the page cache as it found it (no readahead; the pages read
// are dropped again): ext4 reports a fallocated but unwritten extent as
// data where its pages are cached, and map must see the file's holes as
// qemu-img, which reads no tail, sees them.
func readProbeInput(file *os.File, path string) (ProbeInput, error) {
	in := ProbeInput{Name: path}
	fd := int(file.Fd())
	_ = unix.Fadvise(fd, 0, 0, unix.FADV_RANDOM)
	defer func() {
		_ = unix.Fadvise(fd, 0, pageSize, unix.FADV_DONTNEED)
		if size, err := file.Seek(0, io.SeekEnd); err == nil && size > ProbeSize {
			_ = unix.Fadvise(fd, (size-ProbeSize)&^(pageSize-1), 0, unix.FADV_DONTNEED)
		}
	}()
	buf := make([]byte, ProbeSize)
	n, err := io.ReadFull(file, buf)
	if err != nil && err != io.ErrUnexpectedEOF && err != io.EOF {
		return in, err
	}
	in.Head = buf[:n]
	size, err := file.Seek(0, io.SeekEnd)
	if err != nil {
		return in, err
	}
	if size <= ProbeSize {
		// The whole file is in Head (a file shorter than it was when
		// read has lost its tail too).
		in.Tail = in.Head[:min(int64(n), size)]
		return in, nil
	}
	tail := make([]byte, ProbeSize)
	if _, err := file.ReadAt(tail, size-ProbeSize); err == nil {
		in.Tail = tail
	} else if err != io.EOF {
		return in, err
	} // else the file shrank under us: its tail is not known.
	return in, nil
}

// pageSize is the granularity of the page cache's advice.
var pageSize = int64(os.Getpagesize())

// lockedError keeps a lock conflict's message (which names the file and
// the permission) and makes it match ErrLocked.
type lockedError struct{ err error }

func (e lockedError) Error() string   { return e.err.Error() }
func (e lockedError) Unwrap() []error { return []error{e.err, ErrLocked} }
