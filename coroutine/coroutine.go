package coroutine

import (
	"fmt"
	"iter"
	"sync"
)

// Co is a coroutine: a call stack that can be suspended (Yield) and
// re-entered later (Enter). A *Co is handed to the function it runs and is
// valid only until that function returns; never store it beyond that.
//
// The only methods that may be called from outside the coroutine, and from
// any goroutine, are Wake and (by the goroutine that drives it) Enter.
type Co struct {
	next  func() (struct{}, bool)
	yield func(struct{}) bool

	// fn is the function being run; nil while the coroutine sits in the pool.
	fn func(*Co)
	// done is set by the coroutine just before it switches back for the
	// last time; read by Enter on the same logical thread of control.
	done bool
	// locks counts the CoMutexes this coroutine holds. Only the coroutine
	// itself touches it.
	locks int

	// wake receives one token per Wake. Each Yield is matched by exactly
	// one Wake, which may come before or after the Yield itself.
	wake chan struct{}
}

// poolMax bounds the number of idle coroutines kept for reuse. Each idle
// coroutine is a parked goroutine with a small stack.
const poolMax = 4096

var pool struct {
	mu   sync.Mutex
	free []*Co
}

func newCo() *Co {
	co := &Co{wake: make(chan struct{}, 1)}
	co.next, _ = iter.Pull(func(yield func(struct{}) bool) {
		co.yield = yield
		for {
			co.fn(co)
			co.fn = nil
			if co.locks != 0 {
				// A coroutine that ends holding a lock leaves every
				// other user of that lock waiting for ever.
				panic(fmt.Sprintf("coroutine: terminated holding %d CoMutex lock(s)", co.locks))
			}
			co.done = true
			if !yield(struct{}{}) {
				return
			}
		}
	})
	return co
}

// New returns a coroutine, taken from the pool if one is idle, that will run
// fn when first entered. It does not start running until Enter.
func New(fn func(co *Co)) *Co {
	pool.mu.Lock()
	var co *Co
	if n := len(pool.free); n > 0 {
		co = pool.free[n-1]
		pool.free[n-1] = nil
		pool.free = pool.free[:n-1]
	}
	pool.mu.Unlock()
	if co == nil {
		co = newCo()
	}
	co.fn = fn
	co.done = false
	return co
}

func release(co *Co) {
	select {
	case <-co.wake:
		// A Wake without a matching Yield: a caller bug, but harmless
		// once drained.
	default:
	}
	pool.mu.Lock()
	if len(pool.free) < poolMax {
		pool.free = append(pool.free, co)
		co = nil
	}
	pool.mu.Unlock()
	// A coroutine that does not fit in the pool is simply dropped; its
	// goroutine stays parked, which is why the pool is large.
}

// Enter runs the coroutine until it yields or terminates. It reports whether
// the coroutine terminated; a terminated coroutine goes back to the pool and
// must not be used again. Enter must not be called concurrently for the same
// coroutine, nor from inside that coroutine.
func (co *Co) Enter() (terminated bool) {
	co.next()
	if co.done {
		release(co)
		return true
	}
	return false
}

// Yield suspends the coroutine and returns control to the goroutine that
// entered it. It returns when the coroutine is entered again. The caller
// must have arranged for exactly one Wake (before or after this call).
func (co *Co) Yield() {
	co.yield(struct{}{})
}

// Wake schedules a yielded coroutine for re-entry by the goroutine that
// drives it (see Run). It is safe to call from any goroutine, and may be
// called before the matching Yield.
func (co *Co) Wake() {
	co.wake <- struct{}{}
}

// Run runs fn in a pooled coroutine driven by the calling goroutine: it
// enters the coroutine, and each time the coroutine yields, waits for its
// Wake and enters it again. Run returns once fn has returned.
//
// This is the model imgfuse uses: a coroutine is entered from the goroutine
// that received the request (see the package doc for the numbers).
func Run(fn func(co *Co)) {
	co := New(fn)
	for !co.Enter() {
		<-co.wake
	}
}

// RunInWorker runs fn, which may block the thread, on another goroutine and
// suspends the coroutine until it has returned. Use it for CPU-heavy work
// (decompression) that must not stall the coroutine's driver.
func RunInWorker(co *Co, fn func()) {
	go func() {
		fn()
		co.Wake()
	}()
	co.Yield()
}
