// Package uring is the smallest io_uring the project needs: one ring of
// 128-byte submission entries (IORING_SETUP_SQE128, which IORING_OP_URING_CMD
// of FUSE-over-io_uring requires), filled and submitted by one thread, and
// its completion queue read without a system call.
//
// There is no library: golang.org/x/sys has the system call numbers and
// nothing else, so the layouts below are the kernel's
// (include/uapi/linux/io_uring.h). A Ring is not safe for concurrent use;
// in imgfuse it belongs to one event loop (coroutine.Loop).
package uring

import (
	"errors"
	"fmt"
	"sync/atomic"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Setup flags and features (io_uring.h).
const (
	setupCQSize      = 1 << 3
	setupCoopTaskrun = 1 << 8
	setupSQE128      = 1 << 10
	featSingleMmap   = 1 << 0
	enterGetEvents   = 1 << 0

	offSQRing = 0
	offCQRing = 0x8000000
	offSQEs   = 0x10000000
)

// OpURingCmd is IORING_OP_URING_CMD: a command for the file's driver.
const OpURingCmd = 46

// SQESize is the size of one submission entry of a SQE128 ring; the
// command area of IORING_OP_URING_CMD starts at CmdOffset and is 80 bytes.
const (
	SQESize   = 128
	CmdOffset = 48
	CmdSize   = 80
)

// params is struct io_uring_params.
type params struct {
	sqEntries, cqEntries, flags, sqThreadCPU, sqThreadIdle, features, wqFd uint32
	resv                                                                   [3]uint32
	sqOff                                                                  sqOffsets
	cqOff                                                                  cqOffsets
}

type sqOffsets struct {
	head, tail, ringMask, ringEntries, flags, dropped, array, resv1 uint32
	userAddr                                                        uint64
}

type cqOffsets struct {
	head, tail, ringMask, ringEntries, overflow, cqes, flags, resv1 uint32
	userAddr                                                        uint64
}

// SQE is one 128-byte submission entry. Its fields are set through the
// accessors; the rest of the entry is zero when Next returns it.
type SQE [SQESize]byte

// SetOp sets the opcode, the file descriptor and the user data that the
// completion carries back.
func (e *SQE) SetOp(op uint8, fd int32, userData uint64) {
	e[0] = op
	*(*int32)(unsafe.Pointer(&e[4])) = fd
	*(*uint64)(unsafe.Pointer(&e[32])) = userData
}

// SetCmdOp sets cmd_op, the command of an IORING_OP_URING_CMD.
func (e *SQE) SetCmdOp(cmdOp uint32) { *(*uint32)(unsafe.Pointer(&e[8])) = cmdOp }

// SetAddr sets addr and len.
func (e *SQE) SetAddr(addr unsafe.Pointer, n uint32) {
	*(*uint64)(unsafe.Pointer(&e[16])) = uint64(uintptr(addr))
	*(*uint32)(unsafe.Pointer(&e[24])) = n
}

// Cmd is the entry's 80-byte command area.
func (e *SQE) Cmd() []byte { return e[CmdOffset : CmdOffset+CmdSize] }

// CQE is one completion: the submission's user data and its result
// (a negative errno on failure).
type CQE struct {
	UserData uint64
	Res      int32
	Flags    uint32
}

// Ring is one io_uring instance.
type Ring struct {
	fd int

	sqRing, cqRing, sqesMem []byte

	sqHead, sqTail *uint32
	sqMask         uint32
	sqArray        []uint32
	sqes           []SQE
	// sqLocal is the tail of entries handed out by Next and not yet
	// published; pending counts those not yet submitted.
	sqLocal uint32
	pending uint32

	cqHead, cqTail *uint32
	cqMask         uint32
	cqes           []CQE
}

// New sets up a ring with room for entries submissions and cqEntries
// completions (0: twice entries). Entries are handed out by Next; the
// kernel is told about them by Submit.
func New(entries, cqEntries uint32) (*Ring, error) {
	p := params{flags: setupSQE128 | setupCoopTaskrun}
	if cqEntries != 0 {
		p.flags |= setupCQSize
		p.cqEntries = cqEntries
	}
	fd, _, e := unix.Syscall(unix.SYS_IO_URING_SETUP, uintptr(entries), uintptr(unsafe.Pointer(&p)), 0)
	if e != 0 {
		return nil, fmt.Errorf("io_uring_setup: %w", e)
	}
	r := &Ring{fd: int(fd)}
	if err := r.mapRings(&p); err != nil {
		r.Close()
		return nil, err
	}
	return r, nil
}

func (r *Ring) mapRings(p *params) error {
	sqSize := int(p.sqOff.array) + int(p.sqEntries)*4
	cqSize := int(p.cqOff.cqes) + int(p.cqEntries)*int(unsafe.Sizeof(CQE{}))
	if p.features&featSingleMmap != 0 {
		sqSize = max(sqSize, cqSize)
		cqSize = sqSize
	}
	var err error
	r.sqRing, err = unix.Mmap(r.fd, offSQRing, sqSize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED|unix.MAP_POPULATE)
	if err != nil {
		return fmt.Errorf("io_uring: mapping the submission ring: %w", err)
	}
	if p.features&featSingleMmap != 0 {
		r.cqRing = r.sqRing
	} else if r.cqRing, err = unix.Mmap(r.fd, offCQRing, cqSize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED|unix.MAP_POPULATE); err != nil {
		return fmt.Errorf("io_uring: mapping the completion ring: %w", err)
	}
	r.sqesMem, err = unix.Mmap(r.fd, offSQEs, int(p.sqEntries)*SQESize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED|unix.MAP_POPULATE)
	if err != nil {
		return fmt.Errorf("io_uring: mapping the submission entries: %w", err)
	}
	r.sqHead = (*uint32)(unsafe.Pointer(&r.sqRing[p.sqOff.head]))
	r.sqTail = (*uint32)(unsafe.Pointer(&r.sqRing[p.sqOff.tail]))
	r.sqMask = *(*uint32)(unsafe.Pointer(&r.sqRing[p.sqOff.ringMask]))
	r.sqArray = unsafe.Slice((*uint32)(unsafe.Pointer(&r.sqRing[p.sqOff.array])), p.sqEntries)
	r.sqes = unsafe.Slice((*SQE)(unsafe.Pointer(&r.sqesMem[0])), p.sqEntries)
	r.sqLocal = atomic.LoadUint32(r.sqTail)
	r.cqHead = (*uint32)(unsafe.Pointer(&r.cqRing[p.cqOff.head]))
	r.cqTail = (*uint32)(unsafe.Pointer(&r.cqRing[p.cqOff.tail]))
	r.cqMask = *(*uint32)(unsafe.Pointer(&r.cqRing[p.cqOff.ringMask]))
	r.cqes = unsafe.Slice((*CQE)(unsafe.Pointer(&r.cqRing[p.cqOff.cqes])), p.cqEntries)
	return nil
}

// Fd is the ring's descriptor: it polls readable when completions wait.
func (r *Ring) Fd() int { return r.fd }

// ErrFull is returned by Next when every submission entry is taken.
var ErrFull = errors.New("io_uring: submission queue full")

// Next returns a zeroed submission entry, to be filled and then
// submitted by Submit.
func (r *Ring) Next() (*SQE, error) {
	head := atomic.LoadUint32(r.sqHead)
	if r.sqLocal-head >= uint32(len(r.sqes)) {
		// The kernel consumes entries at io_uring_enter; a full queue
		// is only possible with more than len(sqes) unsubmitted ones.
		return nil, ErrFull
	}
	idx := r.sqLocal & r.sqMask
	e := &r.sqes[idx]
	*e = SQE{}
	r.sqArray[idx] = idx
	r.sqLocal++
	r.pending++
	return e, nil
}

// Pending is the number of entries Next handed out since the last Submit.
func (r *Ring) Pending() int { return int(r.pending) }

// Submit hands the entries filled since the last Submit to the kernel,
// without waiting for completions.
func (r *Ring) Submit() error {
	if r.pending == 0 {
		return nil
	}
	atomic.StoreUint32(r.sqTail, r.sqLocal)
	for r.pending > 0 {
		n, err := r.enter(r.pending, 0, 0)
		if err == unix.EINTR || err == unix.EAGAIN || err == unix.EBUSY {
			// EAGAIN/EBUSY: the kernel is short of memory or the
			// completion queue is overflowing; the caller reaps
			// completions and submits again next time.
			if err == unix.EINTR {
				continue
			}
			return err
		}
		if err != nil {
			return fmt.Errorf("io_uring_enter: %w", err)
		}
		r.pending -= uint32(n)
	}
	return nil
}

// Wait blocks until at least one completion waits (after submitting
// what is pending).
func (r *Ring) Wait() error {
	atomic.StoreUint32(r.sqTail, r.sqLocal)
	n, err := r.enter(r.pending, 1, enterGetEvents)
	if err == nil {
		r.pending -= uint32(n)
	}
	return err
}

func (r *Ring) enter(toSubmit, minComplete, flags uint32) (int, error) {
	n, _, e := unix.Syscall6(unix.SYS_IO_URING_ENTER, uintptr(r.fd), uintptr(toSubmit), uintptr(minComplete), uintptr(flags), 0, 0)
	if e != 0 {
		return 0, e
	}
	return int(n), nil
}

// Reap calls fn for every completion that waits, in order, and consumes
// them. It makes no system call.
func (r *Ring) Reap(fn func(c CQE)) int {
	head := *r.cqHead
	tail := atomic.LoadUint32(r.cqTail)
	n := 0
	for ; head != tail; head++ {
		c := r.cqes[head&r.cqMask]
		// Publish the slot before fn, which may submit and so make
		// the kernel post more completions.
		atomic.StoreUint32(r.cqHead, head+1)
		fn(c)
		n++
	}
	return n
}

// Ready reports whether completions wait, without a system call.
func (r *Ring) Ready() bool {
	return *r.cqHead != atomic.LoadUint32(r.cqTail)
}

// Close releases the ring. Commands still queued in the kernel are
// cancelled.
func (r *Ring) Close() error {
	if r.sqesMem != nil {
		_ = unix.Munmap(r.sqesMem)
	}
	if r.cqRing != nil && (r.sqRing == nil || &r.cqRing[0] != &r.sqRing[0]) {
		_ = unix.Munmap(r.cqRing)
	}
	if r.sqRing != nil {
		_ = unix.Munmap(r.sqRing)
	}
	r.sqesMem, r.cqRing, r.sqRing = nil, nil, nil
	if r.fd < 0 {
		return nil
	}
	err := unix.Close(r.fd)
	r.fd = -1
	return err
}
