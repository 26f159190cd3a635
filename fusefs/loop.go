package fusefs

import (
	"errors"
	"fmt"
	"log"
	"os"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"unsafe"

	"github.com/hanwen/go-fuse/v2/fuse"
	"golang.org/x/sys/unix"

	"imgfuse/aio"
)

// This file is the transport between the kernel and go-fuse's protocol
// code: goroutines that read requests from /dev/fuse through the Go
// netpoller and hand them to fuse.ProtocolServer, which decodes them, calls
// diskFS and encodes the reply. The package doc ("Serving") says why it
// replaces go-fuse's own reader loop.

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

// serveLoop serves one FUSE connection from a non-blocking descriptor.
//
// Goroutines: exactly one goroutine at a time reads (waits for the next
// request in the netpoller, holding no thread). When it receives a request
// it hands the reading over — to an idle goroutine of the loop if there is
// one, else to a new one — and serves its request itself, so a request
// that waits for I/O parks only its own goroutine. Having replied, it waits
// idle to be handed the reading again. Reusing goroutines keeps their
// stacks: a new goroutine grew its stack by copying on every request
// (runtime.copystack was ~7% of the daemon's CPU at QD1).
type serveLoop struct {
	ps *fuse.ProtocolServer
	f  *os.File // the cloned descriptor, non-blocking, in the netpoller
	fd int      // f's descriptor, for writev of replies

	// wake hands the reading to an idle goroutine (unbuffered: a send
	// succeeds only if one is waiting). stop is closed once the
	// connection is gone (ENODEV) and releases the idle goroutines.
	wake     chan struct{}
	stop     chan struct{}
	stopOnce sync.Once
	// idle counts goroutines waiting on wake, at most maxIdle.
	idle atomic.Int32

	wg sync.WaitGroup // every goroutine of the loop
	// big holds read buffers of the largest request the kernel sends
	// (MaxWrite of data after the WRITE header), rounded up.
	big bigPool
	log *log.Logger
}

