//go:build !race

package coroutine

import "testing"

// (The race detector allocates on its own, hence the build tag.)

// TestLoopPathAllocatesNothing: the per-request work of a loop (a pooled
// coroutine started with Go, one Yield, its Wake, its end) allocates
// nothing once warm.
func TestLoopPathAllocatesNothing(t *testing.T) {
	l := newLoop(t)
	child := func(co *Co, _ any) {
		co.Wake()
		co.Yield()
	}
	var allocs float64
	l.Run(func(co *Co) {
		allocs = testing.AllocsPerRun(200, func() {
			l.Go(child, nil)
			co.Wake()
			co.Yield()
		})
	})
	if allocs != 0 {
		t.Fatalf("%.1f allocations per request", allocs)
	}
}
