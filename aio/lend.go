package aio

import "fmt"

// LendFd calls fn with the file's descriptor, for a caller that hands it to
// the kernel rather than doing I/O on it: FUSE passthrough registers it
// with FUSE_DEV_IOC_BACKING_OPEN, and the kernel takes its own reference to
// the open file and uses it only to name the file (and the credentials to
// open it with) when a FUSE file is opened in passthrough mode. fn must not
// read, write, resize, lock or close the descriptor, and must not keep it
// after returning: this is the one place where the descriptor leaves the
// package, and only for the length of the call. The call counts as an
// operation, so Close waits for it; after Close it fails with ErrClosed.
func (f *File) LendFd(fn func(fd int) error) error {
	if err := f.begin(); err != nil {
		return err
	}
	defer f.end()
	if f.filler != nil {
		return fmt.Errorf("aio: %s: %w", f.name, ErrNoLend)
	}
	if err := fn(f.fd); err != nil {
		return fmt.Errorf("aio: %s: %w", f.name, err)
	}
	return nil
}

// BlockDevice reports whether the file is a block device (not a regular
// file).
func (f *File) BlockDevice() bool { return f.blockDev }
