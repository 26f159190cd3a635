package remote

import (
	"context"
	"errors"
	"sync"
	"sync/atomic"
	"time"
)

// Object is one remote object, opened at one version: the source it is
// read from and its cache entry. Fill makes ranges of the entry's data
// file present; the image drivers then read that file through aio.
//
// What a request fetches depends on the reader: a random reader gets the
// blocks (4 KiB) it reads, and no more, so random reads transfer about
// what they read; a sequential reader gets whole chunks (1 MiB) and,
// ahead of it, a readahead window that doubles while it stays sequential.
type Object struct {
	url string
	v   version
	src source
	cfg *Config
	c   *entry
	// stored, if not nil, is told of every block range stored (Objects
	// keeps the cache within Config.Max with it).
	stored func(n int64)

	// sem bounds the requests in flight.
	sem chan struct{}

	mu sync.Mutex
	// inflight merges requests for one block: the fetch running for
	// it, which later callers wait for. Protected by mu.
	inflight map[int64]*call
	// next is where a sequential reader's next read starts; streak
	// how many reads in a row followed the one before. Protected by mu.
	next   int64
	streak int64
	// changed is set for good once the server says the object is no
	// longer the version opened. Protected by mu.
	changed error

	fetched   atomic.Int64 // bytes transferred
	requests  atomic.Int64 // ranged GETs that returned data
	hits      atomic.Int64 // blocks a read found in the cache
	misses    atomic.Int64 // blocks a read had to fetch (or wait for)
	lastErr   atomic.Pointer[errorAt]
	prefetch  atomic.Int64 // 0 while prefetching, 1 once done or failed, -1: no prefetch
	prefetchE atomic.Pointer[errorAt]
}

type errorAt struct {
	At  time.Time
	Err string
}

type call struct {
	done chan struct{}
	err  error
}

// openObject opens url: one request that learns its version (or
// revalidates the cached one), then its cache entry.
func openObject(url string, cfg *Config) (*Object, error) {
	src, err := newSource(url, cfg)
	if err != nil {
		return nil, err
	}
	var cached *version
	if m := loadMeta(entryDir(cfg.Dir, url)); m != nil && m.URL == url && m.Block == cfg.Block {
		cached = &m.Version
	}
	var v version
	var head []byte
	err = retry(cfg, func(ctx context.Context) error {
		var err error
		v, head, err = src.open(ctx, cached)
		return err
	})
	if err != nil {
		return nil, err
	}
	if v.Size > MaxSize {
		// The cache's sparse file must hold it, and its block bitmaps
		// stay in memory.
		return nil, errorf("open", url, ErrServer, "the object is %d bytes, more than imgfuse reads (%d)", v.Size, int64(MaxSize))
	}
	c, err := openEntry(cfg.Dir, url, v, cfg.Block)
	if err != nil {
		return nil, &Error{Op: "open", URL: url, Kind: ErrCache, Cause: err.Error()}
	}
	o := &Object{url: url, v: v, src: src, cfg: cfg, c: c, sem: make(chan struct{}, cfg.Parallel),
		inflight: map[int64]*call{}}
	o.prefetch.Store(-1)
	// The open's answer carried the first chunk (or the whole of a small
	// object): keep it rather than fetch it again.
	if head != nil && int64(len(head)) == min(cfg.Chunk, v.Size) && !c.hasAll(o.blocks(0, int64(len(head)))) {
		if err := c.store(0, head); err != nil {
			c.close()
			return nil, &Error{Op: "open", URL: url, Kind: ErrCache, Cause: err.Error()}
		}
		o.fetched.Add(int64(len(head)))
		o.requests.Add(1)
	}
	return o, nil
}

// blocks returns the blocks [b0, b1) that hold bytes [off, off+n), n > 0.
func (o *Object) blocks(off, n int64) (b0, b1 int64) {
	return off / o.cfg.Block, (off+n-1)/o.cfg.Block + 1
}

// retry runs fn with the request timeout until it succeeds, fails for good
// or has been tried cfg.Retries+1 times, with doubling pauses between.
func retry(cfg *Config, fn func(ctx context.Context) error) error {
	pause := cfg.Backoff
	for attempt := 0; ; attempt++ {
		ctx, cancel := context.WithTimeout(context.Background(), cfg.Timeout)
		err := fn(ctx)
		cancel()
		var re *Error
		if err == nil || attempt >= cfg.Retries || !errors.As(err, &re) || !re.transient() {
			return err
		}
		time.Sleep(pause)
		pause *= 2
	}
}

// URL returns the object's URL.
func (o *Object) URL() string { return o.url }

// Size returns the object's size.
func (o *Object) Size() int64 { return o.v.Size }

