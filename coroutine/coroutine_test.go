package coroutine

import (
	"fmt"
	"os"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// newLoop starts a private loop closed at the end of the test.
func newLoop(t testing.TB) *Loop {
	t.Helper()
	l, err := NewLoop()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(l.Close)
	return l
}

// TestWakeBeforeAndAfterYield: a Wake that arrives before its Yield (from
// the coroutine itself or from another goroutine) or after it resumes the
// coroutine exactly once per Yield.
func TestWakeBeforeAndAfterYield(t *testing.T) {
	n := 0
	Run(func(co *Co) {
		for range 3 {
			co.Wake()
			co.Yield()
			n++
		}
		done := make(chan struct{})
		go func() {
			co.Wake()
			close(done)
		}()
		<-done // the Wake has happened (blocking the loop, briefly: a test)
		co.Yield()
		n++
		go func() {
			time.Sleep(time.Millisecond)
			co.Wake()
		}()
		co.Yield()
		n++
	})
	if n != 5 {
		t.Fatalf("%d yields returned, want 5", n)
	}
}

// TestRunRemoteWake: a coroutine that yields many times, each time woken by
// a different goroutine, sometimes before it has yielded.
func TestRunRemoteWake(t *testing.T) {
	const yields = 200
	var got []int
	Run(func(co *Co) {
		for i := range yields {
			go func() {
				if i%2 == 0 {
					time.Sleep(10 * time.Microsecond)
				}
				co.Wake()
			}()
			co.Yield()
			got = append(got, i)
		}
	})
	if len(got) != yields {
		t.Fatalf("%d yields returned, want %d", len(got), yields)
	}
}

// TestRunConcurrent: many goroutines Run coroutines that wait on workers;
// every Run returns having seen all of its own steps.
func TestRunConcurrent(t *testing.T) {
	var wg sync.WaitGroup
	for g := range 8 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range 50 {
				steps := 0
				Run(func(co *Co) {
					for range 3 {
						RunInWorker(co, func() { steps++ })
					}
				})
				if steps != 3 {
					t.Errorf("goroutine %d run %d: %d steps", g, i, steps)
				}
			}
		}()
	}
	wg.Wait()
}

// TestPoolReuse: a loop reuses a terminated coroutine for the next one.
func TestPoolReuse(t *testing.T) {
	l := newLoop(t)
	var first, second *Co
	l.Run(func(co *Co) { first = co })
	l.Run(func(co *Co) { second = co })
	if first != second {
		t.Fatal("second coroutine was not taken from the loop's pool")
	}
}

// TestRunInWorkerRoundTrip: the worker runs off the loop's thread, and the
// coroutine resumes on its loop's thread afterwards.
func TestRunInWorkerRoundTrip(t *testing.T) {
	l := newLoop(t)
	var before, worker, after int
	l.Run(func(co *Co) {
		before = unix.Gettid()
		RunInWorker(co, func() { worker = unix.Gettid() })
		after = unix.Gettid()
		if co.Loop() != l {
			t.Error("coroutine reports another loop")
		}
	})
	if before != l.tid || after != l.tid {
		t.Fatalf("coroutine ran on threads %d and %d, loop thread %d", before, after, l.tid)
	}
	if worker == l.tid {
		t.Fatal("worker ran on the loop's thread")
	}
}

// TestRunInWorkerDoesNotBlockLoop: while one coroutine's worker blocks,
// another coroutine of the same loop runs to completion.
func TestRunInWorkerDoesNotBlockLoop(t *testing.T) {
	l := newLoop(t)
	release := make(chan struct{})
	done := make(chan struct{})
	go func() {
		l.Run(func(co *Co) { RunInWorker(co, func() { <-release }) })
		close(done)
	}()
	l.Run(func(co *Co) {}) // would hang if the loop were blocked
	close(release)
	<-done
}

func recoverString(fn func()) (msg string) {
	defer func() {
		if r := recover(); r != nil {
			msg = fmt.Sprint(r)
		}
	}()
	fn()
	return ""
}

// TestPanicPropagates: a panic in a coroutine reaches the caller of Run,
// and the loop goes on serving; so does terminating with a CoMutex held.
func TestPanicPropagates(t *testing.T) {
	l := newLoop(t)
	if got := recoverString(func() { l.Run(func(co *Co) { panic("boom") }) }); got != "boom" {
		t.Fatalf("panic %q, want boom", got)
	}
	var m CoMutex
	if got := recoverString(func() { l.Run(func(co *Co) { m.Lock(co) }) }); !strings.Contains(got, "holding 1 CoMutex") {
		t.Fatalf("panic %q, want the held-lock panic", got)
	}
	got := recoverString(func() {
		l.Run(func(co *Co) {
			RunInWorker(co, func() {})
			panic("after a yield")
		})
	})
	if got != "after a yield" {
		t.Fatalf("panic %q after a yield", got)
	}
	ran := false
	l.Run(func(co *Co) { RunInWorker(co, func() {}); ran = true })
	if !ran {
		t.Fatal("the loop does not serve after a panic")
	}
}

func TestWakeTwicePanics(t *testing.T) {
	got := recoverString(func() {
		Run(func(co *Co) {
			co.Wake()
			defer co.Yield()
			co.Wake()
		})
	})
	if !strings.Contains(got, "already woken") {
		t.Fatalf("panic %q, want already woken", got)
	}
}

// TestRunFromCoroutinePanics: Run would block the loop it is called on.
func TestRunFromCoroutinePanics(t *testing.T) {
	var got string
	Run(func(co *Co) { got = recoverString(func() { Run(func(*Co) {}) }) })
	if !strings.Contains(got, "event loop's thread") {
		t.Fatalf("panic %q", got)
	}
}

