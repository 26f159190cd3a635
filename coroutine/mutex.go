package coroutine

import "sync"

// CoMutex is a mutual-exclusion lock for coroutines. A coroutine that finds
// it held yields instead of blocking its thread; Unlock hands the lock
// directly to the first waiter (FIFO), so a waiter is never overtaken.
//
// The zero value is an unlocked mutex.
type CoMutex struct {
	mu sync.Mutex
	// holder is the coroutine that holds the lock, nil if none.
	// Protected by mu.
	holder *Co
	// waiters are the coroutines waiting for the lock, oldest first.
	// Protected by mu.
	waiters []*Co
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
	m.waiters = append(m.waiters, co)
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
	if len(m.waiters) == 0 {
		m.holder = nil
		m.mu.Unlock()
		return
	}
	next := m.waiters[0]
	m.waiters[0] = nil
	m.waiters = m.waiters[1:]
	m.holder = next
	m.mu.Unlock()
	next.Wake()
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
// variable for coroutines. The zero value is an empty queue.
type CoQueue struct {
	mu sync.Mutex
	// waiters, oldest first. Protected by mu.
	waiters []*Co
}

// Wait suspends co until Next or RestartAll wakes it. If m is not nil, co
// must hold it; it is released while waiting and re-acquired before Wait
// returns.
func (q *CoQueue) Wait(co *Co, m *CoMutex) {
	q.mu.Lock()
	q.waiters = append(q.waiters, co)
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
	if len(q.waiters) == 0 {
		q.mu.Unlock()
		return false
	}
	co := q.waiters[0]
	q.waiters[0] = nil
	q.waiters = q.waiters[1:]
	q.mu.Unlock()
	co.Wake()
	return true
}

// RestartAll wakes every waiter.
func (q *CoQueue) RestartAll() {
	q.mu.Lock()
	ws := q.waiters
	q.waiters = nil
	q.mu.Unlock()
	for _, co := range ws {
		co.Wake()
	}
}

// Empty reports whether no coroutine is waiting.
func (q *CoQueue) Empty() bool {
	q.mu.Lock()
	defer q.mu.Unlock()
	return len(q.waiters) == 0
}
