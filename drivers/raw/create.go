package raw

import (
	"errors"
	"fmt"
	"os"

	"imgfuse/aio"
	"imgfuse/drivers"
)

// Create writes a raw image of size bytes at path (truncating any file
// there) as qemu-img create -f raw does with preallocation mode
// prealloc: "" or "off", a sparse file whose first block is written, so
// that its allocation is what QEMU's is; "falloc", every block reserved
// with fallocate(2); "full", every block written with zeros. ("metadata"
// is refused, as QEMU's file driver refuses it: a raw file has none.)
func Create(path string, size int64, prealloc string) error {
	if size < 0 {
		return fmt.Errorf("raw: create %s: negative size %d: %w", path, size, drivers.ErrUnsupported)
	}
	switch prealloc {
	case "", "off", "falloc", "full":
	default:
		return fmt.Errorf("raw: create %s: unsupported preallocation mode %q (want off, falloc or full): %w",
			path, prealloc, drivers.ErrUnsupported)
	}
	// Create the file if need be, but truncate only once its image locks
	// are held: an image in use elsewhere must not be destroyed.
	fd, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE, 0o644)
	if err != nil {
		return fmt.Errorf("raw: create: %w", err)
	}
	fd.Close()
	f, err := aio.Open(path, aio.Options{NoDirectIO: true})
	if err != nil {
		var le *aio.LockError
		if errors.As(err, &le) {
			return fmt.Errorf("raw: create: %w (%w)", err, drivers.ErrLocked)
		}
		return fmt.Errorf("raw: create: %w", err)
	}
	werr := f.Truncate(0)
	if werr == nil {
		werr = f.Truncate(size)
	}
	if werr == nil && size > 0 {
		switch prealloc {
		case "falloc":
			werr = f.Fallocate(0, 0, size)
		case "full":
			zeros := make([]byte, min(size, 1<<20))
			for off := int64(0); off < size && werr == nil; off += int64(len(zeros)) {
				werr = f.Pwrite(zeros[:min(size-off, int64(len(zeros)))], off)
			}
		default:
			werr = f.Pwrite(make([]byte, min(size, 4096)), 0)
		}
	}
	if werr == nil {
		werr = f.Fdatasync()
	}
	if err := f.Close(); werr == nil {
		werr = err
	}
	if werr != nil {
		return fmt.Errorf("raw: create %s: %w", path, werr)
	}
	return nil
}
