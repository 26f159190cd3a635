package coroutine

import (
	"fmt"
	"iter"
	"runtime"
	"sync"
	"sync/atomic"
)

// Co is a coroutine: a call stack that can be suspended (Yield) and resumed
// later. A *Co is handed to the function it runs and is valid only until
// that function returns; never store it beyond that.
//
// A Co comes in one of two kinds. Run's coroutine runs on the goroutine
// that called Run, and Yield parks that goroutine until the Wake (see the
// package doc for why that is the fast, common case). New's coroutine has a
// stack of its own (an iter.Pull iterator) and is resumed explicitly by
// Enter, so one goroutine can drive several.
//
// The only methods that may be called from outside the coroutine, and from
// any goroutine, are Wake and (by the goroutine that drives a New
// coroutine) Enter and WaitWake.
type Co struct {
	// next resumes a New coroutine until it yields (false) or its
	// function has returned (true); nil for a Run coroutine. Immutable.
	next func() (terminated bool, ok bool)
	// yield suspends a New coroutine, telling next whether fn has
	// returned. Set once by the coroutine before its first switch back.
	yield func(terminated bool) bool
	// stop ends a New coroutine's goroutine; only called once the
	// coroutine can never be entered again (see ticket). Immutable.
	stop func()

	// fn is the function a New coroutine runs; nil while it is pooled.
	// Written by New, read by the coroutine once entered.
	fn func(*Co)
	// tk is the pool ticket a New coroutine was taken with; nil while
	// pooled (see ticket for why).
	tk *ticket
	// locks counts the CoMutexes this coroutine holds. Only the coroutine
	// itself touches it.
	locks int
	// waitNext links the coroutine into the one CoMutex or CoQueue wait
	// list it is on while suspended in Lock or Wait (a suspended
	// coroutine waits for one thing). Protected by that list's mutex.
	waitNext *Co

	// wake is the Wake/Yield hand-shake state (wakeIdle, wakeWoken,
	// wakeParked). Each Yield is matched by exactly one Wake, which may
	// come before or after the Yield.
	wake atomic.Int32
	// parked receives the Wake of a coroutine whose goroutine is blocked
	// waiting for it (a Run coroutine's own goroutine in Yield, or a New
	// coroutine's driver in WaitWake): the only channel operation, on the
	// slow path where a goroutine must sleep anyway.
	parked chan struct{}
}

// Wake states. The fast paths cost one compare-and-swap (~10 ns here); a
// buffered channel send and receive cost 46 ns, and a switch pair 115 ns.
const (
	// wakeIdle: no Wake pending and nobody waiting for one.
	wakeIdle int32 = iota
	// wakeWoken: a Wake arrived that no Yield or driver has consumed yet.
	wakeWoken
	// wakeParked: a goroutine is blocked receiving from parked.
	wakeParked
)

// runPool holds idle Run coroutines: plain structs, nothing to leak, so a
// sync.Pool (per-P, lock free on the hot path) may drop them at GC.
var runPool = sync.Pool{New: func() any { return &Co{parked: make(chan struct{}, 1)} }}

// ticket is what the pool of New coroutines holds. An idle New coroutine is
// a goroutine parked inside iter.Pull, and that goroutine references its
// Co, so a Co is never garbage: if sync.Pool held the *Co and dropped it at
// a GC, the goroutine would leak. The pool holds a ticket instead, which
// nothing but the pool references while the coroutine is idle; when the pool
// drops it, the ticket's cleanup stops the goroutine. sync.Pool is per-P
// (no lock, no shared cache line on the hot path) and trims idle
// coroutines after two GC cycles, which bounds the pool without a size
// limit.
type ticket struct {
	co *Co
}

var pool sync.Pool

func newCo() *Co {
	co := &Co{parked: make(chan struct{}, 1)}
	co.next, co.stop = iter.Pull(func(yield func(bool) bool) {
		co.yield = yield
		for {
			co.fn(co)
			co.fn = nil
			co.checkNoLocks()
			if !yield(true) {
				return // stopped: the ticket was dropped.
			}
		}
	})
	tk := &ticket{co: co}
	runtime.AddCleanup(tk, func(co *Co) { co.stop() }, co)
	co.tk = tk
	return co
}

// checkNoLocks panics if the coroutine, whose function has returned, still
// holds a CoMutex: that would leave every other user of the lock waiting
// for ever. The panic reaches the caller of Run or Enter.
func (co *Co) checkNoLocks() {
	if co.locks != 0 {
		panic(fmt.Sprintf("coroutine: terminated holding %d CoMutex lock(s)", co.locks))
	}
}

// New returns a coroutine with its own stack, taken from the pool if one is
// idle, that will run fn when first entered. It does not start running
// until Enter. Use Run unless one goroutine must drive several coroutines.
func New(fn func(co *Co)) *Co {
	var co *Co
	if tk, _ := pool.Get().(*ticket); tk != nil {
		co = tk.co
		co.tk = tk
	} else {
		co = newCo()
	}
	co.fn = fn
	return co
}

