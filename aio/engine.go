package aio

import (
	"errors"
	"fmt"
	"sync"
	"time"

	"golang.org/x/sys/unix"

	"imgfuse/coroutine"
)

// maxInflight bounds the requests one loop's context has in the kernel at
// once. Requests beyond it wait in the engine's pending queue. 128 keeps a
// QD32 workload from ever queueing while bounding the pinned buffers;
// io_setup is asked for exactly this many events so the completion ring
// can never overflow.
const maxInflight = 128

// retryDelay is how long the engine waits before retrying an io_submit that
// failed with EAGAIN while none of its own requests was in flight (so no
// completion will come to trigger the retry).
const retryDelay = time.Millisecond

// waiter is how a range-lock waiter waits: a coroutine yields and is woken
// with Wake; a plain caller (co == nil) blocks on ch.
type waiter struct {
	co *coroutine.Co
	ch chan struct{} // used when co is nil; buffered, capacity 1
}

func (w *waiter) wait() {
	if w.co != nil {
		w.co.Yield()
		return
	}
	<-w.ch
}

func (w *waiter) wake() {
	if w.co != nil {
		w.co.Wake()
		return
	}
	w.ch <- struct{}{}
}

// request is one iocb on its way through a loop's engine.
type request struct {
	cb iocb
	// buf is the data buffer cb.buf points into. Holding it here keeps the
	// memory reachable (Go's heap does not move objects) until the
	// completion has been reaped, whatever the caller does meanwhile.
	buf []byte
	res int64 // bytes transferred, or -errno; valid once co is woken
	co  *coroutine.Co
}

var requestPool = sync.Pool{New: func() any { return new(request) }}

// engine is one event loop's Linux AIO context (QEMU's LinuxAioState, one
// per AioContext). Everything in it is touched only on its loop's thread,
// so it has no lock: coroutines append iocbs to pending and yield; the
// loop's idle hook submits the iteration's batch with one io_submit; the
// eventfd every iocb signals (IOCB_FLAG_RESFD) is watched by the loop's
// epoll, and its handler reaps with io_getevents(min_nr 0) and wakes the
// coroutines, which the loop enters next.
type engine struct {
	loop *coroutine.Loop
	ctx  aioContext
	efd  int // eventfd signalled by every completion

	// slots holds the submitted requests, indexed by iocb.data (an index,
	// never a Go pointer); a nil entry is free.
	slots [maxInflight]*request
	// free lists the indices of the nil entries of slots.
	free []uint32
	// pending holds requests waiting for the next io_submit, in arrival
	// order.
	pending []*request
	// retryArmed is set while an EAGAIN retry timer is pending.
	retryArmed bool

	// submitFn is ioSubmit; tests replace it to inject EAGAIN and
	// partial acceptance.
	submitFn func(aioContext, []*iocb) (int, error)

	// The argument and result arrays of the system calls, here rather
	// than on the stack of the loop.
	batch    [maxInflight]*iocb
	batchReq [maxInflight]*request
	evs      [maxInflight]ioEvent

	stats engineStats
}

type engineStats struct {
	submitCalls int64 // io_submit system calls
	submitted   int64 // iocbs accepted by the kernel
	eagain      int64 // io_submit calls refused with EAGAIN
	maxQueued   int   // largest len(pending) seen
	maxInflight int   // largest number of submitted requests seen
	reaps       int64 // eventfd signals that found completions
	reaped      int64 // completions reaped
}

// engineKey is the key of a loop's engine (coroutine.Loop.Value).
type engineKey struct{}

// engineOf returns the engine of co's loop, creating it on first use. An
// error (io_setup refused, e.g. fs.aio-max-nr exhausted) is not kept: a
// later request may succeed.
func engineOf(co *coroutine.Co) (*engine, error) {
	l := co.Loop()
	if e, _ := l.Value(engineKey{}).(*engine); e != nil {
		return e, nil
	}
	e, err := newEngine(l)
	if err != nil {
		return nil, err
	}
	l.SetValue(engineKey{}, e)
	return e, nil
}

// aioAvailable reports whether this process can set up an AIO context at
// all (Open's test before choosing the direct engine).
var aioAvailable = sync.OnceValue(func() error {
	ctx, err := ioSetup(1)
	if err != nil {
		return fmt.Errorf("aio: io_setup: %w", err)
	}
	ioDestroy(ctx)
	return nil
})

func newEngine(l *coroutine.Loop) (*engine, error) {
	ctx, err := ioSetup(maxInflight)
	if err != nil {
		return nil, fmt.Errorf("aio: io_setup(%d): %w", maxInflight, err)
	}
	efd, err := unix.Eventfd(0, unix.EFD_NONBLOCK|unix.EFD_CLOEXEC)
	if err != nil {
		ioDestroy(ctx)
		return nil, fmt.Errorf("aio: eventfd: %w", err)
	}
	e := &engine{loop: l, ctx: ctx, efd: efd, free: make([]uint32, 0, maxInflight), submitFn: ioSubmit}
	for i := maxInflight - 1; i >= 0; i-- {
		e.free = append(e.free, uint32(i))
	}
	if err := l.Watch(efd, unix.EPOLLIN, e.reap); err != nil {
		unix.Close(efd)
		ioDestroy(ctx)
		return nil, err
	}
	l.OnIdle(e.submit)
	l.OnClose(e.destroy)
	return e, nil
}

