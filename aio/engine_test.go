package aio

import (
	"bytes"
	"errors"
	"math/rand/v2"
	"sync"
	"testing"

	"golang.org/x/sys/unix"

	"imgfuse/coroutine"
)

// testLoop starts a private event loop for one test.
func testLoop(t testing.TB) *coroutine.Loop {
	t.Helper()
	l, err := coroutine.NewLoop()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(l.Close)
	return l
}

// loopEngine returns l's engine, creating it.
func loopEngine(t testing.TB, l *coroutine.Loop) *engine {
	t.Helper()
	var e *engine
	var err error
	l.Run(func(co *coroutine.Co) { e, err = engineOf(co) })
	if err != nil {
		t.Fatal(err)
	}
	return e
}

// stats reads e's counters on its loop.
func stats(e *engine) engineStats {
	var st engineStats
	e.loop.Run(func(*coroutine.Co) { st = e.stats })
	return st
}

// readAll starts one coroutine per block on l, all in one loop iteration
// (so that their iocbs share the iteration's io_submit), each reading its
// block of f into bufs[i], and waits for them.
func readAll(l *coroutine.Loop, f *File, bufs [][]byte) []error {
	errs := make([]error, len(bufs))
	var wg sync.WaitGroup
	wg.Add(len(bufs))
	read := func(co *coroutine.Co, arg any) {
		i := arg.(int)
		errs[i] = f.PreadCo(co, bufs[i], int64(i)*4096)
		wg.Done()
	}
	l.Post(func() {
		for i := range bufs {
			l.Go(read, i)
		}
	})
	wg.Wait()
	return errs
}

func blockBufs(n int) [][]byte {
	bufs := make([][]byte, n)
	for i := range bufs {
		bufs[i] = AlignedBuffer(4096)
	}
	return bufs
}

// TestBatchSubmit: requests issued in one loop iteration go to the kernel
// in one io_submit, and their completions are reaped and delivered.
func TestBatchSubmit(t *testing.T) {
	d := directDir(t)
	const n = 32
	data := randBytes(rand.New(rand.NewPCG(1, 1)), n*4096)
	f := openCase(t, engineCase{dir: d, wantDirect: true}, createFile(t, d, data))
	l := testLoop(t)
	e := loopEngine(t, l)
	before := stats(e)
	readAllCheck(t, l, f, data, n)
	after := stats(e)
	calls, subs := after.submitCalls-before.submitCalls, after.submitted-before.submitted
	if calls != 1 || subs != n {
		t.Fatalf("%d iocbs in %d io_submit calls, want %d in 1", subs, calls, n)
	}
	if r := after.reaped - before.reaped; r != n {
		t.Fatalf("%d completions reaped, want %d", r, n)
	}
}

// TestSubmitErrors injects io_submit failures: EAGAIN with nothing in
// flight (retried after a pause), partial acceptance (the rest resubmitted)
// and an error for one iocb (only that request fails).
func TestSubmitErrors(t *testing.T) {
	d := directDir(t)
	r := rand.New(rand.NewPCG(8, 9))
	const blocks = 64
	data := randBytes(r, blocks*4096)
	f := openCase(t, engineCase{dir: d, wantDirect: true}, createFile(t, d, data))
	l := testLoop(t)
	e := loopEngine(t, l)

	const poisonOff = 13 * 4096
	// inject runs on the loop thread only.
	calls, eagains, partials := 0, 0, 0
	inject := func(ctx aioContext, cbs []*iocb) (int, error) {
		calls++
		switch {
		case calls <= 3:
			eagains++
			return 0, unix.EAGAIN
		case cbs[0].offset == poisonOff:
			return 0, unix.EINVAL
		case len(cbs) > 1 && calls%2 == 0:
			partials++
			return ioSubmit(ctx, cbs[:1])
		}
		for i, cb := range cbs {
			if cb.offset == poisonOff {
				// Accept up to the poisoned one, so that it is
				// reported first in the next call.
				return ioSubmit(ctx, cbs[:i])
			}
		}
		return ioSubmit(ctx, cbs)
	}
	l.Run(func(*coroutine.Co) { e.submitFn = inject })
	eagainBefore := stats(e).eagain

	bufs := blockBufs(blocks)
	errs := readAll(l, f, bufs)
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
	st := stats(e)
	t.Logf("calls %d, injected EAGAIN %d, partial %d", calls, eagains, partials)
	if st.eagain-eagainBefore != 3 || partials == 0 {
		t.Errorf("engine counted %d EAGAIN (want 3), %d partial acceptances (want some)", st.eagain-eagainBefore, partials)
	}
}

// TestBackPressure puts several times maxInflight requests in flight at
// once: they must queue and all complete correctly, never more than the
// bound in the kernel.
func TestBackPressure(t *testing.T) {
	d := directDir(t)
	const n = 4 * maxInflight
	data := randBytes(rand.New(rand.NewPCG(4, 5)), n*4096)
	f := openCase(t, engineCase{dir: d, wantDirect: true}, createFile(t, d, data))
	l := testLoop(t)
	e := loopEngine(t, l)
	readAllCheck(t, l, f, data, n)
	st := stats(e)
	t.Logf("io_submit calls %d for %d iocbs; max queued %d, max in flight %d",
		st.submitCalls, st.submitted, st.maxQueued, st.maxInflight)
	if st.maxInflight != maxInflight {
		t.Errorf("max in flight %d, want exactly the bound %d", st.maxInflight, maxInflight)
	}
	if st.maxQueued != n {
		t.Errorf("max queued %d, want %d", st.maxQueued, n)
	}
}

// TestLoopsHaveTheirOwnContexts: coroutines of two loops read at once, each
// through its own loop's context.
func TestLoopsHaveTheirOwnContexts(t *testing.T) {
	d := directDir(t)
	const n = 16
	data := randBytes(rand.New(rand.NewPCG(6, 7)), n*4096)
	f := openCase(t, engineCase{dir: d, wantDirect: true}, createFile(t, d, data))
	l1, l2 := testLoop(t), testLoop(t)
	e1, e2 := loopEngine(t, l1), loopEngine(t, l2)
	if e1 == e2 || e1.ctx == e2.ctx {
		t.Fatal("two loops share an AIO context")
	}
	var wg sync.WaitGroup
	for _, l := range []*coroutine.Loop{l1, l2} {
		wg.Add(1)
		go func() {
			defer wg.Done()
			bufs := blockBufs(n)
			for i, err := range readAll(l, f, bufs) {
				if err != nil || !bytes.Equal(bufs[i], data[i*4096:(i+1)*4096]) {
					t.Errorf("block %d: %v", i, err)
				}
			}
		}()
	}
	wg.Wait()
	if s1, s2 := stats(e1), stats(e2); s1.submitted != n || s2.submitted != n {
		t.Fatalf("contexts submitted %d and %d, want %d each", s1.submitted, s2.submitted, n)
	}
}

// readAllCheck reads the first n 4 KiB blocks of f at once on l and
// checks each against data.
func readAllCheck(t *testing.T, l *coroutine.Loop, f *File, data []byte, n int) {
	t.Helper()
	bufs := blockBufs(n)
	for i, err := range readAll(l, f, bufs) {
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(bufs[i], data[i*4096:(i+1)*4096]) {
			t.Fatalf("block %d differs", i)
		}
	}
}
