package coroutine

import (
	"errors"
	"fmt"
	"os"
	"runtime"
	"strconv"
	"sync"
	"sync/atomic"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Loop is an event loop: one goroutine locked to its OS thread that runs
// coroutines, one at a time, and sleeps in one epoll_wait over the
// descriptors registered with it (Watch) and its own eventfd, which other
// threads write to wake it (QEMU's AioContext: aio_notify, aio_co_wake).
//
// Every coroutine belongs to the loop that created it and only ever runs
// there (iter.Pull's switch must stay on the creating thread), so a Wake
// from anywhere queues the coroutine on its loop and the loop enters it.
//
// Methods documented "loop thread only" may be called only from the loop:
// from a coroutine of this loop, a Watch handler, an idle hook or a Post
// function. The others are safe from any goroutine.
type Loop struct {
	epfd int // the loop's epoll
	efd  int // eventfd that wakes the loop; in epfd
	tid  int // the loop's thread; immutable once started

	mu sync.Mutex
	// readyq are woken coroutines, starts are Run calls waiting for a
	// coroutine, posts are functions to run on the loop. Protected by mu.
	readyq []*Co
	starts []*runReq
	posts  []func()
	// watches maps a registered descriptor to its handler. Protected by
	// mu; handlers are called without it.
	watches map[int32]func(events uint32)
	// closing is set by Close; exited once the loop has stopped.
	// Protected by mu.
	closing, exited bool

	// sleeping is set while the loop is in (or about to enter)
	// epoll_wait; whoever queues work and finds it set clears it and
	// writes the eventfd. A running loop looks at its queues before it
	// sleeps, so work queued meanwhile costs no system call.
	sleeping atomic.Bool

	// Loop thread only.
	runq   []*Co
	startq []*runReq
	postq  []func()
	idle   []*Co // pooled coroutines, at most maxIdle
	live   int   // coroutines started and not yet terminated
	cur    *Co   // the coroutine being entered, nil between coroutines
	// readied is set when the loop made a goroutine runnable (a worker
	// started, a Run caller answered); see yieldP.
	readied bool
	hooks   []*func()
	polls   []*func() bool
	closes  []func()
	values  []loopValue
	evs     [64]unix.EpollEvent

	done chan struct{} // closed when the loop goroutine has returned
}

type loopValue struct{ key, val any }

// runReq is one Run call: the function and how its caller waits. Pooled.
type runReq struct {
	fn       func(co *Co)
	done     chan struct{} // capacity 1
	panicked bool
	panicVal any
}

var runReqPool = sync.Pool{New: func() any { return &runReq{done: make(chan struct{}, 1)} }}

// maxIdle bounds a loop's pool of idle coroutines: more than the requests
// a FUSE connection keeps in flight would only hold stacks.
const maxIdle = 256

// loopThreads holds the thread ids of running loops, so that Run can refuse
// to be called from one (it would block the loop it must wait for).
var loopThreads sync.Map // int -> *Loop

// NewLoop starts an event loop on a new locked OS thread.
func NewLoop() (*Loop, error) {
	epfd, err := unix.EpollCreate1(unix.EPOLL_CLOEXEC)
	if err != nil {
		return nil, fmt.Errorf("coroutine: epoll_create1: %w", err)
	}
	efd, err := unix.Eventfd(0, unix.EFD_NONBLOCK|unix.EFD_CLOEXEC)
	if err != nil {
		unix.Close(epfd)
		return nil, fmt.Errorf("coroutine: eventfd: %w", err)
	}
	ev := unix.EpollEvent{Events: unix.EPOLLIN, Fd: int32(efd)}
	if err := unix.EpollCtl(epfd, unix.EPOLL_CTL_ADD, efd, &ev); err != nil {
		unix.Close(efd)
		unix.Close(epfd)
		return nil, fmt.Errorf("coroutine: epoll_ctl: %w", err)
	}
	l := &Loop{epfd: epfd, efd: efd, watches: map[int32]func(uint32){}, done: make(chan struct{})}
	started := make(chan struct{})
	go func() {
		runtime.LockOSThread()
		l.tid = unix.Gettid()
		loopThreads.Store(l.tid, l)
		close(started)
		l.run()
	}()
	<-started
	return l, nil
}

var (
	defaultOnce  sync.Once
	defaultLoops []*Loop
	nextDefault  atomic.Uint32
)

// Loops returns the process's event loops, one per CPU the Go runtime may
// use (GOMAXPROCS), started on first use and never stopped.
//
// It also raises GOMAXPROCS to one more than the loops: a loop asleep in
// epoll_wait holds its P in a system call, and when no P is idle the
// runtime's sysmon takes such Ps away every 20 µs tick and keeps ticking
// (runtime/proc.go retake), waking a thread each time. With one P to spare
// sysmon leaves a sleeping loop alone and backs off to 10 ms ticks.
func Loops() []*Loop {
	defaultOnce.Do(func() {
		n := runtime.GOMAXPROCS(0)
		runtime.GOMAXPROCS(n + 1)
		for range n {
			l, err := NewLoop()
			if err != nil {
				// epoll and eventfd fail only when the process is
				// out of descriptors or memory; nothing can run.
				panic(err)
			}
			defaultLoops = append(defaultLoops, l)
		}
	})
	return defaultLoops
}

// Run runs fn as a coroutine on one of the process's loops and returns once
// fn has returned. It is the entry for code that is not in a coroutine (CLI
// tools, open and close, tests); if fn panics, or returns holding a
// CoMutex, Run panics with the same value. It must not be called from a
// coroutine (it would block that coroutine's loop; it panics instead).
func Run(fn func(co *Co)) {
	ls := Loops()
	ls[int(nextDefault.Add(1))%len(ls)].Run(fn)
}

// Run is the package's Run on this loop.
func (l *Loop) Run(fn func(co *Co)) {
	if _, onLoop := loopThreads.Load(unix.Gettid()); onLoop {
		panic("coroutine: Run called on an event loop's thread (use the coroutine you are in)")
	}
	req := runReqPool.Get().(*runReq)
	req.fn = fn
	l.mu.Lock()
	if l.exited || l.closing {
		l.mu.Unlock()
		panic("coroutine: Run on a closed loop")
	}
	l.starts = append(l.starts, req)
	l.mu.Unlock()
	l.notify()
	<-req.done
	panicked, v := req.panicked, req.panicVal
	*req = runReq{done: req.done}
	runReqPool.Put(req)
	if panicked {
		panic(v)
	}
}

// runFn adapts a Run function to the coroutine's (fn, arg) form without a
// closure: arg is the *runReq.
func runFn(co *Co, arg any) { arg.(*runReq).fn(co) }

// Go starts fn(co, arg) as a new coroutine of this loop. Called between
// coroutines (a Watch handler, a Post function) it enters the coroutine at
// once, so that a request's I/O joins the loop iteration's batch; called
// from a coroutine it queues it. Loop thread only. A panic in fn is
// re-raised on the loop, ending the process as an unrecovered panic in a
// goroutine would: fn must recover what it can handle.
func (l *Loop) Go(fn func(co *Co, arg any), arg any) {
	co := l.get()
	co.fn, co.arg = fn, arg
	l.live++
	if l.cur != nil {
		co.woken.Store(true)
		l.ready(co)
		return
	}
	l.enter(co)
}

// Post runs fn on the loop, between coroutines. Safe from any goroutine.
// fn must not block.
func (l *Loop) Post(fn func()) {
	l.mu.Lock()
	if l.exited {
		l.mu.Unlock()
		panic("coroutine: Post to a closed loop")
	}
	l.posts = append(l.posts, fn)
	l.mu.Unlock()
	l.notify()
}

// Watch registers fd with the loop's epoll for events (EPOLLIN, and e.g.
// EPOLLEXCLUSIVE for a descriptor several loops wait on); fn runs on the
// loop, between coroutines, whenever epoll reports them (level-triggered:
// fn must consume what it was told about, e.g. read until EAGAIN).
func (l *Loop) Watch(fd int, events uint32, fn func(events uint32)) error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.exited {
		return errors.New("coroutine: Watch on a closed loop")
	}
	ev := unix.EpollEvent{Events: events, Fd: int32(fd)}
	if err := unix.EpollCtl(l.epfd, unix.EPOLL_CTL_ADD, fd, &ev); err != nil {
		return fmt.Errorf("coroutine: epoll_ctl add %d: %w", fd, err)
	}
	l.watches[int32(fd)] = fn
	return nil
}

