// Package coroutine provides event loops and the coroutines they run for the
// image drivers: call stacks that suspend (Yield) while waiting for I/O, a
// lock or a worker and resume (Wake) on their loop, plus the
// coroutine-aware CoMutex and CoQueue.
//
// It owns: Loop (NewLoop, Loops, Run, Go, Post, Watch, OnPoll, OnIdle,
// OnClose, Value), Co (Yield, Wake, Loop), each loop's pool of idle coroutines,
// RunInWorker, CoMutex and CoQueue. It knows nothing about images: aio
// keeps its AIO context in a loop (Value, Watch, OnIdle), fusefs its
// /dev/fuse descriptor (Watch) and, with FUSE-over-io_uring, its ring
// (Watch, OnPoll, OnIdle).
//
// # Model: one event loop per CPU
//
// QEMU's shape (util/aio-posix.c, block/export/fuse.c): a Loop is a
// goroutine locked to its OS thread that sleeps in one epoll_wait over the
// descriptors registered with it and its own eventfd. The process has one
// loop per CPU (Loops: GOMAXPROCS of them, GOMAXPROCS then raised by one,
// see below). A loop runs one coroutine at a time; a coroutine runs until
// it waits, and then the loop goes on with whatever else is ready:
//
//	for {
//		run posts, Run starts and woken coroutines until none is left
//		pollers, then run what they started, until they find nothing
//		        (an io_uring completion queue: requests that arrived)
//		idle hooks (aio: one io_submit for the iteration's iocbs;
//		        io_uring: one io_uring_enter for the iteration's replies)
//		epoll_wait (a /dev/fuse clone, AIO eventfds, a ring, the loop's eventfd)
//		handlers (read requests until EAGAIN and Go each; reap completions)
//	}
//
// Pollers exist for io_uring's task work: the kernel fills a request into
// the loop's ring only when the loop's thread runs in the kernel, so it
// interrupts epoll_wait (EINTR) to do it, and the completion is waiting in
// memory when epoll_wait returns; the poller finds it without another
// system call.
//
// A coroutine that waits arranges exactly one Wake from whoever completes
// the wait and calls Yield, which switches back to its loop:
//
//   - an AIO completion: the loop's eventfd handler reaps it and Wakes;
//   - a CoMutex hand-off: Unlock makes the first waiter the holder and
//     wakes it — on the waiter's own loop, whichever loop unlocks;
//   - a CoQueue: Next or RestartAll wakes waiters;
//   - a worker: RunInWorker runs a blocking function on a goroutine of its
//     own, which wakes the coroutine when done.
//
// Wake queues the coroutine on its loop (a mutex-protected slice) and
// writes the loop's eventfd only if the loop sleeps (a flag the loop sets
// before it looks at its queue a last time, as QEMU's notify_me), so a
// wake on the loop's own thread costs no system call. Wake may come before
// Yield: the loop enters the coroutine only after it has yielded, since
// both run on the loop's thread.
//
// A coroutine is an iter.Pull iterator (the runtime's coroutine switch, no
// trip through the scheduler). The runtime requires a coroutine made by a
// goroutine that holds LockOSThread to be switched to on that same thread
// (runtime/coro.go, coroswitch_m), so a loop creates, pools and enters its
// own coroutines and a coroutine never moves to another loop. Anything
// that blocks the thread inside a coroutine blocks every request of its
// loop: system calls that may wait for a device (fdatasync, fallocate,
// ftruncate), CPU-heavy work (decompression), waiting for a plain
// goroutine or a sync lock that a suspended coroutine may hold, all go
// through RunInWorker. Run refuses to be called on a loop's thread.
//
// Entry points: a loop's Watch handler starts a request's coroutine with
// Go, which enters it at once, so the request runs up to its first wait
// (its iocb queued) before the next request is read. Code outside any
// coroutine — CLI tools, open and close, tests, flush at unmount — calls
// Run(fn), which runs fn as a coroutine on one of the process's loops and
// waits: one way to do AIO for every caller. RunInWorker leaves the loop
// and comes back.
//
// A function takes co *Co as its first parameter iff it may yield; a Co is
// never stored or handed to another goroutine except to call Wake.
//
// A panic in a coroutine is recovered inside it: a Run caller gets it
// re-raised; a Go coroutine's panic is re-raised on the loop (ending the
// process, as an unrecovered panic in a goroutine would). Either way the
// coroutine is not reused (it may have died holding locks), and
// terminating with a CoMutex held panics.
//
// # Why a loop per CPU now, and sysmon
//
// The previous shape ran each request's coroutine on the goroutine that
// read it (a netpoller reader handing the reading on) and reaped AIO with a
// leader or a reaper goroutine. On a quiet machine a 4 KiB qcow2 read at
// QD1 then cost 5.5–5.9 context switches and ~115 µs of daemon CPU against
// QEMU's 2.0 and ~60 µs: one request woke the reader, an idle thread for
// the hand-off, the AIO leader and sysmon. On a loop a QD1 request is one
// sleep waiting for the request and one waiting for its completion, on one
// thread (fusefs doc, "Serving", for the measurements).
//
// A loop asleep in epoll_wait holds its P in a system call. When no P is
// idle, sysmon takes such Ps away on every 20 µs tick and keeps ticking
// (runtime/proc.go, retake), a thread wake-up each time; hence one P more
// than loops. A goroutine the loop makes runnable (a worker, a Run caller)
// lands on the loop's P and waited for sysmon to free it: 60–130 µs per
// Run round trip. A loop that readied one gives its P away (Gosched) before
// it sleeps: 20–30 µs. Requests never pay either.
//
// Even with a P to spare, a loop that sleeps through the runtime's
// epoll_wait (entersyscall/exitsyscall) woke sysmon about once per QD1
// request. So an idle loop first waits up to 5 ms in a raw epoll_wait the
// runtime does not see, then in an ordinary one (Loop.wait). Measured on a
// quiet machine, fio 4 KiB random reads at QD1 on a 1 GiB qcow2 (per
// thread from /proc/PID/task/*/status and stat):
//
//	                          ctxsw/IO   sysmon's   CPU µs/IO   idle daemon
//	runtime epoll_wait       3.33-3.47   0.73-0.86    107-108   0 wakes/s
//	raw for up to 5 ms       2.94-2.96   0.35-0.36     94-108   0 wakes/s
//	raw only                 2.63-2.76   0.12-0.16      79-95   516 wakes/s, 1% CPU
//
// Raw only is cheapest per request but an idle daemon never frees its P,
// and sysmon then preempts each loop by signal every 10 ms: not kept. What
// is left above QEMU's 2.0 is mostly the second loop: a request that
// arrives while the loop that served the last one is between its reply
// and its next epoll_wait wakes the other loop (EPOLLEXCLUSIVE wakes one
// loop that is waiting), which then often finds the queue empty (~0.55
// switches and ~8 µs per I/O). QEMU 11's multi-queue export pays the same
// (2.9-3.0 switches per I/O at QD1 in bench/run, against 2.0 single-queue).
//
// # Lock order
//
// CoMutex is a lock for coroutines and may be held across Yields. The
// sync.Mutexes inside CoMutex, CoQueue and Loop are leaf locks: held only
// to update a holder, a wait list or a queue, never across a Yield, a Wake
// or a call out of the package (Loop.mu is dropped before a watch handler
// runs). So:
//
//	CoMutex (held by a coroutine, e.g. the qcow2 metadata lock)
//	├── CoMutex.mu   (leaf)
//	├── CoQueue.mu   (leaf)
//	└── Loop.mu      (leaf: Wake's queue)
//
// Wake never blocks: a lock-protected append, and at most one eventfd
// write.
//
// # Numbers
//
// On the development machine (2 vCPUs shared with other test runs, Go
// 1.26), ns/op, go test -bench . ./coroutine/, all allocation-free:
//
//	BenchmarkGoTerminate           Go + enter + return, on the loop       300
//	BenchmarkWakeYield             Wake, Yield, re-entered by the loop  100-140
//	BenchmarkCoMutexUncontended    Lock + Unlock                           14
//	BenchmarkPullFloor             bare iter.Pull next+yield              106
//	BenchmarkCrossLoopPingPong     a wake between two loops' coroutines  4.5-40k
//	BenchmarkRunNoYield            Run from a goroutine (round trip)     26k
//
// A request's coroutine costs its loop ~0.3 µs to start and ~0.1 µs per
// wait, against ~45 µs for a FUSE round trip; the expensive paths (a wake
// across threads, a Run from outside) are those a request does not take.
// TestLoopPathAllocatesNothing holds the loop's per-request path (a pooled
// coroutine started with Go, one Yield, its Wake, its end) to zero
// allocations.
package coroutine
