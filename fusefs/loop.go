package fusefs

import (
	"errors"
	"fmt"
	"log"
	"os"
	"strconv"
	"sync"
	"unsafe"

	"github.com/hanwen/go-fuse/v2/fuse"
	"golang.org/x/sys/unix"

	"imgfuse/aio"
	"imgfuse/coroutine"
)

// This file is the transport between the kernel and go-fuse's protocol
// code: on each of the process's event loops (coroutine.Loops), a cloned
// non-blocking /dev/fuse descriptor in the loop's epoll; the loop reads
// requests until EAGAIN and runs each in a coroutine, in which
// fuse.ProtocolServer decodes it, calls the handler and encodes the reply,
// which goes out with writev. The package doc ("Serving") says why.

// fuseDevIocClone is FUSE_DEV_IOC_CLONE, _IOR(229, 0, uint32_t): attach a
// newly opened /dev/fuse descriptor to the connection of another.
const fuseDevIocClone = 0x8004e500

// Request layout constants, from the kernel ABI (include/uapi/linux/fuse.h)
// as go-fuse declares it.
const (
	inHeaderSize  = int(unsafe.Sizeof(fuse.InHeader{}))  // 40
	outHeaderSize = int(unsafe.Sizeof(fuse.OutHeader{})) // 16
	// writePayloadOff is where a WRITE's data starts in a request.
	writePayloadOff = int(unsafe.Sizeof(fuse.WriteIn{}))
	// readSizeOff is the offset of ReadIn.Size (READ, READDIR,
	// READDIRPLUS) and xattrSizeOff of GetXAttrIn.Size (GETXATTR,
	// LISTXATTR): the payload size the reply may carry.
	readSizeOff  = int(unsafe.Offsetof(fuse.ReadIn{}.Size))
	xattrSizeOff = int(unsafe.Offsetof(fuse.GetXAttrIn{}.Size))
)

// Opcodes the loop looks at (go-fuse keeps its constants private).
const (
	opForget      = 2
	opRead        = 15
	opGetxattr    = 22
	opListxattr   = 23
	opInit        = 26
	opInterrupt   = 36
	opReaddir     = 28
	opNotifyReply = 41
	opBatchForget = 42
	opReaddirplus = 44
)

// smallReq is the largest request copied out of the reader's big buffer
// (every request but a WRITE with data is far smaller), so that a request
// in flight holds a big buffer only when its payload lives there.
const smallReq = 512

// minOut is the reply room of requests without a sized payload: every
// fixed-size reply of the protocol fits.
const minOut = 4096

// reqBufs is one request's small buffers, pooled, and what holds its
// input: small, a medium buffer or a big one.
type reqBufs struct {
	small [smallReq]byte
	hdr   [outHeaderSize]byte
	in    [1][]byte
	out   [2][]byte
	med   *[]byte // the medium buffer holding in[0], or nil
	big   *bigBuf // the big buffer holding in[0], or nil
}

// Request memory. The reader reads into a big buffer (a whole 1 MiB WRITE
// fits); a request of at most smallReq bytes is copied into its reqBufs,
// one of at most medMax bytes (a WRITE of up to 128 KiB) into a medium
// buffer, so that only large WRITEs keep a big buffer while they are
// served. Big buffers are mapped outside the Go heap and at most
// maxIdleBig are kept: as heap, 64 MiB of 1 MiB WRITEs in flight raised
// the collector's goal by as much and the daemon reached 155 MiB resident
// under a loop-mounted ext4 copy.
const (
	medMin     = 8 << 10
	medClasses = 5 // 8 KiB .. 128 KiB
	medMax     = medMin << (medClasses - 1)
	maxIdleBig = 16
)

// medPools hold medium buffers by size class, WRITE payload 4 KiB-aligned.
var medPools [medClasses]sync.Pool

