package fusefs

import (
	"fmt"
	"os"
	"strconv"
	"strings"
	"unsafe"

	"github.com/hanwen/go-fuse/v2/fuse"
	"golang.org/x/sys/unix"

	"imgfuse/coroutine"
	"imgfuse/internal/uring"
)

// FUSE-over-io_uring (Linux 6.14+, fs/fuse/dev_uring.c) on the event
// loops. The kernel keeps one request queue per possible CPU and puts a
// request on the queue of the CPU its caller runs on; the daemon hands it
// "ring entries" (a header buffer and a payload buffer each) with
// IORING_OP_URING_CMD submissions, and a request arrives as the
// completion of one. The reply goes back in the same entry's buffers with
// COMMIT_AND_FETCH, which also re-arms the entry. Each loop owns one ring
// and serves the queues q with q mod len(loops) == its index, with the
// protocol server and coroutines it uses for /dev/fuse, which keeps
// serving what the kernel still sends there (FORGET, INTERRUPT) and
// everything if the ring cannot be set up. The package doc ("Serving")
// has the numbers.

// Commands of IORING_OP_URING_CMD on /dev/fuse (include/uapi/linux/fuse.h).
const (
	uringCmdRegister       = 1
	uringCmdCommitAndFetch = 2
)

// uringHeader is struct fuse_uring_req_header: the request's fuse_in_header
// (the reply's fuse_out_header), its per-opcode header, and
// fuse_uring_ent_in_out.
type uringHeader struct {
	inOut     [128]byte
	opIn      [128]byte
	flags     uint64
	commitID  uint64
	payloadSz uint32
	_         uint32
	_         uint64
}

// uringEntriesPerQueue is how many requests of one CPU's queue can be in
// the daemon at once. fio at QD32 from one thread fills one queue.
const uringEntriesPerQueue = 64

// uringParamPath is the fuse module's switch; only root can set it, and
// imgfuse never does.
const uringParamPath = "/sys/module/fuse/parameters/enable_uring"

// URingAvailable reports whether the kernel offers FUSE-over-io_uring
// (the fuse module's enable_uring parameter is set).
func URingAvailable() bool {
	b, err := os.ReadFile(uringParamPath)
	return err == nil && strings.TrimSpace(string(b)) == "Y"
}

// possibleCPUs is the kernel's num_possible_cpus(): the number of queues
// that must each have an entry before the ring is used.
func possibleCPUs() (int, error) {
	b, err := os.ReadFile("/sys/devices/system/cpu/possible")
	if err != nil {
		return 0, err
	}
	n := 0
	for _, r := range strings.Split(strings.TrimSpace(string(b)), ",") {
		lo, hi, isRange := strings.Cut(r, "-")
		a, err := strconv.Atoi(lo)
		if err != nil {
			return 0, fmt.Errorf("parsing %q: %w", b, err)
		}
		z := a
		if isRange {
			if z, err = strconv.Atoi(hi); err != nil {
				return 0, fmt.Errorf("parsing %q: %w", b, err)
			}
		}
		n = max(n, z+1)
	}
	return n, nil
}

// uringLoop is one loop's ring and the entries it registered.
type uringLoop struct {
	c    *conn
	ring *uring.Ring
	ents []*uringEnt
	// live counts entries registered and not yet ended by a failed
	// completion; the ring closes when it reaches 0.
	live   int
	hdrMem []byte // every entry's header, one mapping
	// serveFn is serve bound once.
	serveFn func(co *coroutine.Co, arg any)
	// unhook removes the loop's poller and idle hook for the ring.
	unhook []func()
	// fat counts entries whose payload buffer has more than
	// uringThinPayload bytes resident (see trim).
	fat int
}

// Payload memory. Every entry's payload buffer has room for the largest
// request (1 MiB), but its pages are only resident once a request or reply
// has used them; the kernel hands out the most recently re-armed entries
// first, so a reader at QD8 keeps 8 of them busy, not 128. Up to
// uringMaxFat entries of a loop keep more than uringThinPayload resident;
// beyond that, an entry gives back what it used past it once its reply
// is committed (madvise(MADV_DONTNEED), and page faults when it is used
// again), so that a burst of 1 MiB writes (64 in flight) does not leave
// 128 MiB resident. A reply's own bytes are never given back under the
// kernel, so an entry whose last reply was a large READ keeps it until its
// next request.
const (
	uringThinPayload = 128 << 10
	uringMaxFat      = 16
)

// uringEnt is one ring entry: its buffers and what serving it needs.
type uringEnt struct {
	id      uint64 // index in ents, the user data of its submissions
	qid     uint16
	hdr     *uringHeader
	payload []byte // mapped outside the Go heap; page-aligned
	iov     [2]unix.Iovec
	in      [3][]byte
	out     [2][]byte
	// used is how much of payload may be resident: the most a request
	// or reply has used since it was last trimmed.
	used int
}