// Path returns the local file that holds the object's bytes where present.
func (o *Object) Path() string { return o.c.data.Name() }

// clip returns the part of [off, off+n) inside the object.
func (o *Object) clip(off, n int64) (int64, int64) {
	off = max(off, 0)
	return off, max(0, min(n, o.v.Size-off))
}

// Fill makes [off, off+n) present in the local file, fetching what is
// missing (a block another caller is fetching is waited for, not fetched
// twice), and starts readahead for a sequential reader. It blocks. Bytes
// past the object's end need nothing.
func (o *Object) Fill(off, n int64) error {
	off, n = o.clip(off, n)
	if n == 0 {
		return nil
	}
	b0, b1 := o.blocks(off, n)
	from, to := b0, b1
	if ahead := o.readahead(off, n); ahead > 0 {
		// Sequential: whole chunks, and the window past them.
		cb := o.cfg.Chunk / o.cfg.Block
		from = b0 / cb * cb
		to = min((b1+cb-1)/cb*cb+ahead*cb, o.c.nblocks)
	}
	var err error
	for _, c := range o.plan(b0, b1, from, to) {
		<-c.done
		if c.err != nil && err == nil {
			err = c.err
		}
	}
	return err
}

// Present reports whether [off, off+n) is in the cache, without blocking;
// if so it counts the hits, and a sequential reader's readahead goes on
// as Fill's would.
func (o *Object) Present(off, n int64) bool {
	off, n = o.clip(off, n)
	if n == 0 {
		return true
	}
	b0, b1 := o.blocks(off, n)
	if !o.c.hasAll(b0, b1) {
		return false
	}
	o.hits.Add(b1 - b0)
	if ahead := o.readahead(off, n); ahead > 0 {
		cb := o.cfg.Chunk / o.cfg.Block
		o.plan(b1, b1, b1, min((b1+cb-1)/cb*cb+ahead*cb, o.c.nblocks))
	}
	return true
}

// Settled reports whether [off, off+n) is present and on disk: a direct
// read of it then waits for no writeback (aio.SettledFiller). Blocks
// stored but not yet synced sit dirty in the page cache, where a buffered
// read copies them.
func (o *Object) Settled(off, n int64) bool {
	off, n = o.clip(off, n)
	if n == 0 {
		return true
	}
	b0, b1 := o.blocks(off, n)
	return o.c.allDurable(b0, b1)
}

// plan starts the fetches of the missing blocks of [from, to) that are not
// in flight, in requests of at most a chunk that do not cross a chunk
// boundary, and returns what a reader of [b0, b1) must wait for: the
// fetches, new or in flight, of its missing blocks. It counts the reader's
// hits and misses.
func (o *Object) plan(b0, b1, from, to int64) []*call {
	cb := o.cfg.Chunk / o.cfg.Block
	var waits []*call
	type run struct {
		b0, b1 int64
		c      *call
	}
	var runs []run
	var hits, misses int64
	o.mu.Lock()
	o.c.mu.Lock()
	for b := from; b < to; b++ {
		needed := b >= b0 && b < b1
		if bit(o.c.present, b) {
			if needed {
				hits++
			}
			continue
		}
		if needed {
			misses++
		}
		if c, ok := o.inflight[b]; ok {
			if needed && (len(waits) == 0 || waits[len(waits)-1] != c) {
				waits = append(waits, c)
			}
			continue
		}
		if n := len(runs); n > 0 && runs[n-1].b1 == b && b%cb != 0 {
			runs[n-1].b1++
		} else {
			runs = append(runs, run{b0: b, b1: b + 1, c: &call{done: make(chan struct{})}})
		}
		r := &runs[len(runs)-1]
		o.inflight[b] = r.c
		if needed && (len(waits) == 0 || waits[len(waits)-1] != r.c) {
			waits = append(waits, r.c)
		}
	}
	o.c.mu.Unlock()
	changed := o.changed
	if changed != nil {
		for _, r := range runs {
			for b := r.b0; b < r.b1; b++ {
				delete(o.inflight, b)
			}
		}
	}
	o.mu.Unlock()
	o.hits.Add(hits)
	o.misses.Add(misses)
	for _, r := range runs {
		if changed != nil {
			r.c.err = changed
			close(r.c.done)
			continue
		}
		go func() {
			r.c.err = o.fetch(r.b0, r.b1)
			o.mu.Lock()
			for b := r.b0; b < r.b1; b++ {
				delete(o.inflight, b)
			}
			o.mu.Unlock()
			close(r.c.done)
		}()
	}
	return waits
}

// nearBytes is how far from where the last read ended a read may start
// and still follow it: the kernel sends a sequential reader's requests
// (128 KiB–1 MiB) a few at a time, from several threads, not quite in
// order.
const nearBytes = 256 << 10

