package coroutine

import (
	"iter"
	"sync"
	"testing"
)

// BenchmarkCreateEnterTerminate: a pooled coroutine is created, entered,
// runs an empty function and goes back to the pool.
func BenchmarkCreateEnterTerminate(b *testing.B) {
	b.ReportAllocs()
	fn := func(*Co) {}
	for b.Loop() {
		New(fn).Enter()
	}
}

// BenchmarkRunNoYield is Run of a function that never yields: the cost a
// request pays for running in a coroutine at all.
func BenchmarkRunNoYield(b *testing.B) {
	b.ReportAllocs()
	fn := func(*Co) {}
	for b.Loop() {
		Run(fn)
	}
}

// BenchmarkYieldEnter: one Yield and the Enter that resumes it, driven by
// hand (no Wake).
func BenchmarkYieldEnter(b *testing.B) {
	b.ReportAllocs()
	stop := false
	co := New(func(co *Co) {
		for !stop {
			co.Yield()
		}
	})
	co.Enter()
	for b.Loop() {
		co.Enter()
	}
	stop = true
	if !co.Enter() {
		b.Fatal("coroutine did not terminate")
	}
}

// BenchmarkWakeYield: inside Run, Wake then Yield: the cost of a wait that
// has completed by the time we yield (a CoMutex handed over before our
// Yield, a worker that finished first). Yield returns without parking.
func BenchmarkWakeYield(b *testing.B) {
	b.ReportAllocs()
	n := b.N
	b.ResetTimer()
	Run(func(co *Co) {
		for range n {
			co.Wake()
			co.Yield()
		}
	})
}

// BenchmarkRunRemoteWake: Run of a coroutine that yields once and is woken
// by another goroutine, like an AIO completion: the complete cost of a
// request that waits once, dominated by the two goroutine hand-offs.
func BenchmarkRunRemoteWake(b *testing.B) {
	b.ReportAllocs()
	wakes := make(chan *Co, 1)
	go func() {
		for co := range wakes {
			co.Wake()
		}
	}()
	fn := func(co *Co) {
		wakes <- co
		co.Yield()
	}
	for b.Loop() {
		Run(fn)
	}
	close(wakes)
}

// BenchmarkNewRemoteWake is BenchmarkRunRemoteWake with a New coroutine
// and its driver loop: the same waits plus a switch pair.
func BenchmarkNewRemoteWake(b *testing.B) {
	b.ReportAllocs()
	wakes := make(chan *Co, 1)
	go func() {
		for co := range wakes {
			co.Wake()
		}
	}()
	fn := func(co *Co) {
		wakes <- co
		co.Yield()
	}
	for b.Loop() {
		co := New(fn)
		for !co.Enter() {
			co.WaitWake()
		}
	}
	close(wakes)
}

// BenchmarkLoopRoundTrip is the alternative model the package doc argues
// against: hand each request to one event-loop goroutine and wait for its
// answer. It measures only the hand-off in and out (the loop does no work).
func BenchmarkLoopRoundTrip(b *testing.B) {
	b.ReportAllocs()
	type req struct{ done chan struct{} }
	reqs := make(chan *req, 64)
	go func() {
		for r := range reqs {
			r.done <- struct{}{}
		}
	}()
	r := &req{done: make(chan struct{}, 1)}
	for b.Loop() {
		reqs <- r
		<-r.done
	}
	close(reqs)
}

// BenchmarkLoopRoundTripParallel is BenchmarkLoopRoundTrip with requests
// from every P at once, as FUSE requests arrive.
func BenchmarkLoopRoundTripParallel(b *testing.B) {
	b.ReportAllocs()
	type req struct{ done chan struct{} }
	reqs := make(chan *req, 64)
	go func() {
		for r := range reqs {
			r.done <- struct{}{}
		}
	}()
	b.RunParallel(func(pb *testing.PB) {
		r := &req{done: make(chan struct{}, 1)}
		for pb.Next() {
			reqs <- r
			<-r.done
		}
	})
	close(reqs)
}

// BenchmarkRunParallel: Run of a coroutine that never yields, from every P.
func BenchmarkRunParallel(b *testing.B) {
	b.ReportAllocs()
	fn := func(*Co) {}
	b.RunParallel(func(pb *testing.PB) {
		for pb.Next() {
			Run(fn)
		}
	})
}

// BenchmarkCoMutexUncontended: Lock+Unlock with no other user.
func BenchmarkCoMutexUncontended(b *testing.B) {
	b.ReportAllocs()
	var m CoMutex
	n := b.N
	b.ResetTimer()
	Run(func(co *Co) {
		for range n {
			m.Lock(co)
			m.Unlock(co)
		}
	})
}

// BenchmarkCoMutexContended: several goroutines, each running coroutines
// that take one CoMutex, hold it across a wait that has already completed
// (Wake, Yield) and release it; waiters get the lock by FIFO hand-off,
// which wakes the waiter's parked driver. ns/op is per lock/unlock.
func BenchmarkCoMutexContended(b *testing.B) {
	b.ReportAllocs()
	var m CoMutex
	const goroutines = 4
	var wg sync.WaitGroup
	per := b.N/goroutines + 1
	b.ResetTimer()
	for range goroutines {
		wg.Add(1)
		go func() {
			defer wg.Done()
			fn := func(co *Co) {
				m.Lock(co)
				co.Wake()
				co.Yield()
				m.Unlock(co)
			}
			for range per {
				Run(fn)
			}
		}()
	}
	wg.Wait()
}

// BenchmarkPullFloor is the floor under BenchmarkYieldEnter: a bare
// iter.Pull next+yield pair, the runtime's coroutine switch there and back.
func BenchmarkPullFloor(b *testing.B) {
	next, stop := iter.Pull(func(yield func(struct{}) bool) {
		for yield(struct{}{}) {
		}
	})
	for b.Loop() {
		next()
	}
	stop()
}
