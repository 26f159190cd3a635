package coroutine

import (
	"slices"
	"strings"
	"sync"
	"testing"
	"time"
)

// inOther runs fn in another coroutine, from the coroutine co (Run would
// block co's loop: it goes through a worker).
func inOther(co *Co, fn func(*Co)) {
	RunInWorker(co, func() { Run(fn) })
}

// waitFor polls cond until it holds or a second has passed.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(time.Second); !cond(); {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(50 * time.Microsecond)
	}
}

func (m *CoMutex) nwaiters() int {
	m.mu.Lock()
	defer m.mu.Unlock()
	return m.waiters.len()
}

func (q *CoQueue) len() int {
	q.mu.Lock()
	defer q.mu.Unlock()
	return q.waiters.len()
}

// TestCoMutexFIFO: waiters queued in a known order, each on its own
// goroutine, get the lock in that order.
func TestCoMutexFIFO(t *testing.T) {
	{
		{
			const n = 20
			var m CoMutex
			var order []int // protected by m
			holding := make(chan struct{})
			release := make(chan struct{})
			var wg sync.WaitGroup
			wg.Add(1)
			go Run(func(co *Co) {
				defer wg.Done()
				m.Lock(co)
				close(holding)
				RunInWorker(co, func() { <-release })
				m.Unlock(co)
			})
			<-holding
			for i := range n {
				wg.Add(1)
				go Run(func(co *Co) {
					defer wg.Done()
					m.Lock(co)
					order = append(order, i)
					m.Unlock(co)
				})
				waitFor(t, "waiter to queue", func() bool { return m.nwaiters() == i+1 })
			}
			close(release)
			wg.Wait()
			want := make([]int, n)
			for i := range want {
				want[i] = i
			}
			if !slices.Equal(order, want) {
				t.Fatalf("lock order %v, want %v", order, want)
			}
		}
	}
}

// TestCoMutexCounter: 8 goroutines × 1000 coroutines each increment a plain
// counter under the CoMutex, some holding it across a Yield; the count must
// be exact and the race detector silent.
func TestCoMutexCounter(t *testing.T) {
	{
		{
			const goroutines, iters = 8, 1000
			var m CoMutex
			counter := 0
			var wg sync.WaitGroup
			for g := range goroutines {
				wg.Add(1)
				go func() {
					defer wg.Done()
					for i := range iters {
						Run(func(co *Co) {
							m.Lock(co)
							m.AssertHeld(co)
							c := counter
							switch (g + i) % 8 {
							case 0:
								co.Wake() // a wait that completed at once
								co.Yield()
							case 1:
								RunInWorker(co, func() {}) // a real wait
							}
							counter = c + 1
							m.Unlock(co)
						})
					}
				}()
			}
			wg.Wait()
			if counter != goroutines*iters {
				t.Fatalf("counter %d, want %d", counter, goroutines*iters)
			}
		}
	}
}

func TestTryLock(t *testing.T) {
	var m CoMutex
	Run(func(co *Co) {
		if !m.TryLock(co) {
			t.Error("TryLock of a free mutex failed")
		}
		m.AssertHeld(co)
		inOther(co, func(other *Co) {
			if m.TryLock(other) {
				t.Error("TryLock of a held mutex succeeded")
			}
		})
		m.Unlock(co)
		inOther(co, func(other *Co) {
			if !m.TryLock(other) {
				t.Error("TryLock after Unlock failed")
			}
			m.Unlock(other)
		})
	})
}

func TestCoMutexMisuse(t *testing.T) {
	var m CoMutex
	for _, tc := range []struct {
		name string
		fn   func(co *Co)
		want string
	}{
		{"AssertHeld/free", func(co *Co) { m.AssertHeld(co) }, "not held"},
		{"AssertHeld/other holder", func(co *Co) {
			m.Lock(co)
			defer m.Unlock(co)
			var msg string
			inOther(co, func(other *Co) { msg = recoverString(func() { m.AssertHeld(other) }) })
			panic(msg)
		}, "not held"},
		{"Unlock/free", func(co *Co) { m.Unlock(co) }, "does not hold"},
		{"Lock/twice", func(co *Co) {
			m.Lock(co)
			defer m.Unlock(co)
			m.Lock(co)
		}, "locked twice"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := recoverString(func() { Run(tc.fn) })
			if !strings.Contains(got, tc.want) {
				t.Fatalf("panic %q, want one containing %q", got, tc.want)
			}
		})
	}
	// Not held: no panic.
	Run(func(co *Co) {
		m.Lock(co)
		m.AssertHeld(co)
		m.Unlock(co)
	})
}