// Unwatch removes fd from the loop's epoll; its handler is not called
// again once Unwatch has returned on the loop thread.
func (l *Loop) Unwatch(fd int) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if _, ok := l.watches[int32(fd)]; !ok {
		return
	}
	delete(l.watches, int32(fd))
	_ = unix.EpollCtl(l.epfd, unix.EPOLL_CTL_DEL, fd, nil)
}

// OnIdle adds a hook the loop calls every time it has run everything
// queued, before it sleeps: aio submits the iteration's batch of iocbs
// there. A hook may wake coroutines. Loop thread only.
// The returned function removes the hook (loop thread only).
func (l *Loop) OnIdle(fn func()) (remove func()) {
	p := &fn
	l.hooks = append(l.hooks, p)
	return func() { l.hooks = removePtr(l.hooks, p) }
}

// removePtr returns s without p.
func removePtr[T any](s []*T, p *T) []*T {
	for i, q := range s {
		if q == p {
			return append(s[:i:i], s[i+1:]...)
		}
	}
	return s
}

// OnPoll adds a poller the loop calls every iteration, after it has run
// everything queued and before the idle hooks: a source of work that can
// be looked at without a system call (an io_uring completion queue) and
// that the kernel may fill without making any descriptor readable first
// (its task work runs when the loop returns from epoll_wait with EINTR).
// fn reports whether it found work; the loop then runs what it queued
// before it polls again. The returned function removes the poller. Loop
// thread only.
func (l *Loop) OnPoll(fn func() bool) (remove func()) {
	p := &fn
	l.polls = append(l.polls, p)
	return func() { l.polls = removePtr(l.polls, p) }
}