func getMed(n int) (*[]byte, bool) {
	for i := range medPools {
		size := medMin << i
		if n > size {
			continue
		}
		if p, _ := medPools[i].Get().(*[]byte); p != nil {
			return p, true
		}
		raw := aio.AlignedBuffer(size + 4096)
		b := raw[4096-writePayloadOff:][:size:size]
		return &b, true
	}
	return nil, false
}

func putMed(p *[]byte) {
	for i := range medPools {
		if cap(*p) == medMin<<i {
			*p = (*p)[:cap(*p)]
			medPools[i].Put(p)
			return
		}
	}
}

// bigBuf is a read buffer large enough for any request, with the WRITE
// payload 4 KiB-aligned (the driver writes it with O_DIRECT unbounced).
type bigBuf struct {
	b       []byte
	mapping []byte // the anonymous mapping b lies in; nil if b is heap
}

// bigPool keeps up to maxIdleBig idle big buffers.
type bigPool struct {
	size int
	mu   sync.Mutex
	idle []*bigBuf // protected by mu
}

func (p *bigPool) get() *bigBuf {
	p.mu.Lock()
	if n := len(p.idle); n > 0 {
		bb := p.idle[n-1]
		p.idle = p.idle[:n-1]
		p.mu.Unlock()
		return bb
	}
	p.mu.Unlock()
	m, err := unix.Mmap(-1, 0, p.size+4096, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		raw := aio.AlignedBuffer(p.size + 4096)
		return &bigBuf{b: raw[4096-writePayloadOff:][:p.size]}
	}
	return &bigBuf{b: m[4096-writePayloadOff:][:p.size], mapping: m}
}

func (p *bigPool) put(bb *bigBuf) {
	p.mu.Lock()
	if len(p.idle) < maxIdleBig {
		p.idle = append(p.idle, bb)
		p.mu.Unlock()
		return
	}
	p.mu.Unlock()
	bb.free()
}

// drain releases the idle buffers; the loop has ended.
func (p *bigPool) drain() {
	p.mu.Lock()
	idle := p.idle
	p.idle = nil
	p.mu.Unlock()
	for _, bb := range idle {
		bb.free()
	}
}

func (bb *bigBuf) free() {
	if bb.mapping != nil {
		_ = unix.Munmap(bb.mapping)
	}
}

var reqPool = sync.Pool{New: func() any { return new(reqBufs) }}

// outPools hold reply payload buffers by size class: 4 KiB << i, page
// aligned so that READ data can go straight from an O_DIRECT image read
// into the reply.
var outPools [9]sync.Pool // 4 KiB .. 1 MiB

func getOut(n int) *[]byte {
	i := 0
	for minOut<<i < n && i < len(outPools)-1 {
		i++
	}
	if minOut<<i < n {
		b := aio.AlignedBuffer(n)
		return &b
	}
	if p, _ := outPools[i].Get().(*[]byte); p != nil {
		return p
	}
	b := aio.AlignedBuffer(minOut << i)
	return &b
}

func putOut(p *[]byte) {
	n := cap(*p)
	for i := range outPools {
		if minOut<<i == n {
			*p = (*p)[:n]
			outPools[i].Put(p)
			return
		}
	}
}

// cloneConn opens a new non-blocking /dev/fuse descriptor on the
// connection of fd. Requests of the connection can be read from any of its
// descriptors; each reply must go to the descriptor its request came from.
func cloneConn(fd int) (int, error) {
	nfd, err := unix.Open("/dev/fuse", unix.O_RDWR|unix.O_CLOEXEC|unix.O_NONBLOCK, 0)
	if err != nil {
		return -1, fmt.Errorf("open /dev/fuse: %w", err)
	}
	if err := unix.IoctlSetPointerInt(nfd, fuseDevIocClone, fd); err != nil {
		unix.Close(nfd)
		return -1, fmt.Errorf("FUSE_DEV_IOC_CLONE: %w", err)
	}
	return nfd, nil
}

