package aio

import (
	"errors"
	"fmt"

	"golang.org/x/sys/unix"
)

// QEMU's image-locking protocol (block/file-posix.c), so that imgfuse and a
// running QEMU exclude each other. Every lock is a one-byte shared (F_RDLCK)
// open-file-description lock, never a POSIX lock (which any close() of
// another descriptor of the file would drop):
//
//	byte 100+i  "I hold permission i"
//	byte 200+i  "I do not let others hold permission i"
//
// A conflict is found with F_OFD_GETLK for F_WRLCK, which reports any lock
// held through another open file description: before using permission i,
// nobody may hold 200+i; before refusing i to others, nobody may hold 100+i.
const (
	permConsistentRead = 0
	permWrite          = 1
	permWriteUnchanged = 2
	permResize         = 3

	lockPermBase   = 100
	lockSharedBase = 200
)

var permNames = [...]string{"consistent read", "write", "write unchanged", "resize"}

// LockError reports that another process holds a conflicting image lock.
type LockError struct {
	File string
	// Perm is the permission in conflict, in QEMU's words ("write", ...).
	Perm string
	// Shared is true when we wanted to refuse Perm to others but another
	// process already holds it (QEMU: "Failed to get shared ... lock").
	Shared bool
}

func (e *LockError) Error() string {
	kind := ""
	if e.Shared {
		kind = "shared "
	}
	return fmt.Sprintf("failed to get %q %slock: is another process using the image %s?", e.Perm, kind, e.File)
}

// lockImage takes the locks QEMU takes for the same use: a writable file
// uses consistent read, write and resize; a read-only one only consistent
// read. Either refuses write and resize to others, as qemu-img does without
// -U. The locks go away when the descriptor is closed.
func (f *File) lockImage() error {
	perms := []int{permConsistentRead}
	if !f.readOnly {
		perms = append(perms, permWrite, permResize)
	}
	unshared := []int{permWrite, permResize}
	for _, p := range perms {
		if err := f.setLockByte(lockPermBase + p); err != nil {
			return err
		}
	}
	for _, p := range unshared {
		if err := f.setLockByte(lockSharedBase + p); err != nil {
			return err
		}
	}
	for _, p := range perms {
		held, err := f.lockByteHeld(lockSharedBase + p)
		if err != nil {
			return err
		}
		if held {
			return &LockError{File: f.name, Perm: permNames[p]}
		}
	}
	for _, p := range unshared {
		held, err := f.lockByteHeld(lockPermBase + p)
		if err != nil {
			return err
		}
		if held {
			return &LockError{File: f.name, Perm: permNames[p], Shared: true}
		}
	}
	return nil
}

func (f *File) setLockByte(off int) error {
	lk := unix.Flock_t{Type: unix.F_RDLCK, Whence: 0, Start: int64(off), Len: 1}
	if err := f.FcntlFlock(unix.F_OFD_SETLK, &lk); err != nil {
		if errors.Is(err, unix.EAGAIN) || errors.Is(err, unix.EACCES) {
			return &LockError{File: f.name, Perm: permNames[off%100]}
		}
		return err
	}
	return nil
}

// lockByteHeld reports whether another open file description holds a lock
// on byte off.
func (f *File) lockByteHeld(off int) (bool, error) {
	lk := unix.Flock_t{Type: unix.F_WRLCK, Whence: 0, Start: int64(off), Len: 1}
	if err := f.FcntlFlock(unix.F_OFD_GETLK, &lk); err != nil {
		return false, err
	}
	return lk.Type != unix.F_UNLCK, nil
}
