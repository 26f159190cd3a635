package drivers

import (
	"errors"
	"fmt"
	"io"

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

// ProbeFile reads the first ProbeSize bytes of path and probes them. A path
// that is not a regular file or a block device is refused, without
// blocking, by aio.OpenHead.
func ProbeFile(formats []Format, path string) (Format, error) {
	file, err := aio.OpenHead(path)
	if err != nil {
		return nil, err
	}
	defer file.Close()
	buf := make([]byte, ProbeSize)
	n, err := io.ReadFull(file, buf)
	if err != nil && err != io.ErrUnexpectedEOF && err != io.EOF {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	f, err := Probe(formats, buf[:n])
	if err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return f, nil
}

// lockedError keeps a lock conflict's message (which names the file and
// the permission) and makes it match ErrLocked.
type lockedError struct{ err error }

func (e lockedError) Error() string   { return e.err.Error() }
func (e lockedError) Unwrap() []error { return []error{e.err, ErrLocked} }
