package coroutine

import "sync"

// waitList is a FIFO of suspended coroutines linked through Co.waitNext, so
// queueing never allocates. Protected by the mutex of the CoMutex or CoQueue
// that owns it.
type waitList struct {
	head, tail *Co
}

func (l *waitList) push(co *Co) {
	co.waitNext = nil
	if l.tail == nil {
		l.head = co
	} else {
		l.tail.waitNext = co
	}
	l.tail = co
}

// pop removes and returns the oldest waiter, nil if none.
func (l *waitList) pop() *Co {
	co := l.head
	if co == nil {
		return nil
	}
	l.head = co.waitNext
	if l.head == nil {
		l.tail = nil
	}
	co.waitNext = nil
	return co
}

func (l *waitList) len() int {
	n := 0
	for co := l.head; co != nil; co = co.waitNext {
		n++
	}
	return n
}

// CoMutex is a mutual-exclusion lock for coroutines. A coroutine that finds
// it held yields instead of blocking its thread; Unlock hands the lock
// directly to the first waiter (FIFO), so a waiter is never overtaken, not
// even by a coroutine that calls Lock at the moment of the hand-off.
//
// It may be held across Yields (metadata I/O under the lock is the point).
// Its internal sync.Mutex is a leaf lock held only to update the holder and
// the wait list, never across a Yield or a Wake.
//
// The zero value is an unlocked mutex.
type CoMutex struct {
	mu sync.Mutex
	// holder is the coroutine that holds the lock, nil if none.
	// Protected by mu.
	holder *Co
	// waiters are the coroutines waiting for the lock, oldest first.
	// Protected by mu.
	waiters waitList
}

// Lock acquires m, yielding while another coroutine holds it.
func (m *CoMutex) Lock(co *Co) {
	m.mu.Lock()
	if m.holder == nil {
		m.holder = co
		m.mu.Unlock()
		co.locks++
		return
	}
	if m.holder == co {
		m.mu.Unlock()
		panic("coroutine: CoMutex locked twice by the same coroutine")
	}
	m.waiters.push(co)
	m.mu.Unlock()
	co.Yield() // Unlock made us the holder before waking us.
	co.locks++
}

// TryLock acquires m if it is free and reports whether it did.
func (m *CoMutex) TryLock(co *Co) bool {
	m.mu.Lock()
	defer m.mu.Unlock()
	if m.holder != nil {
		return false
	}
	m.holder = co
	co.locks++
	return true
}

// Unlock releases m, which co must hold, handing it to the oldest waiter.
func (m *CoMutex) Unlock(co *Co) {
	m.mu.Lock()
	if m.holder != co {
		m.mu.Unlock()
		panic("coroutine: CoMutex unlocked by a coroutine that does not hold it")
	}
	co.locks--
	next := m.waiters.pop()
	m.holder = next
	m.mu.Unlock()
	if next != nil {
		next.Wake()
	}
}

// AssertHeld panics unless co holds m. Functions named ...Locked call it on
// entry.
func (m *CoMutex) AssertHeld(co *Co) {
	m.mu.Lock()
	h := m.holder
	m.mu.Unlock()
	if h != co {
		panic("coroutine: CoMutex not held by the calling coroutine")
	}
}

// CoQueue is a FIFO of coroutines waiting for a condition, like a condition
// variable for coroutines. Its internal sync.Mutex is a leaf lock, never held
// across a Yield or a Wake. The zero value is an empty queue.
type CoQueue struct {
	mu sync.Mutex
	// waiters, oldest first. Protected by mu.
	waiters waitList
}

// Wait suspends co until Next or RestartAll wakes it. If m is not nil, co
// must hold it; it is released while waiting and re-acquired before Wait
// returns. As with a condition variable, the caller re-checks its condition
// after Wait: another coroutine may have taken the mutex in between.
//
// co is queued before m is released, so a Next by the coroutine m is handed
// to is never lost.
func (q *CoQueue) Wait(co *Co, m *CoMutex) {
	q.mu.Lock()
	q.waiters.push(co)
	q.mu.Unlock()
	if m != nil {
		m.Unlock(co)
	}
	co.Yield()
	if m != nil {
		m.Lock(co)
	}
}

// Next wakes the oldest waiter and reports whether there was one.
func (q *CoQueue) Next() bool {
	q.mu.Lock()
	co := q.waiters.pop()
	q.mu.Unlock()
	if co == nil {
		return false
	}
	co.Wake()
	return true
}

// RestartAll wakes every waiter, oldest first.
func (q *CoQueue) RestartAll() {
	q.mu.Lock()
	co := q.waiters.head
	q.waiters = waitList{}
	q.mu.Unlock()
	for co != nil {
		// Unlink before Wake: once woken, co may queue somewhere
		// again and reuse waitNext.
		next := co.waitNext
		co.waitNext = nil
		co.Wake()
		co = next
	}
}

// Empty reports whether no coroutine is waiting.
func (q *CoQueue) Empty() bool {
	q.mu.Lock()
	defer q.mu.Unlock()
	return q.waiters.head == nil
}
