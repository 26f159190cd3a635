package aio

import (
	"errors"
	"fmt"
	"os"
	"sync"
	"sync/atomic"
	"time"

	"golang.org/x/sys/unix"

	"imgfuse/coroutine"
)

// maxInflight bounds the requests submitted to the kernel at once. Requests
// beyond it wait in the engine's pending queue. 128 keeps a QD32 workload
// from ever queueing while bounding the pinned buffers; io_setup is asked
// for exactly this many events so the completion ring can never overflow.
const maxInflight = 128

// retryDelay is how long the engine waits before retrying an io_submit that
// failed with EAGAIN while none of its own requests was in flight (so no
// completion will come to trigger the retry).
const retryDelay = time.Millisecond

// waiter is how a request's issuer waits for it: a coroutine yields and is
// woken with Wake; a plain caller (co == nil) blocks on ch.
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

// request is one iocb on its way through the engine.
type request struct {
	cb iocb
	// buf is the data buffer cb.buf points into. Holding it here keeps the
	// memory reachable (Go's heap does not move objects) until the
	// completion has been reaped, whatever the caller does meanwhile.
	buf []byte
	res int64 // bytes transferred, or -errno; valid after wake
	w   waiter
	// inSubmit is set while the io_submit call that carries this request
	// runs (protected by engine.mu). A completion that arrives meanwhile
	// is handed to the submitter to wake once the call has returned: the
	// kernel's ordering is invisible to the race detector, and this way
	// the submitter's last touch of the iocb happens before the waiter
	// reuses it.
	inSubmit bool
	// done is set (under engine.mu) once the request's result is in res.
	done bool
}

var requestPool = sync.Pool{New: func() any {
	return &request{w: waiter{ch: make(chan struct{}, 1)}}
}}

// engine is the process-wide Linux AIO context and its completion reaper.
//
// One context serves every File: io_setup contexts count against the
// system-wide fs.aio-max-nr, a qcow2 chain may open many backing files, and
// one reaper goroutine for all of them is one parked goroutine instead of
// one per file. Files track their own in-flight count for Close.
type engine struct {
	ctx  aioContext
	efd  int      // eventfd signalled by every completion (IOCB_FLAG_RESFD)
	efdF *os.File // efd registered with the netpoller

	mu sync.Mutex
	// slots holds the submitted requests, indexed by iocb.data; a nil
	// entry is free. Protected by mu.
	slots [maxInflight]*request
	// free lists the indices of the nil entries of slots. Protected by mu.
	free []uint32
	// pending holds requests waiting for a slot or for the kernel to
	// accept them, in arrival order. Protected by mu.
	pending []*request
	// submitting is set while one goroutine drains pending into
	// io_submit; others only append. Protected by mu.
	submitting bool
	// retryArmed is set while a retry timer is pending. Protected by mu.
	retryArmed bool

	// submitFn is ioSubmit; tests replace it to inject EAGAIN and
	// partial acceptance. Protected by mu.
	submitFn func(aioContext, []*iocb) (int, error)

	// batch and batchReq are the argument array of the io_submit in
	// progress; owned by the goroutine that set submitting.
	batch    [maxInflight]*iocb
	batchReq [maxInflight]*request
	// early holds requests completed while the io_submit carrying them
	// still ran; the submitter wakes them when it returns. Protected by mu.
	early []*request

	// leader is the request whose issuer is alone in the engine and reaps
	// completions itself, blocked in io_getevents, instead of waiting for
	// the reaper goroutine (see lead). While it is set the reaper reaps
	// nothing. Protected by mu.
	leader *request
	// reaping is set while the reaper goroutine reaps; no request becomes
	// leader meanwhile, so the two never both reap. Protected by mu.
	reaping bool
	// reapAgain is set by a reapAll that found a leader or another
	// reapAll at work: its caller may have consumed the eventfd signal
	// of a completion that the one at work already looked past, so that
	// one makes another pass before it stops (a leader makes one when it
	// gives up the lead). Protected by mu.
	reapAgain bool

	// leadEvs, leadDone and reapEvs, reapDone are the event and wake-up
	// arrays of the leader and of reapAll, each used by one goroutine at
	// a time (one leader; reaping set). Kept here rather than on the
	// stack: 5 KiB of stack made every new request goroutine grow its
	// stack by copying.
	leadEvs  [maxInflight]ioEvent
	leadDone [maxInflight]*request
	reapEvs  [maxInflight]ioEvent
	reapDone [maxInflight]*request

	// Counters for tests and benchmarks. Protected by mu.
	stats engineStats
}