// destroy releases the context when its loop stops; nothing is in flight
// then (the loop stops only once its coroutines have terminated).
func (e *engine) destroy() {
	e.loop.Unwatch(e.efd)
	unix.Close(e.efd)
	ioDestroy(e.ctx)
}

// do queues r for the loop iteration's io_submit and yields until its
// completion has been reaped. r.cb must be filled in except for data,
// flags and resfd.
func (e *engine) do(co *coroutine.Co, r *request) {
	r.co = co
	r.cb.flags = iocbFlagResfd
	r.cb.resfd = uint32(e.efd)
	e.pending = append(e.pending, r)
	if len(e.pending) > e.stats.maxQueued {
		e.stats.maxQueued = len(e.pending)
	}
	co.Yield()
}

// submit is the loop's idle hook: it moves pending requests into free
// slots and into io_submit, all of them in one call when they fit.
func (e *engine) submit() {
	for len(e.pending) > 0 && len(e.free) > 0 {
		n := min(len(e.pending), len(e.free))
		for i := range n {
			r := e.pending[i]
			slot := e.free[len(e.free)-1]
			e.free = e.free[:len(e.free)-1]
			e.slots[slot] = r
			r.cb.data = uint64(slot)
			e.batch[i] = &r.cb
			e.batchReq[i] = r
		}
		clear(e.pending[:n])
		e.pending = e.pending[:copy(e.pending, e.pending[n:])]
		if inflight := maxInflight - len(e.free); inflight > e.stats.maxInflight {
			e.stats.maxInflight = inflight
		}
		done, err := e.submitFn(e.ctx, e.batch[:n])
		e.stats.submitCalls++
		e.stats.submitted += int64(max(done, 0))
		done = max(done, 0)
		if done == n {
			clear(e.batch[:n])
			clear(e.batchReq[:n])
			continue
		}
		// The kernel stopped at batch[done]. Take the rest back.
		rest := make([]*request, 0, n-done)
		for i := done; i < n; i++ {
			r := e.batchReq[i]
			e.slots[r.cb.data] = nil
			e.free = append(e.free, uint32(r.cb.data))
			rest = append(rest, r)
		}
		clear(e.batch[:n])
		clear(e.batchReq[:n])
		switch {
		case err == nil || err == unix.EINTR:
			// Partial acceptance: the next call reports what
			// stopped the kernel, if anything.
		case err == unix.EAGAIN:
			// Back-pressure from the kernel: keep the requests and
			// retry when a completion frees resources, or after a
			// pause if none of ours is in flight.
			e.stats.eagain++
			e.pending = append(rest, e.pending...)
			if len(e.free) == maxInflight && !e.retryArmed {
				e.retryArmed = true
				time.AfterFunc(retryDelay, func() {
					// The loop iterates, and submits, after any Post.
					e.loop.Post(func() { e.retryArmed = false })
				})
			}
			return
		default:
			// The first remaining request is invalid (EINVAL for an
			// unsupported opcode, EBADF, ...): fail it.
			r := rest[0]
			rest = rest[1:]
			r.res = -int64(errnoOf(err))
			r.co.Wake()
		}
		e.pending = append(rest, e.pending...)
	}
}

func errnoOf(err error) unix.Errno {
	var en unix.Errno
	if errors.As(err, &en) {
		return en
	}
	return unix.EIO
}

// reap is the eventfd's handler: it empties the completion ring with
// non-blocking io_getevents calls and wakes each request's coroutine. The
// kernel writes an event into the ring before it signals the eventfd, and
// the counter is reset before reaping, so a completion not returned here
// signals again: a call that returns fewer events than asked for ends it.
func (e *engine) reap(uint32) {
	var cnt [8]byte
	_, _ = unix.Read(e.efd, cnt[:])
	first := true
	for {
		n, err := ioGetEventsNow(e.ctx, e.evs[:])
		if err == unix.EINTR {
			continue
		}
		if err != nil || n == 0 {
			return
		}
		if first {
			e.stats.reaps++
			first = false
		}
		e.stats.reaped += int64(n)
		for i := range n {
			ev := &e.evs[i]
			if ev.data >= maxInflight || e.slots[ev.data] == nil {
				continue // not ours: cannot happen, ignore
			}
			r := e.slots[ev.data]
			e.slots[ev.data] = nil
			e.free = append(e.free, uint32(ev.data))
			r.res = ev.res
			r.co.Wake()
		}
		if n < len(e.evs) {
			return
		}
	}
}
