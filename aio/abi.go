//go:build linux && (amd64 || arm64 || riscv64 || loong64 || ppc64le)

package aio

import (
	"unsafe"

	"golang.org/x/sys/unix"
)

// The Linux native AIO ABI, from include/uapi/linux/aio_abi.h. x/sys/unix has
// the syscall numbers but neither the structures nor the IOCB_* constants.

// iocb opcodes (enum in aio_abi.h).
const (
	iocbCmdPread  = 0
	iocbCmdPwrite = 1
	iocbCmdFsync  = 2
	iocbCmdFdsync = 3
)

// iocbFlagResfd asks the kernel to signal iocb.resfd (an eventfd) when the
// request completes.
const iocbFlagResfd = 1 << 0

// iocb is struct iocb on a little-endian 64-bit machine:
//
//	__u64 aio_data;            user data, returned in io_event.data
//	__u32 aio_key;             set by the kernel (KIOCB_KEY)
//	__kernel_rwf_t aio_rw_flags;
//	__u16 aio_lio_opcode;
//	__s16 aio_reqprio;
//	__u32 aio_fildes;
//	__u64 aio_buf;
//	__u64 aio_nbytes;
//	__s64 aio_offset;
//	__u64 aio_reserved2;
//	__u32 aio_flags;           IOCB_FLAG_*
//	__u32 aio_resfd;           eventfd to signal if IOCB_FLAG_RESFD
//
// On a big-endian machine aio_key and aio_rw_flags swap places, and on a
// 32-bit one aio_buf is padded; the build constraint on this file restricts
// the package to little-endian 64-bit Linux, and the size checks below hold
// the layout to the ABI.
type iocb struct {
	data     uint64
	key      uint32
	rwFlags  int32
	opcode   uint16
	reqprio  int16
	fildes   uint32
	buf      uint64
	nbytes   uint64
	offset   int64
	reserved uint64
	flags    uint32
	resfd    uint32
}

// ioEvent is struct io_event: the completed request's data, the iocb's
// address, and the result (bytes transferred or -errno).
type ioEvent struct {
	data uint64
	obj  uint64
	res  int64
	res2 int64
}

// Compile-time size checks: a negative array length fails the build.
var (
	_ [64 - unsafe.Sizeof(iocb{})]byte
	_ [unsafe.Sizeof(iocb{}) - 64]byte
	_ [32 - unsafe.Sizeof(ioEvent{})]byte
	_ [unsafe.Sizeof(ioEvent{}) - 32]byte
	_ [unsafe.Offsetof(iocb{}.opcode) - 16]byte
	_ [16 - unsafe.Offsetof(iocb{}.opcode)]byte
	_ [unsafe.Offsetof(iocb{}.flags) - 56]byte
	_ [56 - unsafe.Offsetof(iocb{}.flags)]byte
)

// aioContext is aio_context_t: an opaque handle (the address of the
// completion ring the kernel maps into our address space).
type aioContext uintptr

func ioSetup(nr int) (aioContext, error) {
	var ctx aioContext
	_, _, e := unix.Syscall(unix.SYS_IO_SETUP, uintptr(nr), uintptr(unsafe.Pointer(&ctx)), 0)
	if e != 0 {
		return 0, e
	}
	return ctx, nil
}

func ioDestroy(ctx aioContext) error {
	_, _, e := unix.Syscall(unix.SYS_IO_DESTROY, uintptr(ctx), 0, 0)
	if e != 0 {
		return e
	}
	return nil
}

// ioSubmit submits the iocbs pointed to by cbs. It returns how many were
// accepted; an error only when none was.
func ioSubmit(ctx aioContext, cbs []*iocb) (int, error) {
	if len(cbs) == 0 {
		return 0, nil
	}
	n, _, e := unix.Syscall(unix.SYS_IO_SUBMIT, uintptr(ctx), uintptr(len(cbs)), uintptr(unsafe.Pointer(&cbs[0])))
	if e != 0 {
		return 0, e
	}
	return int(n), nil
}

// ioGetEventsNow reaps up to len(evs) completed events without waiting.
func ioGetEventsNow(ctx aioContext, evs []ioEvent) (int, error) {
	var ts unix.Timespec // zero: do not wait
	n, _, e := unix.RawSyscall6(unix.SYS_IO_GETEVENTS, uintptr(ctx), 0, uintptr(len(evs)),
		uintptr(unsafe.Pointer(&evs[0])), uintptr(unsafe.Pointer(&ts)), 0)
	if e != 0 {
		return 0, e
	}
	return int(n), nil
}
