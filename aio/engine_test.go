package aio

import (
	"bytes"
	"errors"
	"fmt"
	"math/rand/v2"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"imgfuse/coroutine"
)

// TestSubmitErrors injects io_submit failures: EAGAIN with nothing in
// flight (retried after a pause), partial acceptance (the rest resubmitted)
// and an error for one iocb (only that request fails).
func TestSubmitErrors(t *testing.T) {
	d := directDir(t)
	r := rand.New(rand.NewPCG(8, 9))
	const blocks = 64
	data := randBytes(r, blocks*4096)
	f := openCase(t, engineCase{dir: d, wantDirect: true}, createFile(t, d, data))
	e := f.eng

	const poisonOff = 13 * 4096
	var mu sync.Mutex
	calls, eagains, partials := 0, 0, 0
	inject := func(ctx aioContext, cbs []*iocb) (int, error) {
		mu.Lock()
		calls++
		c := calls
		mu.Unlock()
		switch {
		case c <= 3:
			mu.Lock()
			eagains++
			mu.Unlock()
			return 0, unix.EAGAIN
		case cbs[0].offset == poisonOff:
			return 0, unix.EINVAL
		case len(cbs) > 1 && c%2 == 0:
			// Accept a prefix, but never past the poisoned one so
			// that it is always reported first.
			k := 1
			mu.Lock()
			partials++
			mu.Unlock()
			return ioSubmit(ctx, cbs[:k])
		}
		for i, cb := range cbs {
			if cb.offset == poisonOff {
				return ioSubmit(ctx, cbs[:i])
			}
		}
		return ioSubmit(ctx, cbs)
	}
	e.mu.Lock()
	e.submitFn = inject
	eagainBefore := e.stats.eagain
	e.mu.Unlock()
	defer func() {
		e.mu.Lock()
		e.submitFn = ioSubmit
		e.mu.Unlock()
	}()

	var wg sync.WaitGroup
	errs := make([]error, blocks)
	bufs := make([][]byte, blocks)
	start := make(chan struct{})
	for i := 0; i < blocks; i++ {
		bufs[i] = AlignedBuffer(4096)
		wg.Add(1)
		go func() {
			defer wg.Done()
			<-start
			coroutine.Run(func(co *coroutine.Co) { errs[i] = f.PreadCo(co, bufs[i], int64(i)*4096) })
		}()
	}
	close(start)
	wg.Wait()
	for i := 0; i < blocks; i++ {
		if i*4096 == poisonOff {
			if !errors.Is(errs[i], unix.EINVAL) {
				t.Errorf("poisoned request: err = %v, want EINVAL", errs[i])
			}
			continue
		}
		if errs[i] != nil {
			t.Errorf("block %d: %v", i, errs[i])
		} else if !bytes.Equal(bufs[i], data[i*4096:(i+1)*4096]) {
			t.Errorf("block %d: wrong data", i)
		}
	}
	st := e.snapshotStats()
	t.Logf("calls %d, injected EAGAIN %d, partial %d, engine saw EAGAIN %d",
		calls, eagains, partials, st.eagain-eagainBefore)
	if st.eagain-eagainBefore < 3 {
		t.Errorf("engine counted %d EAGAIN, want >= 3", st.eagain-eagainBefore)
	}
}

// TestLeaderHandOver drives the engine through many changes between one
// request in flight (a leader reaping for itself) and several (the reaper),
// from coroutines and plain goroutines at once, and checks every read's
// data and that both paths were taken. A leader that gave up the lead while
// still using the leader's event arrays, or a completion lost between
// leader and reaper, fails it (a wrong byte, a nil dereference, or a hang).
func TestLeaderHandOver(t *testing.T) {
	d := directDir(t)
	const blocks = 256
	r := rand.New(rand.NewPCG(21, 22))
	data := randBytes(r, blocks*4096)
	f := openCase(t, engineCase{dir: d, wantDirect: true}, createFile(t, d, data))
	before := f.eng.snapshotStats()
	var wg sync.WaitGroup
	errs := make(chan error, 8)
	deadline := time.Now().Add(2 * time.Second)
	for g := 0; g < 6; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			rr := rand.New(rand.NewPCG(uint64(g), 23))
			buf := AlignedBuffer(4096)
			for time.Now().Before(deadline) {
				// Bursts and pauses, so the engine often empties.
				if rr.IntN(4) == 0 {
					time.Sleep(time.Duration(rr.IntN(200)) * time.Microsecond)
				}
				b := rr.IntN(blocks)
				var err error
				if g%2 == 0 {
					coroutine.Run(func(co *coroutine.Co) { err = f.PreadCo(co, buf, int64(b)*4096) })
				} else {
					err = f.Pread(buf, int64(b)*4096)
				}
				if err == nil && !bytes.Equal(buf, data[b*4096:(b+1)*4096]) {
					err = fmt.Errorf("block %d: wrong data", b)
				}
				if err != nil {
					errs <- err
					return
				}
			}
		}()
	}
	finished := make(chan struct{})
	go func() { wg.Wait(); close(finished) }()
	select {
	case <-finished:
	case <-time.After(time.Minute):
		t.Fatal("readers still waiting a minute after the deadline: a completion was lost")
	}
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	after := f.eng.snapshotStats()
	leads, wakeups := after.leads-before.leads, after.reaperWakeup-before.reaperWakeup
	t.Logf("%d requests led, %d reaper wake-ups", leads, wakeups)
	if leads == 0 || wakeups == 0 {
		t.Errorf("leads %d, reaper wake-ups %d: want both paths taken", leads, wakeups)
	}
}

// TestReapAgain: a completion that arrives after a reapAll's last
// io_getevents call, and whose eventfd signal the reaper goroutine
// consumes while that reapAll still holds the reaping, must not be lost.
// The hooks hold the reapAll at the end of its pass until the reaper has
// read the signal and found it at work; without the second pass the
// reader below waits for ever (it hung a writable mount: every other
// request queued behind the qcow2 lock its issuer held).
func TestReapAgain(t *testing.T) {
	d := directDir(t)
	data := randBytes(rand.New(rand.NewPCG(31, 32)), 4*4096)
	f := openCase(t, engineCase{dir: d, wantDirect: true}, createFile(t, d, data))
	e := f.eng

	skipped := make(chan struct{}, 16)
	onSkip := func() { skipped <- struct{}{} }
	readDone := make(chan error, 1)
	var once sync.Once
	onPassEnd := func() {
		once.Do(func() {
			// The engine is ours (reaping is set): this read is
			// submitted with the eventfd, not as a leader.
			go func() {
				buf := AlignedBuffer(4096)
				err := f.Pread(buf, 4096)
				if err == nil && !bytes.Equal(buf, data[4096:8192]) {
					err = errors.New("wrong data")
				}
				readDone <- err
			}()
			select {
			case <-skipped:
			case <-time.After(10 * time.Second):
				t.Error("the reaper never woke for the read's completion")
			}
		})
	}
	testHookReapSkipped.Store(&onSkip)
	testHookReapPassEnd.Store(&onPassEnd)
	t.Cleanup(func() {
		testHookReapSkipped.Store(nil)
		testHookReapPassEnd.Store(nil)
	})

	e.reapAll()
	select {
	case err := <-readDone:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(10 * time.Second):
		// Reap it now, so that closing the file does not wait for
		// ever, and fail.
		e.reapAll()
		<-readDone
		t.Fatal("the read's completion was lost: its signal was consumed while another reapAll held the reaping")
	}
}