type engineStats struct {
	submitCalls  int64 // io_submit system calls
	submitted    int64 // iocbs accepted by the kernel
	eagain       int64 // io_submit calls refused with EAGAIN
	maxQueued    int   // largest len(pending) seen
	maxInflight  int   // largest number of submitted requests seen
	reaperWakeup int64 // eventfd reads that found completions
	leads        int64 // requests reaped by their own issuer
}

var (
	engineMu  sync.Mutex
	theEngine *engine
)

// getEngine returns the process-wide engine, creating it on first use. An
// error (io_setup refused, e.g. fs.aio-max-nr exhausted) is not cached: a
// later Open may succeed.
func getEngine() (*engine, error) {
	engineMu.Lock()
	defer engineMu.Unlock()
	if theEngine != nil {
		return theEngine, nil
	}
	e, err := newEngine()
	if err != nil {
		return nil, err
	}
	theEngine = e
	return e, nil
}

func newEngine() (*engine, error) {
	ctx, err := ioSetup(maxInflight)
	if err != nil {
		return nil, fmt.Errorf("aio: io_setup(%d): %w", maxInflight, err)
	}
	efd, err := unix.Eventfd(0, unix.EFD_NONBLOCK|unix.EFD_CLOEXEC)
	if err != nil {
		ioDestroy(ctx)
		return nil, fmt.Errorf("aio: eventfd: %w", err)
	}
	e := &engine{
		ctx: ctx,
		efd: efd,
		// os.NewFile sees O_NONBLOCK and registers the fd with the
		// netpoller: a Read parks the goroutine, not a thread.
		efdF:     os.NewFile(uintptr(efd), "aio-eventfd"),
		free:     make([]uint32, 0, maxInflight),
		submitFn: ioSubmit,
	}
	for i := maxInflight - 1; i >= 0; i-- {
		e.free = append(e.free, uint32(i))
	}
	// The context and the reaper live as long as the process: there is
	// nothing to release at exit that the kernel does not release.
	go e.reap()
	return e, nil
}

// do submits r and waits for its completion. r.cb must be filled in except
// for data, flags and resfd.
//
// A request that finds the engine idle (nothing in flight or queued, the
// reaper not reaping) becomes the leader: it is submitted without the
// eventfd and its issuer waits for it in io_getevents itself, reaping for
// everyone meanwhile (lead). Its thread then sleeps and wakes once per
// request, as with pread(2), instead of the completion crossing the
// netpoller, the reaper goroutine and a wake-up of the waiter: at QD1 that
// hand-off is most of the engine's cost (see the package doc).
func (e *engine) do(r *request) {
	r.done = false
	r.cb.resfd = uint32(e.efd)
	e.mu.Lock()
	lead := e.leader == nil && !e.reaping && !e.submitting &&
		len(e.pending) == 0 && len(e.free) == maxInflight
	if lead {
		e.leader = r
		r.cb.flags = 0
	} else {
		r.cb.flags = iocbFlagResfd
	}
	e.pending = append(e.pending, r)
	if len(e.pending) > e.stats.maxQueued {
		e.stats.maxQueued = len(e.pending)
	}
	if !e.submitting {
		e.submitting = true
		e.drainLocked()
		e.submitting = false
	}
	if !lead {
		e.mu.Unlock()
		r.w.wait()
		return
	}
	if e.slots[r.cb.data] == r && !r.done {
		e.stats.leads++
		e.mu.Unlock()
		e.lead(r)
		return
	}
	// The kernel refused r (its error is in res and its waiter woken), or
	// EAGAIN put it back in the queue for someone else to submit: then it
	// needs the eventfd after all.
	r.cb.flags = iocbFlagResfd
	e.leader = nil
	e.mu.Unlock()
	e.reapAll()
	r.w.wait()
}

