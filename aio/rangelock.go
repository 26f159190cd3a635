package aio

import (
	"math"
	"sync"

	"imgfuse/coroutine"
)

// toEOF as the end of a locked range means "and everything after it".
const toEOF = math.MaxInt64

// rangeLock serializes writes through the O_DIRECT engine that touch the
// same alignment blocks, and owns the cached logical file size.
//
// Why: an unaligned write is a read-modify-write of its edge blocks. Two
// such writes to the same block, or an RMW racing an aligned write of that
// block, would each write back the block as they read it and lose the other
// one's bytes. Every direct-engine write therefore holds its aligned range
// exclusively for its whole duration (aligned writes too: they must not slip
// between an RMW's read and its write-back).
//
// A write that reaches past the cached size holds [start, toEOF) instead: it
// may leave the file longer than asked (O_DIRECT writes whole blocks) and
// then truncates it back, so no other write may run past its start until the
// size is right again. Truncate and fallocate hold [start, toEOF) too.
//
// Waiters are woken all at once on every release and retry; contention is
// rare (it needs overlapping writes in flight), so simplicity wins over
// fairness.
type rangeLock struct {
	mu sync.Mutex
	// size is the logical file size as this process made it. Protected by
	// mu; changed only by the holder of a range ending at toEOF.
	size int64
	// held are the ranges locked now. Protected by mu.
	held []lockedRange
	// waiters wait for any release. Protected by mu.
	waiters []*waiter
	// lastID numbers the held ranges. Protected by mu.
	lastID uint64
}

type lockedRange struct {
	start, end int64
	id         uint64
}

// acquire locks [start, end), or [start, toEOF) when end is past the cached
// size or toEnd is set. co may be nil: the wait then blocks the goroutine.
// It returns the lock to release and the size at the moment of locking; if
// the range ends at toEOF, the size cannot change until release.
func (l *rangeLock) acquire(co *coroutine.Co, start, end int64, toEnd bool) (lockedRange, int64) {
	for {
		l.mu.Lock()
		e := end
		if toEnd || e > l.size {
			e = toEOF
		}
		if !l.overlapsLocked(start, e) {
			l.lastID++
			r := lockedRange{start: start, end: e, id: l.lastID}
			l.held = append(l.held, r)
			size := l.size
			l.mu.Unlock()
			return r, size
		}
		w := &waiter{co: co}
		if co == nil {
			w.ch = make(chan struct{}, 1)
		}
		l.waiters = append(l.waiters, w)
		l.mu.Unlock()
		w.wait()
	}
}

func (l *rangeLock) overlapsLocked(start, end int64) bool {
	for _, h := range l.held {
		if start < h.end && h.start < end {
			return true
		}
	}
	return false
}

// release unlocks r. If r ends at toEOF, size becomes the new cached size.
func (l *rangeLock) release(r lockedRange, size int64) {
	l.mu.Lock()
	for i, h := range l.held {
		if h.id == r.id {
			l.held[i] = l.held[len(l.held)-1]
			l.held = l.held[:len(l.held)-1]
			break
		}
	}
	if r.end == toEOF {
		l.size = size
	}
	ws := l.waiters
	l.waiters = nil
	l.mu.Unlock()
	for _, w := range ws {
		w.wake()
	}
}
