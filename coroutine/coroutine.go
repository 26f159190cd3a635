package coroutine

import (
	"fmt"
	"iter"
	"sync/atomic"
)

// Co is a coroutine: a call stack that can be suspended (Yield) and resumed
// later, on the event loop that created it (see Loop). A *Co is handed to
// the function it runs and is valid only until that function returns; never
// store it beyond that.
//
// The only method that may be called from outside the coroutine, and from
// any goroutine, is Wake.
type Co struct {
	// loop runs the coroutine; it never migrates (iter.Pull's coroutine
	// switch must happen on the thread that created it, which is the
	// loop's locked thread). Immutable.
	loop *Loop
	// next resumes the coroutine until it yields (false) or its function
	// has returned (true). Immutable.
	next func() (terminated bool, ok bool)
	// yield suspends the coroutine, telling next whether fn has returned.
	// Set once by the coroutine before its first switch back.
	yield func(terminated bool) bool
	// stop ends the coroutine's goroutine; called by the loop only, for a
	// coroutine that will never be entered again. Immutable.
	stop func()

	// fn and arg are what the coroutine runs; nil while it is pooled.
	// Written by the loop before the first Enter.
	fn  func(co *Co, arg any)
	arg any
	// req is the Run call waiting for this coroutine, nil for one started
	// by Loop.Go. Written by the loop before the first Enter.
	req *runReq
	// panicked and panicVal record a panic of fn (recovered inside the
	// coroutine, so that the loop survives it). Loop thread only.
	panicked bool
	panicVal any

	// locks counts the CoMutexes this coroutine holds. Only the coroutine
	// itself touches it.
	locks int
	// waitNext links the coroutine into the one CoMutex or CoQueue wait
	// list it is on while suspended in Lock or Wait (a suspended
	// coroutine waits for one thing). Protected by that list's mutex.
	waitNext *Co

	// woken is set by Wake and cleared by the loop when it enters the
	// coroutine: a second Wake for one Yield is a bug.
	woken atomic.Bool
}

func (l *Loop) newCo() *Co {
	co := &Co{loop: l}
	co.next, co.stop = iter.Pull(func(yield func(bool) bool) {
		co.yield = yield
		for {
			co.run()
			if !yield(true) {
				return // stopped by the loop
			}
		}
	})
	return co
}

// run runs fn, recovering a panic so that it reaches the caller of Run
// (or, for Loop.Go, the loop) rather than tearing the loop's thread down
// in the middle of other coroutines.
func (co *Co) run() {
	defer func() {
		if r := recover(); r != nil {
			co.panicked, co.panicVal = true, r
		}
	}()
	co.fn(co, co.arg)
	co.checkNoLocks()
}

// checkNoLocks panics if the coroutine, whose function has returned, still
// holds a CoMutex: that would leave every other user of the lock waiting
// for ever.
func (co *Co) checkNoLocks() {
	if co.locks != 0 {
		panic(fmt.Sprintf("coroutine: terminated holding %d CoMutex lock(s)", co.locks))
	}
}

// Loop returns the event loop the coroutine runs on.
func (co *Co) Loop() *Loop { return co.loop }

// Yield suspends the coroutine and returns to its loop until Wake. The
// caller must have arranged for exactly one Wake, which may come before
// this call (the loop then enters the coroutine again at once).
func (co *Co) Yield() {
	co.yield(false)
}

// Wake makes a yielded coroutine runnable again: it queues the coroutine
// on its own loop, which enters it when it next looks at its queue. It is
// safe to call from any goroutine (a worker, another loop, a completion
// handler), and may be called before the matching Yield. Waking a
// coroutine twice for one Yield is a bug and panics.
func (co *Co) Wake() {
	if co.woken.Swap(true) {
		panic("coroutine: Wake of a coroutine that is already woken")
	}
	co.loop.ready(co)
}

// RunInWorker runs fn, which may block the thread or take long (fdatasync,
// fallocate, decompression), on a goroutine of its own, and yields until
// it has returned: the loop goes on serving other coroutines meanwhile,
// and the coroutine resumes on its loop. fn must not touch the coroutine.
func RunInWorker(co *Co, fn func()) {
	co.loop.readied = true
	go func() {
		fn()
		co.Wake()
	}()
	co.Yield()
}
