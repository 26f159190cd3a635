// Package coroutine provides coroutines for the image drivers: call stacks
// that suspend (Yield) while waiting for I/O, a lock or a worker and resume
// when that wait completes (Wake), plus the coroutine-aware CoMutex and
// CoQueue.
//
// It owns: Co (Run, New, Enter, WaitWake, Yield, Wake), the pools of idle coroutines,
// RunInWorker, CoMutex and CoQueue. It knows nothing about images.
//
// # Model
//
// A request's coroutine is started by Run(fn) on the goroutine that received
// the request (a FUSE callback). A coroutine that waits arranges exactly one
// Wake from whoever completes the wait and then calls Yield:
//
//   - an AIO completion: the reaper goroutine calls Wake;
//   - a CoMutex hand-off: Unlock makes the first waiter the holder and
//     wakes it;
//   - a CoQueue: Next or RestartAll wakes waiters;
//   - a worker: RunInWorker runs a blocking function on another goroutine,
//     which wakes the coroutine when done.
//
// Wake may come before Yield. Then Yield consumes it and returns at once, so
// a wait that completed first costs one compare-and-swap. Otherwise the
// goroutine parks on a channel until the Wake: the only channel operation,
// on the path where a goroutine must sleep anyway.
//
// A function takes co *Co as its first parameter iff it may yield; a Co is
// never stored or handed to another goroutine except to call Wake.
//
// # Run needs no second stack
//
// While a coroutine started by Run is suspended, the goroutine that called
// Run has nothing to do but wait for the Wake and resume it. So Run does not
// give the coroutine a stack of its own: fn runs directly on the calling
// goroutine, whose stack is the coroutine's suspended call stack, and Yield
// parks that goroutine until the Wake. A Run coroutine is a pooled struct
// (the Wake state and a channel); starting one costs ~16 ns.
//
// New and Enter give a coroutine its own stack, an iter.Pull iterator (the
// runtime's coroutine switch, no trip through the scheduler), for a
// goroutine that drives several coroutines itself. Used for Run, that stack
// would cost a switch pair per start and per Yield (BenchmarkPullFloor, a
// bare iter.Pull next+yield pair: ~113 ns here), and a second goroutine per
// request in flight, and buy nothing: BenchmarkNewRemoteWake vs
// BenchmarkRunRemoteWake below. Linking the runtime's coroutine functions
// directly would need -checklinkname=0, which a normal go build refuses.
//
// New coroutines are pooled too (QEMU measured ~241 ns per create/destroy
// without its pool; a new iter.Pull costs a goroutine and ~8 allocations).
// The pool is a sync.Pool, per-P and lock free on the hot path. It holds a
// ticket rather than the Co, because an idle coroutine's goroutine
// references its Co: when sync.Pool drops an idle ticket at GC, a cleanup
// stops the goroutine, so the pool trims itself and never leaks goroutines.
//
// A panic in a coroutine, including the one for terminating with a CoMutex
// held, propagates to the caller of Run or Enter; a New coroutine that
// panicked is dead and is not reused.
//
// # Why not one event loop per image
//
// QEMU runs an image's coroutines in one AioContext thread, so driver state
// has no data races by construction. In Go the loop would be a goroutine,
// and every request would pay a hand-off to it and back:
// BenchmarkLoopRoundTrip (a channel send to a loop goroutine and the answer
// back, the loop doing nothing) costs ~430 ns while the loop goroutine is
// hot, and microseconds once it has gone to sleep and must be woken through
// the scheduler. It would also put all of an image's CPU work (mapping,
// copying) on one core. Run costs ~16 ns instead, spreads requests over all
// cores, and the one thing the loop gave for free, serialised metadata,
// comes from the qcow2 driver's CoMutex. A request that really waits pays
// the goroutine hand-offs of its completion in any design
// (BenchmarkRunRemoteWake).
//
// # Lock order
//
// CoMutex is a lock for coroutines and may be held across Yields. The
// sync.Mutexes inside CoMutex and CoQueue are leaf locks: held only to
// update a holder or a wait list, never across a Yield, a Wake or a call out
// of the package. So:
//
//	CoMutex (held by a coroutine, e.g. the qcow2 metadata lock)
//	├── CoMutex.mu   (leaf)
//	└── CoQueue.mu   (leaf)
//
// Wake never blocks: it is a compare-and-swap, or a send on a channel with
// room that only the parked goroutine receives from.
//
// # Numbers
//
// On the development machine (2 vCPUs shared with other work, Go 1.26),
// best of 3, ns/op, all allocation-free:
//
//	BenchmarkRunNoYield            Run of a function that never waits     16
//	BenchmarkRunParallel           the same from 2 Ps at once (per op)   7-15
//	BenchmarkWakeYield             Wake, then Yield (no park)              23
//	BenchmarkRunRemoteWake         Run, one Yield woken by a goroutine    495
//	BenchmarkNewRemoteWake         the same with New + Enter              803
//	BenchmarkLoopRoundTrip         request to a loop goroutine and back   433
//	BenchmarkPullFloor             bare iter.Pull next+yield              113
//	BenchmarkYieldEnter            New coroutine: Yield + Enter           137
//	BenchmarkCreateEnterTerminate  pooled New + Enter + return            144
//	BenchmarkCoMutexUncontended    Lock + Unlock                           36
//	BenchmarkCoMutexContended      4 goroutines, FIFO hand-off            340
//
// A New coroutine's Yield + Enter is the runtime's switch plus ~20 ns: each
// call level between the caller and the switch costs a mispredicted return
// after the stack changes, and Enter and Yield cannot be inlined.
package coroutine