// startURing registers ring entries for every CPU queue of the
// connection on the loops; a queue q goes to conns[q mod len(conns)].
// payload is the size of the largest request or reply payload. It
// returns once every loop has submitted its registrations; a failure
// leaves the connection served through /dev/fuse.
func (s *serving) startURing(payload int) error {
	nq, err := possibleCPUs()
	if err != nil {
		return fmt.Errorf("counting CPUs: %w", err)
	}
	errs := make(chan error, len(s.conns))
	for i, c := range s.conns {
		var qids []uint16
		for q := i; q < nq; q += len(s.conns) {
			qids = append(qids, uint16(q))
		}
		c.loop.Post(func() { errs <- c.startURing(qids, payload) })
	}
	var first error
	for range s.conns {
		if err := <-errs; err != nil && first == nil {
			first = err
		}
	}
	return first
}

// startURing sets up the loop's ring and registers its queues' entries.
// Loop thread only: the ring's task work runs on the thread that submits.
func (c *conn) startURing(qids []uint16, payload int) error {
	if len(qids) == 0 {
		return nil
	}
	n := len(qids) * uringEntriesPerQueue
	ring, err := uring.New(uint32(n), uint32(2*n))
	if err != nil {
		return err
	}
	u := &uringLoop{c: c, ring: ring}
	u.serveFn = u.serve
	hsz := int(unsafe.Sizeof(uringHeader{}))
	u.hdrMem, err = unix.Mmap(-1, 0, n*hsz, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		ring.Close()
		return fmt.Errorf("mapping ring headers: %w", err)
	}
	for i := range n {
		pl, err := unix.Mmap(-1, 0, payload, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
		if err != nil {
			u.release()
			return fmt.Errorf("mapping ring payloads: %w", err)
		}
		e := &uringEnt{id: uint64(i), qid: qids[i/uringEntriesPerQueue], payload: pl}
		e.hdr = (*uringHeader)(unsafe.Pointer(&u.hdrMem[i*hsz]))
		e.iov[0] = unix.Iovec{Base: &u.hdrMem[i*hsz]}
		e.iov[0].SetLen(hsz)
		e.iov[1] = unix.Iovec{Base: &pl[0]}
		e.iov[1].SetLen(len(pl))
		u.ents = append(u.ents, e)
	}
	for _, e := range u.ents {
		sqe, err := ring.Next()
		if err != nil {
			u.release()
			return err
		}
		sqe.SetOp(uring.OpURingCmd, int32(c.fd), e.id)
		sqe.SetCmdOp(uringCmdRegister)
		sqe.SetAddr(unsafe.Pointer(&e.iov[0]), 2)
		setCmdReq(sqe, 0, e.qid)
	}
	if err := ring.Submit(); err != nil {
		u.release()
		return err
	}
	u.live = n
	// A REGISTER the kernel refuses completes at once.
	var refused error
	ring.Reap(func(cqe uring.CQE) {
		if cqe.Res < 0 {
			u.live--
			refused = fmt.Errorf("FUSE_IO_URING_CMD_REGISTER: %w", unix.Errno(-cqe.Res))
		}
	})
	if refused != nil {
		// The kernel has given up on io_uring for the connection
		// (fc->io_uring = 0) and serves /dev/fuse; cancelled entries
		// end as the ring closes.
		u.release()
		return refused
	}
	// Completions posted other than by task work (a commit refused
	// while submitting, the entries cancelled at unmount) make the
	// ring's descriptor readable.
	if err := c.loop.Watch(ring.Fd(), unix.EPOLLIN, func(uint32) { u.poll() }); err != nil {
		u.release()
		return err
	}
	c.u = u
	u.unhook = append(u.unhook, c.loop.OnPoll(u.poll), c.loop.OnIdle(u.submit))
	return nil
}

// setCmdReq fills struct fuse_uring_cmd_req in the command area.
func setCmdReq(sqe *uring.SQE, commitID uint64, qid uint16) {
	cmd := sqe.Cmd()
	*(*uint64)(unsafe.Pointer(&cmd[8])) = commitID
	*(*uint16)(unsafe.Pointer(&cmd[16])) = qid
}

// release frees the ring and the buffers; no entry may be in use.
func (u *uringLoop) release() {
	u.ring.Close()
	for _, e := range u.ents {
		_ = unix.Munmap(e.payload)
	}
	u.ents = nil
	if u.hdrMem != nil {
		_ = unix.Munmap(u.hdrMem)
		u.hdrMem = nil
	}
}

// poll starts a coroutine for every request that arrived. Loop pollers
// run without a system call; the kernel wakes the loop out of epoll_wait
// (EINTR) to run the task work that fills an entry.
func (u *uringLoop) poll() bool {
	if u.ring == nil || !u.ring.Ready() {
		return false
	}
	u.ring.Reap(u.complete)
	if u.live == 0 {
		u.close()
	}
	return true
}

// complete handles one completion: a request in an entry, or the end of
// an entry.
func (u *uringLoop) complete(cqe uring.CQE) {
	if cqe.UserData >= uint64(len(u.ents)) {
		return
	}
	e := u.ents[cqe.UserData]
	if cqe.Res < 0 {
		// ENOTCONN: the connection is gone (unmounted or aborted);
		// anything else ends the entry too.
		if cqe.Res != -int32(unix.ENOTCONN) && cqe.Res != -int32(unix.ECANCELED) && cqe.Res != -int32(unix.ECONNABORTED) {
			u.c.s.log.Printf("fusefs: io_uring entry %d: %v", e.id, unix.Errno(-cqe.Res))
		}
		u.live-- // poll closes the ring when it reaches 0
		return
	}
	h := (*fuse.InHeader)(unsafe.Pointer(&e.hdr.inOut[0]))
	pl := int(e.hdr.payloadSz)
	op := int(h.Length) - inHeaderSize - pl
	if op < 0 || op > len(e.hdr.opIn) || pl > len(e.payload) {
		u.c.s.log.Printf("fusefs: io_uring request of %d bytes with a %d-byte payload", h.Length, pl)
		u.replyErr(e, h, unix.EIO)
		return
	}
	e.in[0] = e.hdr.inOut[:inHeaderSize]
	e.in[1] = e.hdr.opIn[:op]
	e.in[2] = e.payload[:pl]
	u.use(e, pl)
	u.c.inflight++
	u.c.loop.Go(u.serveFn, e)
}

// serve is a request's coroutine.
func (u *uringLoop) serve(co *coroutine.Co, arg any) {
	e := arg.(*uringEnt)
	c := u.c
	c.rfs.co = co
	h := *(*fuse.InHeader)(unsafe.Pointer(&e.hdr.inOut[0]))
	e.out[0] = e.hdr.inOut[:outHeaderSize]
	e.out[1] = e.payload
	n := c.answer(e.in[:], &h, &e.out)
	e.in = [3][]byte{}
	e.out = [2][]byte{}
	if n == 0 {
		// Every request of the ring takes a reply; an entry is only
		// re-armed by one.
		u.replyErr(e, &h, unix.ENOSYS)
	} else {
		u.commit(e, n-outHeaderSize)
	}
	c.inflight--
	c.maybeDone()
}

// replyErr answers the entry's request with an error.
func (u *uringLoop) replyErr(e *uringEnt, h *fuse.InHeader, errno unix.Errno) {
	*(*fuse.OutHeader)(unsafe.Pointer(&e.hdr.inOut[0])) = fuse.OutHeader{
		Length: uint32(outHeaderSize), Status: -int32(errno), Unique: h.Unique,
	}
	u.commit(e, 0)
}

// commit queues the entry's reply, which has payload bytes after the
// header, and asks for the next request; the loop's idle hook submits.
func (u *uringLoop) commit(e *uringEnt, payload int) {
	if u.ring == nil {
		return
	}
	e.hdr.payloadSz = uint32(payload)
	u.trim(e, payload)
	sqe, err := u.ring.Next()
	if err == uring.ErrFull {
		// More commits than entries cannot be pending; submit and
		// take the slot.
		_ = u.ring.Submit()
		sqe, err = u.ring.Next()
	}
	if err != nil {
		u.c.s.log.Printf("fusefs: io_uring: %v", err)
		return
	}
	sqe.SetOp(uring.OpURingCmd, int32(u.c.fd), e.id)
	sqe.SetCmdOp(uringCmdCommitAndFetch)
	setCmdReq(sqe, e.hdr.commitID, e.qid)
}

// use notes that n bytes of the entry's payload are in use (a request
// or a reply), counting the entries that hold more than
// uringThinPayload.
func (u *uringLoop) use(e *uringEnt, n int) {
	if n > e.used {
		if e.used <= uringThinPayload && n > uringThinPayload {
			u.fat++
		}
		e.used = n
	}
}

// trim gives back the entry's payload memory past uringThinPayload, and
// past its reply of reply bytes, if too many entries hold more (see
// uringMaxFat). Called before the reply is committed: the reply's own
// bytes stay.
func (u *uringLoop) trim(e *uringEnt, reply int) {
	u.use(e, reply)
	if e.used <= uringThinPayload || u.fat <= uringMaxFat {
		return
	}
	keep := (max(reply, uringThinPayload) + 4095) &^ 4095
	if keep < e.used {
		_ = unix.Madvise(e.payload[keep:e.used], unix.MADV_DONTNEED)
		e.used = keep
	}
	if e.used <= uringThinPayload {
		u.fat--
	}
}

// submit is the loop's idle hook: the iteration's commits in one
// io_uring_enter.
func (u *uringLoop) submit() {
	if u.ring == nil || u.ring.Pending() == 0 {
		return
	}
	if err := u.ring.Submit(); err != nil {
		u.c.s.log.Printf("fusefs: io_uring submit: %v", err)
	}
}

// close releases the ring once every entry has ended.
func (u *uringLoop) close() {
	u.c.loop.Unwatch(u.ring.Fd())
	for _, f := range u.unhook {
		f()
	}
	u.release()
	u.ring = nil
	u.c.maybeDone()
}