// OnClose adds a hook the loop calls when it stops (Close), after the last
// coroutine has terminated. Loop thread only.
func (l *Loop) OnClose(fn func()) { l.closes = append(l.closes, fn) }

// Value returns what SetValue stored under key on this loop, or nil. Loop
// thread only: per-loop state of other packages (aio's AIO context) lives
// here without a lock.
func (l *Loop) Value(key any) any {
	for i := range l.values {
		if l.values[i].key == key {
			return l.values[i].val
		}
	}
	return nil
}

// SetValue stores val under key on this loop. Loop thread only.
func (l *Loop) SetValue(key, val any) {
	for i := range l.values {
		if l.values[i].key == key {
			l.values[i].val = val
			return
		}
	}
	l.values = append(l.values, loopValue{key, val})
}

// Close stops the loop once every coroutine started on it has terminated
// (requests in flight finish first) and releases its descriptors. Run and
// Post fail afterwards. The process's loops (Loops) are never closed.
func (l *Loop) Close() {
	l.mu.Lock()
	l.closing = true
	l.mu.Unlock()
	l.sleeping.Store(true) // force the eventfd write below
	l.notify()
	<-l.done
}

// ready queues a woken coroutine.
func (l *Loop) ready(co *Co) {
	l.mu.Lock()
	l.readyq = append(l.readyq, co)
	l.mu.Unlock()
	l.notify()
}

// notify wakes the loop if it sleeps (or is about to).
func (l *Loop) notify() {
	if l.sleeping.Load() && l.sleeping.CompareAndSwap(true, false) {
		one := [8]byte{1}
		for {
			_, err := unix.Write(l.efd, one[:])
			if err != unix.EINTR {
				// EAGAIN: the counter is full, the loop is awake anyway.
				return
			}
		}
	}
}

// get returns an idle coroutine of this loop, or a new one.
func (l *Loop) get() *Co {
	if n := len(l.idle); n > 0 {
		co := l.idle[n-1]
		l.idle[n-1] = nil
		l.idle = l.idle[:n-1]
		return co
	}
	return l.newCo()
}

// enter runs co until it yields or terminates.
func (l *Loop) enter(co *Co) {
	co.woken.Store(false)
	l.cur = co
	terminated, _ := co.next()
	l.cur = nil
	if terminated {
		l.finish(co)
	}
}

// finish retires a coroutine whose function has returned (or panicked).
func (l *Loop) finish(co *Co) {
	l.live--
	req := co.req
	co.fn, co.arg, co.req = nil, nil, nil
	if co.woken.Load() {
		co.stop()
		panic("coroutine: terminated with a Wake pending (Wake without Yield)")
	}
	if co.panicked {
		// Not reused: it may have died holding locks.
		v := co.panicVal
		co.stop()
		if req == nil {
			panic(v)
		}
		req.panicked, req.panicVal = true, v
		l.readied = true
		req.done <- struct{}{}
		return
	}
	if len(l.idle) < maxIdle {
		l.idle = append(l.idle, co)
	} else {
		co.stop()
	}
	if req != nil {
		l.readied = true
		req.done <- struct{}{}
	}
}

// run is the loop.
func (l *Loop) run() {
	defer l.shutdown()
	for {
		l.runQueued()
		for l.poll() {
			l.runQueued()
		}
		for _, h := range l.hooks {
			(*h)()
		}
		l.sleeping.Store(true)
		l.mu.Lock()
		more := len(l.readyq)+len(l.starts)+len(l.posts) > 0
		stop := !more && l.closing && l.live == 0
		l.mu.Unlock()
		if stop {
			return
		}
		timeout := -1
		if more {
			timeout = 0
		} else if l.readied {
			l.yieldP()
		}
		n, err := l.wait(timeout)
		l.sleeping.Store(false)
		if err != nil {
			continue // EINTR
		}
		for i := range n {
			ev := &l.evs[i]
			if ev.Fd == int32(l.efd) {
				var cnt [8]byte
				_, _ = unix.Read(l.efd, cnt[:])
				continue
			}
			l.mu.Lock()
			fn := l.watches[ev.Fd]
			l.mu.Unlock()
			if fn != nil {
				fn(ev.Events)
			}
		}
	}
}