// TestCoQueue: waiters, with and without a mutex, are woken oldest first by
// Next and all at once by RestartAll.
func TestCoQueue(t *testing.T) {
	for _, withMutex := range []bool{false, true} {
		name := "plain"
		if withMutex {
			name = "mutex"
		}
		t.Run(name, func(t *testing.T) {
			var q CoQueue
			var m *CoMutex
			if withMutex {
				m = new(CoMutex)
			}
			if q.Next() || !q.Empty() {
				t.Fatal("empty queue: Next woke something or not Empty")
			}
			const n = 6
			var mu sync.Mutex
			var woken []int
			var wg sync.WaitGroup
			for i := range n {
				wg.Add(1)
				go Run(func(co *Co) {
					defer wg.Done()
					if m != nil {
						m.Lock(co)
					}
					q.Wait(co, m)
					if m != nil {
						// Wait returns with the mutex held again.
						m.AssertHeld(co)
						m.Unlock(co)
					}
					mu.Lock()
					woken = append(woken, i)
					mu.Unlock()
				})
				waitFor(t, "waiter to queue", func() bool { return q.len() == i+1 })
			}
			if m != nil {
				// Waiting released the mutex.
				Run(func(co *Co) {
					if !m.TryLock(co) {
						t.Error("mutex still held by waiters")
						return
					}
					m.Unlock(co)
				})
			}
			nwoken := func() int { mu.Lock(); defer mu.Unlock(); return len(woken) }
			for i := range 3 {
				if !q.Next() {
					t.Fatal("Next found no waiter")
				}
				waitFor(t, "woken waiter to finish", func() bool { return nwoken() == i+1 })
			}
			q.RestartAll()
			wg.Wait()
			if !q.Empty() || q.Next() {
				t.Fatal("queue not empty after RestartAll")
			}
			if !slices.Equal(woken[:3], []int{0, 1, 2}) {
				t.Fatalf("Next woke %v, want [0 1 2]", woken[:3])
			}
			rest := slices.Sorted(slices.Values(woken[3:]))
			if !slices.Equal(rest, []int{3, 4, 5}) {
				t.Fatalf("RestartAll woke %v, want 3, 4, 5", rest)
			}
		})
	}
}

// TestCoQueueWakeBeforeYield: Next called between Wait's enqueue and its
// Yield (here: by the coroutine the mutex is handed to) is not lost.
func TestCoQueueHandOff(t *testing.T) {
	var q CoQueue
	var m CoMutex
	done := 0
	var wg sync.WaitGroup
	for range 50 {
		wg.Add(2)
		go Run(func(co *Co) {
			defer wg.Done()
			m.Lock(co)
			q.Wait(co, &m)
			done++
			m.Unlock(co)
		})
		go Run(func(co *Co) {
			defer wg.Done()
			m.Lock(co)
			for !q.Next() {
				// The waiter has not queued yet: let it.
				m.Unlock(co)
				RunInWorker(co, func() {})
				m.Lock(co)
			}
			m.Unlock(co)
		})
		wg.Wait()
	}
	if done != 50 {
		t.Fatalf("%d waits returned, want 50", done)
	}
}

// TestCoMutexHandOffBetweenLoops: coroutines of two loops share a CoMutex;
// each hand-off to a waiter of the other loop wakes it there. The count
// must be exact and the race detector silent.
func TestCoMutexHandOffBetweenLoops(t *testing.T) {
	loops := []*Loop{newLoop(t), newLoop(t)}
	var m CoMutex
	counter := 0
	var wg sync.WaitGroup
	for g := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			l := loops[g%2]
			for i := range 200 {
				l.Run(func(co *Co) {
					m.Lock(co)
					c := counter
					if (g+i)%4 == 0 {
						RunInWorker(co, func() {})
					}
					if co.Loop() != l {
						t.Error("coroutine moved to another loop")
					}
					counter = c + 1
					m.Unlock(co)
				})
			}
		}()
	}
	wg.Wait()
	if counter != 8*200 {
		t.Fatalf("counter %d, want %d", counter, 8*200)
	}
}
