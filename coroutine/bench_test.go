package coroutine

import (
	"iter"
	"sync"
	"testing"
)

// BenchmarkRunNoYield is Run of a function that never yields, from a plain
// goroutine: a round trip to a loop thread (queue, eventfd, enter, answer)
// — the price of entering the loop from outside, which requests never pay.
func BenchmarkRunNoYield(b *testing.B) {
	b.ReportAllocs()
	fn := func(*Co) {}
	for b.Loop() {
		Run(fn)
	}
}

// BenchmarkGoTerminate: on the loop, a pooled coroutine is started with Go,
// runs an empty function and goes back to the pool: what a FUSE request
// pays for its coroutine (plus one Wake/Yield of the benchmark's own).
func BenchmarkGoTerminate(b *testing.B) {
	b.ReportAllocs()
	l := newLoop(b)
	fn := func(*Co, any) {}
	n := b.N
	b.ResetTimer()
	l.Run(func(co *Co) {
		for range n {
			l.Go(fn, nil)
			co.Wake()
			co.Yield()
		}
	})
}

// BenchmarkWakeYield: Wake then Yield on the loop: a wait that completed
// by the time we yield (a CoMutex hand-off on the same loop, an AIO
// completion reaped by the loop). A switch to the loop and back.
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

// BenchmarkRemoteWake: one Yield woken by another goroutine: the wake
// crosses threads through the loop's queue and eventfd.
func BenchmarkRemoteWake(b *testing.B) {
	b.ReportAllocs()
	ch := make(chan *Co)
	done := make(chan struct{})
	go func() {
		for co := range ch {
			co.Wake()
		}
		close(done)
	}()
	n := b.N
	b.ResetTimer()
	Run(func(co *Co) {
		for range n {
			ch <- co // the channel send is part of the cost measured
			co.Yield()
		}
	})
	close(ch)
	<-done
}

// BenchmarkCrossLoopPingPong: coroutines on two loops wake each other in
// turn (a CoMutex hand-off between loops); ns/op per wake.
func BenchmarkCrossLoopPingPong(b *testing.B) {
	b.ReportAllocs()
	l1, l2 := newLoop(b), newLoop(b)
	var ping, pong *Co
	ready := make(chan struct{})
	n := b.N / 2
	var wg sync.WaitGroup
	wg.Add(2)
	go l2.Run(func(co *Co) {
		defer wg.Done()
		pong = co
		close(ready)
		for range n {
			co.Yield()
			ping.Wake()
		}
	})
	<-ready
	b.ResetTimer()
	go l1.Run(func(co *Co) {
		defer wg.Done()
		ping = co
		for range n {
			pong.Wake()
			co.Yield()
		}
	})
	wg.Wait()
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

// BenchmarkCoMutexContended: 4 goroutines Run coroutines (on the process's
// loops) that take one CoMutex across a completed wait; waiters get it by
// FIFO hand-off, on their own loop. ns/op per lock/unlock, Run included.
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

// BenchmarkPullFloor is the floor under BenchmarkWakeYield: a bare
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