// readahead returns how many chunks past this read to fetch: none for a
// random reader; for a reader whose last reads followed each other (two
// in a row at least: a random reader lands near its last read now and
// then), a window that doubles up to cfg.Readahead.
func (o *Object) readahead(off, n int64) int64 {
	o.mu.Lock()
	defer o.mu.Unlock()
	switch {
	case o.next > 0 && off+n <= o.next && off >= o.next-2*o.cfg.Chunk:
		// Behind the stream's front, as the first of a batch of
		// requests sent together may arrive last: neither
		// sequential nor random.
	case o.next > 0 && off >= o.next-nearBytes && off <= o.next+nearBytes:
		o.streak++
		o.next = max(o.next, off+n)
	default:
		o.streak = 0
		o.next = off + n
	}
	if o.streak < 2 {
		return 0
	}
	return min(int64(1)<<min(o.streak-2, 30), o.cfg.Readahead)
}

// fetch transfers blocks [b0, b1) and stores them.
func (o *Object) fetch(b0, b1 int64) error {
	o.sem <- struct{}{}
	defer func() { <-o.sem }()
	off := b0 * o.cfg.Block
	n := int(min(b1*o.cfg.Block, o.v.Size) - off)
	var p []byte
	err := retry(o.cfg, func(ctx context.Context) error {
		var err error
		p, err = o.src.read(ctx, o.v, off, n)
		return err
	})
	if err != nil {
		if errors.Is(err, ErrChanged) {
			o.mu.Lock()
			o.changed = err
			o.mu.Unlock()
		}
		o.noteErr(err)
		return err
	}
	o.fetched.Add(int64(n))
	o.requests.Add(1)
	if err := o.c.store(b0, p); err != nil {
		e := &Error{Op: "read", URL: o.url, Kind: ErrCache, Cause: err.Error()}
		o.noteErr(e)
		return e
	}
	if o.stored != nil {
		o.stored(int64(n))
	}
	return nil
}

func (o *Object) noteErr(err error) {
	o.lastErr.Store(&errorAt{At: time.Now(), Err: err.Error()})
}

// Prefetch fetches every block not yet present, in order, a chunk per
// request and a few requests at a time, in the background; Stats reports
// its progress.
func (o *Object) Prefetch() {
	if !o.prefetch.CompareAndSwap(-1, 0) {
		return
	}
	go func() {
		defer o.prefetch.Store(1)
		step := o.cfg.Chunk / o.cfg.Block * int64(max(1, o.cfg.Parallel/2))
		for b := int64(0); b < o.c.nblocks; b += step {
			end := min(b+step, o.c.nblocks)
			for _, c := range o.plan(b, end, b, end) {
				<-c.done
				if c.err != nil {
					o.prefetchE.Store(&errorAt{At: time.Now(), Err: c.err.Error()})
					return
				}
			}
		}
	}()
}

// Stats is what status shows of one object.
type Stats struct {
	URL          string     `json:"url"`
	Size         int64      `json:"size"`
	ETag         string     `json:"etag,omitempty"`
	Cached       int64      `json:"cached"` // bytes present in the cache
	Fetched      int64      `json:"fetched"`
	Requests     int64      `json:"requests"`
	CacheHits    int64      `json:"cache-hits"`
	CacheMisses  int64      `json:"cache-misses"`
	LastError    string     `json:"last-error,omitempty"`
	LastErrorAt  *time.Time `json:"last-error-at,omitempty"`
	Prefetch     string     `json:"prefetch,omitempty"` // "", "running", "done", "failed: ..."
	PrefetchDone int64      `json:"prefetch-done"`      // bytes present, while prefetching
}

// Stats returns the object's counters.
func (o *Object) Stats() Stats {
	s := Stats{URL: o.url, Size: o.v.Size, ETag: o.v.ETag, Cached: min(o.c.count()*o.cfg.Block, o.v.Size),
		Fetched: o.fetched.Load(), Requests: o.requests.Load(), CacheHits: o.hits.Load(), CacheMisses: o.misses.Load()}
	if e := o.lastErr.Load(); e != nil {
		s.LastError = e.Err
		at := e.At
		s.LastErrorAt = &at
	}
	if o.prefetch.Load() >= 0 {
		s.PrefetchDone = s.Cached
		switch {
		case o.prefetchE.Load() != nil:
			s.Prefetch = "failed: " + o.prefetchE.Load().Err
		case s.Cached >= o.v.Size:
			s.Prefetch = "done"
		default:
			s.Prefetch = "running"
		}
	}
	return s
}

// Close closes the object's cache files.
func (o *Object) Close() { o.c.close() }
