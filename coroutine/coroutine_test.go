package coroutine

import (
	"fmt"
	"runtime"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"
)

// runNew is Run for a New coroutine: the driver loop a caller of Enter
// writes.
func runNew(fn func(*Co)) {
	co := New(fn)
	for !co.Enter() {
		co.WaitWake()
	}
}

// runners are the two kinds of coroutine; behaviour tests run with both.
var runners = []struct {
	name string
	run  func(func(*Co))
}{{"Run", Run}, {"New", runNew}}

// TestEnterYieldTerminate drives a coroutine by hand and checks that each
// Enter runs exactly up to the next Yield.
func TestEnterYieldTerminate(t *testing.T) {
	var trace []string
	co := New(func(co *Co) {
		trace = append(trace, "a")
		co.Yield()
		trace = append(trace, "b")
		co.Yield()
		trace = append(trace, "c")
	})
	if len(trace) != 0 {
		t.Fatal("New ran the function")
	}
	for i, want := range [][]string{{"a"}, {"a", "b"}, {"a", "b", "c"}} {
		terminated := co.Enter()
		if !slices.Equal(trace, want) {
			t.Fatalf("after Enter %d: trace %q, want %q", i, trace, want)
		}
		if terminated != (i == 2) {
			t.Fatalf("Enter %d reported terminated=%v", i, terminated)
		}
	}
}

// TestWakeBeforeYield: a Wake that arrives before its Yield, from the
// coroutine itself or from another goroutine, makes the Yield return
// without leaving Run stuck.
func TestWakeBeforeYield(t *testing.T) {
	for _, r := range runners {
		t.Run(r.name, func(t *testing.T) {
			n := 0
			r.run(func(co *Co) {
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
				<-done // the Wake has completed before the Yield starts
				co.Yield()
				n++
			})
			if n != 4 {
				t.Fatalf("%d yields returned, want 4", n)
			}
		})
	}
}

