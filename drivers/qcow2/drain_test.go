package qcow2

import (
	"testing"
	"time"

	"imgfuse/coroutine"
)

// TestDrainInPlace: a discard holding the metadata lock waits for every
// in-place write already mapped, and only for those.
func TestDrainInPlace(t *testing.T) {
	for _, writers := range []int{0, 1, 3} {
		img := &image{}
		img.inPlace.Add(int64(writers))
		drained := make(chan struct{})
		go coroutine.Run(func(co *coroutine.Co) {
			img.mu.Lock(co)
			img.drainInPlaceLocked(co)
			img.mu.Unlock(co)
			close(drained)
		})
		for i := 0; i < writers; i++ {
			select {
			case <-drained:
				t.Fatalf("%d writers: drained with %d still writing", writers, writers-i)
			case <-time.After(20 * time.Millisecond):
			}
			img.inPlaceDone()
		}
		select {
		case <-drained:
		case <-time.After(5 * time.Second):
			t.Fatalf("%d writers: not drained after the last write ended", writers)
		}
		if n := img.inPlace.Load(); n != 0 {
			t.Fatalf("%d writers: inPlace = %d after draining", writers, n)
		}
	}
}