// lead waits for the leader r by reaping completions in io_getevents,
// waking the waiters of others' requests as they complete, until r's own
// completes. Then it gives up the lead and reaps what completed meanwhile
// (the reaper skipped its eventfd signals while r led).
func (e *engine) lead(r *request) {
	evs, done := &e.leadEvs, &e.leadDone
	for {
		n, err := ioGetEventsWait(e.ctx, evs[:], leaderTimeout)
		if err != nil && err != unix.EINTR {
			// Cannot happen with a valid context; do not spin.
			time.Sleep(time.Millisecond)
		}
		e.mu.Lock()
		k := e.completeLocked(evs[:n], done[:], r)
		if n > 0 {
			e.kickLocked()
		}
		e.mu.Unlock()
		for i := 0; i < k; i++ {
			done[i].w.wake()
			done[i] = nil
		}
		e.mu.Lock()
		finished := r.done
		if finished {
			// Only now: evs and done belong to whoever leads next.
			e.leader = nil
		}
		e.mu.Unlock()
		if finished {
			break
		}
	}
	e.reapAll()
}

// leaderTimeout bounds one io_getevents wait of a leader. Only the leader
// reaps while it leads, so its completion cannot be taken by anyone else;
// the timeout only keeps a bug from becoming a hang.
const leaderTimeout = 100 * time.Millisecond

// completeLocked records the results of evs, frees their slots and returns,
// in done[:k], the requests whose waiters must be woken: all but self (a
// leader, which is not waiting on its waiter) and those still inside the
// io_submit that carries them (their submitter wakes them).
func (e *engine) completeLocked(evs []ioEvent, done []*request, self *request) (k int) {
	for i := range evs {
		ev := &evs[i]
		if ev.data >= maxInflight || e.slots[ev.data] == nil {
			continue // not ours: cannot happen, ignore
		}
		r := e.slots[ev.data]
		e.slots[ev.data] = nil
		e.free = append(e.free, uint32(ev.data))
		r.res = ev.res
		r.done = true
		switch {
		case r == self:
		case r.inSubmit:
			e.early = append(e.early, r)
		default:
			done[k] = r
			k++
		}
	}
	return k
}