// TestRunRemoteWake: Run drives a coroutine that yields many times, each
// time woken by a different goroutine, sometimes before and sometimes after
// Run has parked waiting for the Wake.
func TestRunRemoteWake(t *testing.T) {
	for _, r := range runners {
		t.Run(r.name, func(t *testing.T) {
			const yields = 200
			var got []int
			r.run(func(co *Co) {
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
		})
	}
}

// TestRunConcurrent: many goroutines each Run coroutines that wait on
// workers; every Run returns having seen all of its own steps.
func TestRunConcurrent(t *testing.T) {
	for _, r := range runners {
		t.Run(r.name, func(t *testing.T) {
			var wg sync.WaitGroup
			for g := range 8 {
				wg.Add(1)
				go func() {
					defer wg.Done()
					for i := range 50 {
						steps := 0
						r.run(func(co *Co) {
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
		})
	}
}

func TestPoolReuse(t *testing.T) {
	// sync.Pool is per-P and, under the race detector, drops a quarter of
	// what it is given, so expect reuse often rather than always.
	t.Run("New", func(t *testing.T) {
		fn := func(*Co) {}
		prev := New(fn)
		prev.Enter()
		reused := 0
		for range 100 {
			co := New(fn)
			if co == prev {
				reused++
			}
			if co.fn == nil || co.tk == nil {
				t.Fatal("New returned a coroutine without function or ticket")
			}
			if !co.Enter() {
				t.Fatal("empty function did not terminate")
			}
			if co.fn != nil || co.tk != nil {
				t.Fatal("pooled coroutine keeps its function or ticket")
			}
			prev = co
		}
		if reused < 50 {
			t.Fatalf("pool reused a coroutine %d times out of 100", reused)
		}
	})
	t.Run("Run", func(t *testing.T) {
		var prev, cur *Co
		reused := 0
		for range 100 {
			Run(func(co *Co) {
				cur = co
				// A stray Wake must not leak into the next user.
				co.Wake()
			})
			if cur == prev {
				reused++
			}
			prev = cur
			Run(func(co *Co) {
				if co.wake.Load() != wakeIdle {
					t.Fatal("pooled coroutine kept a Wake")
				}
			})
		}
		if reused < 25 {
			t.Fatalf("pool reused a coroutine %d times out of 100", reused)
		}
	})
}

// TestPoolTrimmedByGC: idle pooled coroutines are goroutines; once the pool
// drops them at GC, their goroutines must end rather than leak.
func TestPoolTrimmedByGC(t *testing.T) {
	const n = 200
	cos := make([]*Co, n)
	for i := range cos {
		cos[i] = New(func(co *Co) { co.Yield() })
		cos[i].Enter()
	}
	// Each live coroutine is a goroutine (some may come from the pool).
	alive := runtime.NumGoroutine()
	if alive < n {
		t.Fatalf("%d goroutines with %d coroutines alive", alive, n)
	}
	for _, co := range cos {
		if !co.Enter() {
			t.Fatal("coroutine did not terminate")
		}
	}
	// All n are now idle in the pool; after two GCs the pool has
	// dropped them, and their tickets' cleanups stop the goroutines.
	deadline := time.Now().Add(5 * time.Second)
	for runtime.NumGoroutine() > alive-n*9/10 {
		if time.Now().After(deadline) {
			t.Fatalf("%d goroutines after GC, %d with the coroutines alive: pooled coroutines leak",
				runtime.NumGoroutine(), alive)
		}
		runtime.GC()
		time.Sleep(time.Millisecond)
	}
}

// recoverString runs fn and returns what it panicked with, as a string.
func recoverString(fn func()) (msg string) {
	defer func() {
		if r := recover(); r != nil {
			msg = fmt.Sprint(r)
		}
	}()
	fn()
	return ""
}

func TestPanicPropagates(t *testing.T) {
	var m CoMutex
	for _, tc := range []struct {
		name string
		run  func(fn func(*Co))
		fn   func(*Co)
		want string
	}{
		{"Run/panic", Run, func(*Co) { panic("boom") }, "boom"},
		{"Run/panic after yield", Run, func(co *Co) { co.Wake(); co.Yield(); panic("late") }, "late"},
		{"Enter/panic", func(fn func(*Co)) { New(fn).Enter() }, func(*Co) { panic("boom") }, "boom"},
		{"Run/lock held", Run, func(co *Co) { m.Lock(co) }, "terminated holding 1 CoMutex"},
		{"Enter/lock held", func(fn func(*Co)) {
			co := New(fn)
			for !co.Enter() {
				co.WaitWake()
			}
		}, func(co *Co) {
			var m2 CoMutex
			m2.Lock(co)
			co.Wake()
			co.Yield()
		}, "terminated holding 1 CoMutex"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := recoverString(func() { tc.run(tc.fn) })
			if !strings.Contains(got, tc.want) {
				t.Fatalf("panic %q, want one containing %q", got, tc.want)
			}
			// The package still works after a dead coroutine.
			ok := false
			Run(func(*Co) { ok = true })
			if !ok {
				t.Fatal("Run after a panic did not run")
			}
		})
	}
}

func TestWakeTwicePanics(t *testing.T) {
	got := recoverString(func() {
		Run(func(co *Co) {
			co.Wake()
			co.Wake()
		})
	})
	if !strings.Contains(got, "already woken") {
		t.Fatalf("double Wake: panic %q", got)
	}
}

// TestRunInWorker: the coroutine is suspended, and its driver free, while
// the worker function blocks; it resumes once the function has returned.
func TestRunInWorker(t *testing.T) {
	release := make(chan struct{})
	started := make(chan struct{})
	result := 0
	co := New(func(co *Co) {
		RunInWorker(co, func() {
			close(started)
			<-release
			result = 42
		})
		if result != 42 {
			panic("RunInWorker returned before its function")
		}
	})
	if co.Enter() {
		t.Fatal("coroutine terminated while its worker was blocked")
	}
	<-started // Enter returned while the worker function is blocked.
	close(release)
	co.WaitWake()
	if !co.Enter() {
		t.Fatal("coroutine did not terminate after its worker")
	}
}

// TestRunInWorkerRunInPlace: a Run coroutine's worker function runs on the
// coroutine's own goroutine (no hand-off), which drives nothing else.
func TestRunInWorkerRunInPlace(t *testing.T) {
	before := runtime.NumGoroutine()
	during := -1
	Run(func(co *Co) {
		RunInWorker(co, func() { during = runtime.NumGoroutine() })
	})
	if during != before {
		t.Errorf("goroutines during the worker function: %d, before: %d (want no new goroutine)", during, before)
	}
}