// resetWake forgets a Wake without a matching Yield: a caller bug, but
// harmless once forgotten. Nobody can be parked: fn has returned.
func (co *Co) resetWake() {
	if co.wake.Load() != wakeIdle {
		co.wake.Store(wakeIdle)
	}
}

// release returns a terminated New coroutine to the pool.
func release(co *Co) {
	co.resetWake()
	tk := co.tk
	co.tk = nil
	pool.Put(tk)
}

// Enter runs a coroutine made by New until it yields or terminates. It
// reports whether the coroutine terminated; a terminated coroutine goes back
// to the pool and must not be used again. Enter must not be called
// concurrently for the same coroutine, nor from inside that coroutine. A
// yielded coroutine is entered again only after its Wake (see WaitWake).
//
// If the coroutine's function panics (or terminates holding a CoMutex, which
// panics), Enter panics with the same value; the coroutine is then dead and
// is not reused. A runtime.Goexit in the function likewise ends the
// goroutine calling Enter.
func (co *Co) Enter() (terminated bool) {
	if terminated, _ = co.next(); terminated {
		release(co)
	}
	return terminated
}

// Yield suspends the coroutine until its Wake. The caller must have
// arranged for exactly one Wake (before or after this call).
//
// If that Wake has already happened, Yield consumes it and returns at once.
// Otherwise a Run coroutine parks its goroutine until the Wake, and a New
// coroutine switches back to the goroutine that entered it.
func (co *Co) Yield() {
	// Load first: a failing compare-and-swap costs as much as a
	// succeeding one, and most Yields do not find their Wake yet.
	if co.wake.Load() == wakeWoken && co.wake.CompareAndSwap(wakeWoken, wakeIdle) {
		return
	}
	if co.next == nil {
		co.waitWake()
		return
	}
	co.yield(false)
}

// Wake makes a yielded coroutine runnable again: it unparks a Run
// coroutine, or lets the driver of a New coroutine enter it. It is safe to
// call from any goroutine, and may be called before the matching Yield.
// Waking a coroutine twice for one Yield is a bug and panics.
func (co *Co) Wake() {
	for {
		switch co.wake.Load() {
		case wakeIdle:
			if co.wake.CompareAndSwap(wakeIdle, wakeWoken) {
				return
			}
		case wakeParked:
			if co.wake.CompareAndSwap(wakeParked, wakeIdle) {
				co.parked <- struct{}{}
				return
			}
		default:
			panic("coroutine: Wake of a coroutine that is already woken")
		}
	}
}

// WaitWake blocks the goroutine that drives the New coroutine co, which has
// yielded, until co's Wake, and consumes it; the driver then calls Enter:
//
//	co := coroutine.New(fn)
//	for !co.Enter() {
//		co.WaitWake()
//	}
//
// A driver that learnt of the Wake some other way still calls WaitWake
// (which then returns at once), so that the Wake is not left pending.
func (co *Co) WaitWake() {
	co.waitWake()
}

// waitWake blocks the calling goroutine until the coroutine is woken, and
// consumes the Wake.
func (co *Co) waitWake() {
	for {
		switch co.wake.Load() {
		case wakeWoken:
			if co.wake.CompareAndSwap(wakeWoken, wakeIdle) {
				return
			}
		case wakeIdle:
			if co.wake.CompareAndSwap(wakeIdle, wakeParked) {
				<-co.parked
				return
			}
		default:
			panic("coroutine: two goroutines wait for one coroutine's Wake")
		}
	}
}

// Run runs fn as a coroutine on the calling goroutine and returns once fn
// has returned. Each time fn yields, the goroutine waits for the Wake; it
// does nothing else meanwhile, so the coroutine needs no stack of its own
// and no switch. If fn panics, or returns holding a CoMutex, Run panics.
//
// This is the model imgfuse uses: a request's coroutine runs on the
// goroutine that received the request (see the package doc for the
// numbers).
func Run(fn func(co *Co)) {
	co := runPool.Get().(*Co)
	fn(co)
	co.checkNoLocks()
	co.resetWake()
	runPool.Put(co)
}

// RunInWorker runs fn, which may block the thread or take long (fdatasync,
// decompression), without stalling other coroutines: a coroutine started
// by Run runs fn on its own goroutine, which drives nothing else (the
// runtime gives its P to another thread while fn blocks in a system call);
// a New coroutine runs fn on another goroutine and yields until it has
// returned, so its driver goes on. Running fn in place saves a goroutine
// and two hand-offs per call: 16 per 1 MiB read of 64 KiB zstd clusters.
func RunInWorker(co *Co, fn func()) {
	if co.next == nil {
		fn()
		return
	}
	go func() {
		fn()
		co.Wake()
	}()
	co.Yield()
}