// fuseDescriptors returns the descriptors of this process open on
// /dev/fuse.
func fuseDescriptors() map[int]bool {
	fds := map[int]bool{}
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		return fds
	}
	for _, e := range ents {
		n, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		if t, err := os.Readlink("/proc/self/fd/" + e.Name()); err == nil && t == "/dev/fuse" {
			fds[n] = true
		}
	}
	return fds
}

// mountMu serialises fuse.NewServer with the descriptor scan around it, so
// that the one new /dev/fuse descriptor is the new server's, and with the
// capture of stderr around it.
var mountMu sync.Mutex

// newServer mounts fsys with go-fuse (which also answers INIT) and returns
// the server and the descriptor of its connection, or -1 if it cannot be
// told apart. When fusermount3 refuses the mount, the error is a
// *FusermountError with its message.
func newServer(fsys fuse.RawFileSystem, mountpoint string, mopts *fuse.MountOptions) (*fuse.Server, int, error) {
	mountMu.Lock()
	defer mountMu.Unlock()
	before := fuseDescriptors()
	// fusermount3's reason for refusing a mount (fusermount.go).
	capture, cerr := captureStderr()
	srv, err := fuse.NewServer(fsys, mountpoint, mopts)
	if cerr == nil {
		out := capture.stop()
		if err != nil {
			err, out = fusermountError(err, out)
		}
		forwardStderr(out)
	}
	if err != nil {
		return nil, -1, err
	}
	fd := -1
	for n := range fuseDescriptors() {
		if before[n] {
			continue
		}
		if fd >= 0 {
			return srv, -1, nil // ambiguous
		}
		fd = n
	}
	return srv, fd, nil
}

// reqFS is the RawFileSystem one loop's protocol server calls: diskFS and
// the coroutine of the request being served. The loop sets co before each
// HandleRequest; a handler that needs it copies it first thing, before
// anything can yield (the loop's next request reuses the field).
type reqFS struct {
	*diskFS
	co *coroutine.Co
}

// conn serves the connection on one event loop, from its own clone of the
// connection's descriptor. All of its mutable state belongs to the loop's
// thread.
type conn struct {
	s    *serving
	loop *coroutine.Loop
	fd   int // the clone: non-blocking, in the loop's epoll
	ps   *fuse.ProtocolServer
	rfs  *reqFS
	// serveFn is c.serve, bound once: Go takes it with no allocation.
	serveFn func(co *coroutine.Co, arg any)
	// rd is the big buffer the next read goes into.
	rd *bigBuf
	// inflight counts requests read and not yet answered; once the
	// connection is gone (gone), the last one to finish ends the conn.
	inflight int
	gone     bool
	// u is the loop's FUSE-over-io_uring ring, or nil; the conn ends
	// once it has closed too (uring.go).
	u *uringLoop
}

// serving is a mounted connection served by every loop.
type serving struct {
	conns []*conn
	wg    sync.WaitGroup // one per conn, done when it has ended
	// big holds read buffers of the largest request the kernel sends
	// (MaxWrite of data after the WRITE header), rounded up.
	big bigPool
	log *log.Logger
}