// drainLocked submits pending requests while there are free slots, in
// batches: every request queued while the previous io_submit was in the
// kernel goes out in the next call. It is called with mu held and
// submitting set, and drops mu around the system call.
func (e *engine) drainLocked() {
	for len(e.pending) > 0 && len(e.free) > 0 {
		n := min(len(e.pending), len(e.free))
		for i := 0; i < n; i++ {
			r := e.pending[i]
			slot := e.free[len(e.free)-1]
			e.free = e.free[:len(e.free)-1]
			e.slots[slot] = r
			r.cb.data = uint64(slot)
			r.inSubmit = true
			e.batch[i] = &r.cb
			e.batchReq[i] = r
		}
		e.pending = e.pending[:copy(e.pending, e.pending[n:])]
		if inflight := maxInflight - len(e.free); inflight > e.stats.maxInflight {
			e.stats.maxInflight = inflight
		}

		submit := e.submitFn
		e.mu.Unlock()
		done, err := submit(e.ctx, e.batch[:n])
		e.mu.Lock()

		e.stats.submitCalls++
		e.stats.submitted += int64(done)
		for i := 0; i < n; i++ {
			e.batchReq[i].inSubmit = false
		}
		for _, r := range e.early {
			r.w.wake()
		}
		clear(e.early)
		e.early = e.early[:0]
		for i := 0; i < done; i++ {
			e.batch[i] = nil
			e.batchReq[i] = nil
		}
		if done == n {
			continue
		}
		// The kernel stopped at batch[done]. Take the rest back.
		rest := make([]*request, 0, n-done)
		for i := done; i < n; i++ {
			r := e.batchReq[i]
			e.slots[r.cb.data] = nil
			e.free = append(e.free, uint32(r.cb.data))
			e.batch[i] = nil
			e.batchReq[i] = nil
			rest = append(rest, r)
		}
		switch {
		case err == nil || err == unix.EINTR:
			// Partial acceptance: the next call reports what
			// stopped the kernel, if anything.
		case err == unix.EAGAIN:
			// Back-pressure from the kernel: keep the requests
			// and retry when a completion frees resources, or
			// after a pause if none of ours is in flight.
			e.stats.eagain++
			e.pending = append(rest, e.pending...)
			if len(e.free) == maxInflight && !e.retryArmed {
				e.retryArmed = true
				time.AfterFunc(retryDelay, e.retry)
			}
			return
		default:
			// The first remaining request is invalid (EINVAL
			// for an unsupported opcode, EBADF, ...): fail it.
			r := rest[0]
			rest = rest[1:]
			r.res = -int64(errnoOf(err))
			r.done = true
			r.w.wake()
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

// retry resubmits after an EAGAIN that no completion will follow.
func (e *engine) retry() {
	e.mu.Lock()
	e.retryArmed = false
	e.kickLocked()
	e.mu.Unlock()
}

// kickLocked drains pending unless another goroutine already is.
func (e *engine) kickLocked() {
	if len(e.pending) > 0 && !e.submitting {
		e.submitting = true
		e.drainLocked()
		e.submitting = false
	}
}

// reap is the completion goroutine. It sleeps in the netpoller on the
// eventfd, then empties the completion queue (reapAll), unless a leader or
// another reapAll is at work: then that one reaps once more before it
// stops (a leader when it gives up the lead), since the signal just
// consumed may belong to a completion it had already looked past.
func (e *engine) reap() {
	var cnt [8]byte
	for {
		if _, err := e.efdF.Read(cnt[:]); err != nil {
			// An eventfd read cannot fail once registered; if it
			// ever does, poll slowly rather than spin or die.
			time.Sleep(10 * time.Millisecond)
		}
		e.reapAll()
	}
}

// reapAll reaps every completed request with non-blocking io_getevents
// calls, wakes their waiters and resubmits queued requests into the freed
// slots. It does nothing while a leader reaps.
func (e *engine) reapAll() {
	e.mu.Lock()
	if e.leader != nil || e.reaping {
		// The one at work may have made its last io_getevents call
		// before the completion whose signal our caller consumed.
		e.reapAgain = true
		e.mu.Unlock()
		if h := testHookReapSkipped.Load(); h != nil {
			(*h)()
		}
		return
	}
	e.reaping = true
	for {
		e.reapAgain = false
		e.mu.Unlock()
		e.reapPass()
		if h := testHookReapPassEnd.Load(); h != nil {
			(*h)()
		}
		e.mu.Lock()
		if !e.reapAgain {
			break
		}
	}
	e.reaping = false
	e.kickLocked()
	e.mu.Unlock()
}

// Test hooks: called after a reapAll pass, and when a reapAll finds
// another at work. Nil outside tests.
var testHookReapPassEnd, testHookReapSkipped atomic.Pointer[func()]

// reapPass reaps until io_getevents returns fewer events than asked for.
// Only the goroutine that set reaping calls it.
func (e *engine) reapPass() {
	evs, done := &e.reapEvs, &e.reapDone
	// The kernel writes an event into the ring before it signals the
	// eventfd, and the reaper's Read reset the counter: every completion
	// not returned by the calls below will signal again. So the queue is
	// empty for our purposes as soon as a call returns fewer events than
	// asked for, which saves the extra system call that would confirm it.
	first := true
	for {
		n, err := ioGetEventsNow(e.ctx, evs[:])
		if err == unix.EINTR {
			continue
		}
		if err != nil || n == 0 {
			break
		}
		e.mu.Lock()
		if first {
			e.stats.reaperWakeup++
			first = false
		}
		k := e.completeLocked(evs[:n], done[:], nil)
		e.mu.Unlock()
		// Wake first: the waiters' latency matters more than that of
		// requests still queued.
		for i := 0; i < k; i++ {
			done[i].w.wake()
			done[i] = nil
		}
		e.mu.Lock()
		e.kickLocked()
		e.mu.Unlock()
		if n < len(evs) {
			break
		}
	}
}

// snapshotStats returns a copy of the engine counters.
func (e *engine) snapshotStats() engineStats {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.stats
}