// quietWait is how long an idle loop sleeps in epoll_wait without telling
// the Go scheduler (see wait).
const quietWaitMs = 5

// wait is epoll_wait with timeout (ms, -1 for ever). A wait for ever is
// made in two steps. First up to quietWaitMs as a raw system call, which
// the runtime does not see: the loop's P stays "running", so sysmon has
// no P in a system call to look at and backs off to its 10 ms tick. At
// QD1 the next request or completion comes long before that, and
// through the runtime's own epoll_wait (entersyscall) sysmon woke about
// once per request and the loop paid an exitsyscall each time: 0.7-0.9
// context switches and ~20 µs of daemon CPU per 4 KiB read (fusefs doc,
// "Serving"). Then, if nothing came, an ordinary blocking wait, so an
// idle daemon sleeps for good and frees its P. While the raw wait
// sleeps, goroutines readied on the loop's P are stolen by the other Ps
// (the runtime wakes a spinning thread for them), and a stop-the-world
// or a preemption reaches the loop by signal: epoll_wait returns EINTR.
func (l *Loop) wait(timeout int) (int, error) {
	if timeout == 0 {
		return rawEpollWait(l.epfd, l.evs[:], 0)
	}
	if timeout < 0 && spinFor > 0 {
		deadline := time.Now().Add(spinFor)
		for {
			if n, err := rawEpollWait(l.epfd, l.evs[:], 0); n != 0 || err != nil {
				return n, err
			}
			if l.poll() {
				return 0, nil
			}
			if time.Now().After(deadline) {
				break
			}
		}
	}
	if timeout < 0 {
		if n, err := rawEpollWait(l.epfd, l.evs[:], quietWaitMs); n != 0 || err != nil {
			return n, err
		}
	}
	return unix.EpollWait(l.epfd, l.evs[:], timeout)
}

// spinFor is how long an idle loop polls before it sleeps.
var spinFor = func() time.Duration {
	us, _ := strconv.Atoi(os.Getenv("IMGFUSE_SPIN_US"))
	return time.Duration(us) * time.Microsecond
}()

// rawEpollWait is epoll_wait without entersyscall (see wait).
func rawEpollWait(epfd int, evs []unix.EpollEvent, msec int) (int, error) {
	r, _, e := unix.RawSyscall6(unix.SYS_EPOLL_WAIT, uintptr(epfd), uintptr(unsafe.Pointer(&evs[0])), uintptr(len(evs)), uintptr(msec), 0, 0)
	if e != 0 {
		return 0, e
	}
	return int(r), nil
}

// poll calls the pollers and reports whether any found work.
func (l *Loop) poll() bool {
	found := false
	for _, p := range l.polls {
		if (*p)() {
			found = true
		}
	}
	return found
}

// runQueued runs posts, starts Run coroutines and enters woken ones until
// nothing is queued.
func (l *Loop) runQueued() {
	for {
		l.mu.Lock()
		l.runq, l.readyq = l.readyq, l.runq[:0]
		l.startq, l.starts = l.starts, l.startq[:0]
		l.postq, l.posts = l.posts, l.postq[:0]
		l.mu.Unlock()
		if len(l.runq)+len(l.startq)+len(l.postq) == 0 {
			return
		}
		for i, fn := range l.postq {
			fn()
			l.postq[i] = nil
		}
		for i, req := range l.startq {
			co := l.get()
			co.fn, co.arg, co.req = runFn, req, req
			l.live++
			l.enter(co)
			l.startq[i] = nil
		}
		for i, co := range l.runq {
			l.enter(co)
			l.runq[i] = nil
		}
	}
}

// yieldP lets the goroutines the loop made runnable run before the loop
// sleeps. The runtime queues a goroutine readied by this thread on this
// thread's P, and epoll_wait keeps that P in a system call; another thread
// steals the goroutine only when sysmon takes the P away, after 20 µs to
// 10 ms (a Run round trip measured 60–130 µs without this, 20–30 with it).
// Gosched of a locked goroutine hands the P to another thread at once. Only
// iterations that started a worker or answered a Run pay for it: requests
// never do.
func (l *Loop) yieldP() {
	l.readied = false
	runtime.Gosched()
}

func (l *Loop) shutdown() {
	for _, fn := range l.closes {
		fn()
	}
	for _, co := range l.idle {
		co.stop()
	}
	l.idle = nil
	l.mu.Lock()
	l.exited = true
	l.mu.Unlock()
	loopThreads.Delete(l.tid)
	unix.Close(l.efd)
	unix.Close(l.epfd)
	close(l.done)
}