// startLoops serves the connection of srv, whose descriptor is fd, on the
// process's event loops: one clone of the descriptor and one protocol
// server per loop. It returns an error, having changed nothing, if that is
// not possible.
func startLoops(srv *fuse.Server, fd int, fsys *diskFS, mopts *fuse.MountOptions) (*serving, error) {
	if fd < 0 {
		return nil, errors.New("the connection's descriptor is unknown")
	}
	s := &serving{big: bigPool{size: writePayloadOff + mopts.MaxWrite + 4096}, log: mopts.Logger}
	if s.log == nil {
		s.log = log.Default()
	}
	loops := coroutine.Loops()
	for _, l := range loops {
		c := &conn{s: s, loop: l, rfs: &reqFS{diskFS: fsys}}
		c.serveFn = c.serve
		ps, err := newProtocolServer(srv, c.rfs, mopts)
		if err != nil {
			s.closeAll()
			return nil, err
		}
		c.ps = ps
		if c.fd, err = cloneConn(fd); err != nil {
			s.closeAll()
			return nil, err
		}
		s.conns = append(s.conns, c)
	}
	for _, c := range s.conns {
		s.wg.Add(1)
		// EPOLLEXCLUSIVE: a request wakes one sleeping loop, not all
		// of them (the clones share one request queue and wait queue).
		if err := c.loop.Watch(c.fd, unix.EPOLLIN|unix.EPOLLEXCLUSIVE, c.readable); err != nil {
			// Loops already watching keep serving; this one never
			// will. Nothing has been read yet, so nothing is lost.
			s.log.Printf("fusefs: %v", err)
			unix.Close(c.fd)
			s.wg.Done()
		}
	}
	return s, nil
}

// closeAll closes the clones made so far, before any loop watches them.
func (s *serving) closeAll() {
	for _, c := range s.conns {
		unix.Close(c.fd)
	}
}

// newProtocolServer makes a protocol server for fsys that decodes requests
// as go-fuse's server negotiated them at INIT.
func newProtocolServer(srv *fuse.Server, fsys fuse.RawFileSystem, mopts *fuse.MountOptions) (*fuse.ProtocolServer, error) {
	ps := fuse.NewProtocolServer(fsys, mopts)
	// Replay the INIT go-fuse's server answered, so that the protocol
	// server decodes requests for the same protocol version and flags.
	// Its reply is not sent anywhere.
	init := *srv.KernelSettings()
	init.Length = uint32(unsafe.Sizeof(init))
	init.Opcode = opInit
	out := make([]byte, minOut)
	n, st := ps.HandleRequest([][]byte{unsafe.Slice((*byte)(unsafe.Pointer(&init)), unsafe.Sizeof(init))}, [][]byte{out})
	if !st.Ok() || n < outHeaderSize || (*fuse.OutHeader)(unsafe.Pointer(&out[0])).Status != 0 {
		return nil, fmt.Errorf("INIT replay failed: %v", st)
	}
	return ps, nil
}

// wait returns once the connection is gone and every request has been
// answered on every loop.
func (s *serving) wait() {
	s.wg.Wait()
	s.big.drain()
}

// readable is the descriptor's epoll handler, on the loop: it reads
// requests until EAGAIN and starts a coroutine for each, which runs until
// its first wait before the next read (so the iteration's AIO goes out in
// one io_submit when the reading is done).
func (c *conn) readable(uint32) {
	for !c.gone {
		if c.rd == nil {
			c.rd = c.s.big.get()
		}
		n, err := unix.Read(c.fd, c.rd.b)
		switch err {
		case nil:
		case unix.EAGAIN:
			return
		case unix.EINTR, unix.ENOENT:
			continue // ENOENT: the request was interrupted before we read it
		default:
			if err != unix.ENODEV { // ENODEV: unmounted or aborted
				c.s.log.Printf("fusefs: reading /dev/fuse: %v", err)
			}
			c.end()
			return
		}
		if n >= inHeaderSize && (*fuse.InHeader)(unsafe.Pointer(&c.rd.b[0])).Opcode == opInterrupt {
			// No handler ever looks at its cancel channel, so an
			// interrupt changes nothing; and a protocol server only
			// knows its own loop's requests: it would answer EAGAIN
			// and the kernel would requeue the interrupt for as long
			// as the request runs. An interrupt needs no reply.
			continue
		}
		rb := reqPool.Get().(*reqBufs)
		if n <= smallReq {
			rb.in[0] = rb.small[:copy(rb.small[:], c.rd.b[:n])]
		} else if med, ok := getMed(n); ok {
			rb.in[0] = (*med)[:copy(*med, c.rd.b[:n])]
			rb.med = med
		} else {
			rb.in[0] = c.rd.b[:n]
			rb.big = c.rd
			c.rd = nil
		}
		c.inflight++
		c.loop.Go(c.serveFn, rb)
	}
}