// maxIdle bounds the goroutines kept waiting for work: more than the
// requests the kernel keeps in flight (MaxBackground 64 plus synchronous
// ones) would only hold stacks.
const maxIdle = 128

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
// connection of fd.
func cloneConn(fd int) (*os.File, int, error) {
	nfd, err := unix.Open("/dev/fuse", unix.O_RDWR|unix.O_CLOEXEC|unix.O_NONBLOCK, 0)
	if err != nil {
		return nil, -1, fmt.Errorf("open /dev/fuse: %w", err)
	}
	if err := unix.IoctlSetPointerInt(nfd, fuseDevIocClone, fd); err != nil {
		unix.Close(nfd)
		return nil, -1, fmt.Errorf("FUSE_DEV_IOC_CLONE: %w", err)
	}
	// os.NewFile sees O_NONBLOCK and registers the descriptor with the
	// netpoller: Read parks the goroutine, not a thread.
	return os.NewFile(uintptr(nfd), "/dev/fuse"), nfd, nil
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

// startLoop serves the connection of srv, whose descriptor is fd, from a
// non-blocking clone of it. It returns an error, having changed nothing,
// if that is not possible; the caller then serves with srv.Serve.
func startLoop(srv *fuse.Server, fd int, fsys fuse.RawFileSystem, mopts *fuse.MountOptions) (*serveLoop, error) {
	if fd < 0 {
		return nil, errors.New("the connection's descriptor is unknown")
	}
	ps := fuse.NewProtocolServer(fsys, mopts)
	// go-fuse's server has negotiated INIT; let the protocol server see
	// the same INIT so that it decodes requests for the same protocol
	// version and flags. Its reply is not sent anywhere.
	init := *srv.KernelSettings()
	init.Length = uint32(unsafe.Sizeof(init))
	init.Opcode = opInit
	out := make([]byte, minOut)
	n, st := ps.HandleRequest([][]byte{unsafe.Slice((*byte)(unsafe.Pointer(&init)), unsafe.Sizeof(init))}, [][]byte{out})
	if !st.Ok() || n < outHeaderSize || (*fuse.OutHeader)(unsafe.Pointer(&out[0])).Status != 0 {
		return nil, fmt.Errorf("INIT replay failed: %v", st)
	}
	f, nfd, err := cloneConn(fd)
	if err != nil {
		return nil, err
	}
	l := &serveLoop{
		ps:   ps,
		f:    f,
		fd:   nfd,
		big:  bigPool{size: writePayloadOff + mopts.MaxWrite + 4096},
		wake: make(chan struct{}),
		stop: make(chan struct{}),
		log:  mopts.Logger,
	}
	if l.log == nil {
		l.log = log.Default()
	}
	l.wg.Add(1)
	go l.serve()
	return l, nil
}

// wait returns once the connection is gone and every request has been
// answered, then closes the descriptor.
func (l *serveLoop) wait() {
	l.wg.Wait()
	l.f.Close()
	l.big.drain()
}

func (l *serveLoop) serve() {
	defer l.wg.Done()
	for {
		rb, ok := l.read()
		if !ok {
			l.stopOnce.Do(func() { close(l.stop) })
			return
		}
		l.startReader()
		l.handle(rb)
		l.release(rb)
		if !l.waitIdle() {
			return
		}
	}
}

// startReader hands the reading to an idle goroutine, or to a new one.
func (l *serveLoop) startReader() {
	select {
	case l.wake <- struct{}{}:
	default:
		l.wg.Add(1)
		go l.serve()
	}
}

// waitIdle waits until the caller is handed the reading (true), or the
// connection is gone or enough goroutines already wait (false).
func (l *serveLoop) waitIdle() bool {
	if l.idle.Add(1) > maxIdle {
		l.idle.Add(-1)
		return false
	}
	defer l.idle.Add(-1)
	select {
	case <-l.wake:
		return true
	case <-l.stop:
		return false
	}
}

// read waits for the next request and returns it in rb.in[0]; ok is false
// once the connection is gone.
func (l *serveLoop) read() (rb *reqBufs, ok bool) {
	big := l.big.get()
	for {
		n, err := l.f.Read(big.b)
		if err != nil {
			var en syscall.Errno
			switch {
			case errors.As(err, &en) && en == syscall.ENOENT:
				continue // the request was interrupted before we read it
			case errors.As(err, &en) && en == syscall.ENODEV:
				// Unmounted or aborted.
			default:
				l.log.Printf("fusefs: reading /dev/fuse: %v", err)
			}
			l.big.put(big)
			return nil, false
		}
		rb = reqPool.Get().(*reqBufs)
		if n <= smallReq {
			rb.in[0] = rb.small[:copy(rb.small[:], big.b[:n])]
			l.big.put(big)
		} else if med, ok := getMed(n); ok {
			rb.in[0] = (*med)[:copy(*med, big.b[:n])]
			rb.med = med
			l.big.put(big)
		} else {
			rb.in[0] = big.b[:n]
			rb.big = big
		}
		return rb, true
	}
}

// release returns a served request's buffers.
func (l *serveLoop) release(rb *reqBufs) {
	rb.in[0] = nil
	if rb.med != nil {
		putMed(rb.med)
		rb.med = nil
	}
	if rb.big != nil {
		l.big.put(rb.big)
		rb.big = nil
	}
	reqPool.Put(rb)
}

// handle serves one request and writes its reply.
func (l *serveLoop) handle(rb *reqBufs) {
	in := rb.in[0]
	if len(in) < inHeaderSize {
		l.log.Printf("fusefs: short request (%d bytes)", len(in))
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
	n, st := l.ps.HandleRequest(rb.in[:], rb.out[:])
	switch {
	case !st.Ok():
		// Malformed, or a reply larger than we made room for: answer
		// with the error rather than leave the caller waiting.
		switch h.Opcode {
		case opForget, opBatchForget, opNotifyReply:
			return
		}
		*(*fuse.OutHeader)(unsafe.Pointer(&rb.hdr[0])) = fuse.OutHeader{
			Length: uint32(outHeaderSize), Status: -int32(st), Unique: h.Unique,
		}
		rb.out[1] = nil
		n = outHeaderSize
	case n == 0:
		return // FORGET and friends: no reply
	}
	rb.out[1] = rb.out[1][:n-outHeaderSize]
	if _, err := unix.Writev(l.fd, rb.out[:]); err != nil && err != unix.ENOENT && err != unix.ENODEV {
		// ENOENT: the request was interrupted meanwhile; ENODEV: the
		// connection is gone. Anything else is a bug worth a line.
		l.log.Printf("fusefs: reply to opcode %d: %v", h.Opcode, err)
	}
	rb.out[1] = nil
	rb.in[0] = nil
}