// TestCrossLoopWake: a coroutine of one loop is woken by a coroutine of
// another and resumes on its own loop's thread.
func TestCrossLoopWake(t *testing.T) {
	a, b := newLoop(t), newLoop(t)
	for range 100 {
		var sleeper atomic.Pointer[Co]
		var tids [2]int
		done := make(chan struct{})
		go func() {
			a.Run(func(co *Co) {
				tids[0] = unix.Gettid()
				sleeper.Store(co)
				co.Yield()
				tids[1] = unix.Gettid()
			})
			close(done)
		}()
		for sleeper.Load() == nil {
			time.Sleep(10 * time.Microsecond)
		}
		b.Run(func(co *Co) { sleeper.Load().Wake() })
		<-done
		if tids[0] != a.tid || tids[1] != a.tid {
			t.Fatalf("coroutine of loop %d ran on %v", a.tid, tids)
		}
	}
}

// TestLoopCloseWaitsForInflight: Close returns only after the coroutines in
// flight have finished, and their wakes still reach them meanwhile.
func TestLoopCloseWaitsForInflight(t *testing.T) {
	l, err := NewLoop()
	if err != nil {
		t.Fatal(err)
	}
	var finished atomic.Int32
	started := make(chan struct{}, 8)
	for range 8 {
		go l.Run(func(co *Co) {
			started <- struct{}{}
			RunInWorker(co, func() { time.Sleep(20 * time.Millisecond) })
			finished.Add(1)
		})
	}
	for range 8 {
		<-started
	}
	l.Close()
	if n := finished.Load(); n != 8 {
		t.Fatalf("Close returned with %d of 8 coroutines finished", n)
	}
	if got := recoverString(func() { l.Post(func() {}) }); !strings.Contains(got, "closed") {
		t.Fatalf("Post after Close: panic %q", got)
	}
}

// TestWatchEAGAIN: a Watch handler on a non-blocking pipe reads until
// EAGAIN and starts a coroutine per message from the handler; every byte
// written arrives, and the handler is not called in a spin while the pipe
// is empty.
func TestWatchEAGAIN(t *testing.T) {
	l := newLoop(t)
	var p [2]int
	if err := unix.Pipe2(p[:], unix.O_NONBLOCK|unix.O_CLOEXEC); err != nil {
		t.Fatal(err)
	}
	defer unix.Close(p[1])
	defer unix.Close(p[0])
	var calls, eagain, got atomic.Int32
	var entered atomic.Int32
	handle := func(co *Co, arg any) {
		entered.Add(int32(arg.(int)))
		RunInWorker(co, func() {})
	}
	err := l.Watch(p[0], unix.EPOLLIN, func(uint32) {
		calls.Add(1)
		var buf [16]byte
		for {
			n, err := unix.Read(p[0], buf[:])
			if err == unix.EAGAIN {
				eagain.Add(1)
				return
			}
			if err != nil {
				t.Error(err)
				return
			}
			got.Add(int32(n))
			l.Go(handle, n)
		}
	})
	if err != nil {
		t.Fatal(err)
	}
	const writes = 50
	for range writes {
		if _, err := unix.Write(p[1], []byte("abc")); err != nil {
			t.Fatal(err)
		}
		time.Sleep(100 * time.Microsecond)
	}
	waitFor(t, "all bytes", func() bool { return got.Load() == 3*writes && entered.Load() == 3*writes })
	time.Sleep(20 * time.Millisecond)
	if c := calls.Load(); c > writes || c != eagain.Load() {
		t.Fatalf("%d handler calls for %d writes, %d ended in EAGAIN", c, writes, eagain.Load())
	}
	l.Post(func() { l.Unwatch(p[0]) })
	l.Run(func(*Co) {}) // the Unwatch has run
	before := calls.Load()
	unix.Write(p[1], []byte("x"))
	time.Sleep(10 * time.Millisecond)
	if calls.Load() != before {
		t.Fatal("handler called after Unwatch")
	}
}

// TestGoEntersAtOnce: Go from a Post function runs the coroutine up to its
// first Yield before returning; Go from a coroutine queues it.
func TestGoEntersAtOnce(t *testing.T) {
	l := newLoop(t)
	var trace []string
	done := make(chan struct{})
	l.Post(func() {
		l.Go(func(co *Co, _ any) {
			trace = append(trace, "child")
			l.Go(func(co *Co, _ any) { trace = append(trace, "grandchild"); close(done) }, nil)
			trace = append(trace, "child after Go")
		}, nil)
		trace = append(trace, "post after Go")
	})
	<-done
	want := "child,child after Go,post after Go,grandchild"
	if got := strings.Join(trace, ","); got != want {
		t.Fatalf("order %s, want %s", got, want)
	}
}

// TestLoopCloseReleasesDescriptors: closing a private loop releases its
// descriptors.
func TestLoopCloseReleasesDescriptors(t *testing.T) {
	count := func() int {
		ents, err := os.ReadDir("/proc/self/fd")
		if err != nil {
			t.Fatal(err)
		}
		return len(ents)
	}
	before := count()
	for range 5 {
		l, err := NewLoop()
		if err != nil {
			t.Fatal(err)
		}
		l.Run(func(co *Co) { RunInWorker(co, func() {}) })
		l.Close()
	}
	if after := count(); after > before {
		t.Fatalf("%d descriptors before, %d after", before, after)
	}
}