// end stops reading: the connection is gone. The conn ends when its last
// request has been answered.
func (c *conn) end() {
	c.gone = true
	c.loop.Unwatch(c.fd)
	if c.rd != nil {
		c.s.big.put(c.rd)
		c.rd = nil
	}
	c.maybeDone()
}

func (c *conn) maybeDone() {
	if c.gone && c.inflight == 0 && (c.u == nil || c.u.ring == nil) {
		unix.Close(c.fd)
		c.fd = -1
		c.s.wg.Done()
	}
}

// serve is a request's coroutine.
func (c *conn) serve(co *coroutine.Co, arg any) {
	rb := arg.(*reqBufs)
	c.rfs.co = co
	c.handle(rb)
	c.release(rb)
	c.inflight--
	c.maybeDone()
}

// release returns a served request's buffers.
func (c *conn) release(rb *reqBufs) {
	rb.in[0] = nil
	if rb.med != nil {
		putMed(rb.med)
		rb.med = nil
	}
	if rb.big != nil {
		c.s.big.put(rb.big)
		rb.big = nil
	}
	reqPool.Put(rb)
}

// handle serves one request read from /dev/fuse and writes its reply. A
// reply to /dev/fuse never blocks: the kernel takes it or refuses it at
// once.
func (c *conn) handle(rb *reqBufs) {
	in := rb.in[0]
	if len(in) < inHeaderSize {
		c.s.log.Printf("fusefs: short request (%d bytes)", len(in))
		return
	}
	h := (*fuse.InHeader)(unsafe.Pointer(&in[0]))
	want := minOut
	switch h.Opcode {
	case opRead, opReaddir, opReaddirplus:
		if len(in) >= readSizeOff+4 {
			want = max(want, int(*(*uint32)(unsafe.Pointer(&in[readSizeOff]))))
		}
	case opGetxattr, opListxattr:
		if len(in) >= xattrSizeOff+4 {
			want = max(want, int(*(*uint32)(unsafe.Pointer(&in[xattrSizeOff]))))
		}
	}
	outBuf := getOut(want)
	defer putOut(outBuf)
	rb.out[0] = rb.hdr[:]
	rb.out[1] = *outBuf
	n := c.answer(rb.in[:], h, &rb.out)
	if n == 0 {
		rb.out[1] = nil
		return // FORGET and friends: no reply
	}
	rb.out[1] = rb.out[1][:n-outHeaderSize]
	if _, err := unix.Writev(c.fd, rb.out[:]); err != nil && err != unix.ENOENT && err != unix.ENODEV {
		// ENOENT: the request was interrupted meanwhile; ENODEV: the
		// connection is gone. Anything else is a bug worth a line.
		c.s.log.Printf("fusefs: reply to opcode %d: %v", h.Opcode, err)
	}
	rb.out[1] = nil
}

// answer runs one request through the loop's protocol server: in is the
// request (its header is h), out[0] the room for the reply's header
// (outHeaderSize bytes) and out[1] for the rest. It returns the reply's
// length, header included, or 0 if the request takes none.
func (c *conn) answer(in [][]byte, h *fuse.InHeader, out *[2][]byte) int {
	hdr := out[0]
	n, st := c.ps.HandleRequest(in, out[:])
	switch {
	case !st.Ok():
		// Malformed, or a reply larger than we made room for: answer
		// with the error rather than leave the caller waiting.
		switch h.Opcode {
		case opForget, opBatchForget, opNotifyReply:
			return 0
		}
		*(*fuse.OutHeader)(unsafe.Pointer(&hdr[0])) = fuse.OutHeader{
			Length: uint32(outHeaderSize), Status: -int32(st), Unique: h.Unique,
		}
		return outHeaderSize
	case n == 0:
		return 0
	}
	return n
}
