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
type Object struct {
	url string
	v   version
	src source
	cfg *Config
	c   *entry
	// stored, if not nil, is told of every chunk stored (Objects
	// keeps the cache within Config.Max with it).
	stored func(n int64)

	// sem bounds the requests in flight.
	sem chan struct{}

	mu sync.Mutex
	// inflight merges requests for one chunk: the fetch running for
	// it, which later callers wait for. Protected by mu.
	inflight map[int64]*call
	// next is where a sequential reader's next read starts; window
	// the readahead (in chunks) that reader has earned. Protected by mu.
	next   int64
	window int64
	// changed is set for good once the server says the object is no
	// longer the version opened. Protected by mu.
	changed error

	fetched   atomic.Int64 // bytes transferred
	requests  atomic.Int64 // ranged GETs that returned data
	hits      atomic.Int64 // chunks a read found in the cache
	misses    atomic.Int64 // chunks a read had to fetch (or wait for)
	lastErr   atomic.Pointer[errorAt]
	prefetch  atomic.Int64 // chunks the prefetch has made present, -1: no prefetch
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
	if m := loadMeta(entryDir(cfg.Dir, url)); m != nil && m.URL == url && m.Chunk == cfg.Chunk {
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
		// The cache's sparse file must hold it, and its chunk map
		// stays in memory.
		return nil, errorf("open", url, ErrServer, "the object is %d bytes, more than imgfuse reads (%d)", v.Size, int64(MaxSize))
	}
	c, err := openEntry(cfg.Dir, url, v, cfg.Chunk)
	if err != nil {
		return nil, &Error{Op: "open", URL: url, Kind: ErrCache, Cause: err.Error()}
	}
	o := &Object{url: url, v: v, src: src, cfg: cfg, c: c, sem: make(chan struct{}, cfg.Parallel),
		inflight: map[int64]*call{}}
	o.prefetch.Store(-1)
	if head != nil {
		// The open's answer carried the first chunk (or the whole of a
		// small object): keep it rather than fetch it again.
		whole := int64(len(head)) == min(cfg.Chunk, v.Size)
		if whole && !c.has(0) {
			if err := c.store(0, head); err != nil {
				c.close()
				return nil, &Error{Op: "open", URL: url, Kind: ErrCache, Cause: err.Error()}
			}
			o.fetched.Add(int64(len(head)))
			o.requests.Add(1)
		}
	}
	return o, nil
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

// Fill makes [off, off+n) present in the local file, fetching the missing
// chunks concurrently (a chunk another caller is fetching is waited for,
// not fetched twice), and starts readahead for a sequential reader. It
// blocks. A range the object does not have is an error.
func (o *Object) Fill(off, n int64) error {
	if n <= 0 {
		return nil
	}
	if off < 0 || off > o.v.Size || n > o.v.Size-off {
		// The drivers read within the file's size; past it is zeros.
		n = max(0, min(n, o.v.Size-off))
		if n == 0 {
			return nil
		}
	}
	first, last := off/o.cfg.Chunk, (off+n-1)/o.cfg.Chunk
	ahead := o.readahead(off, n)
	var calls []*call
	for i := first; i <= last; i++ {
		if o.c.has(i) {
			o.hits.Add(1)
			continue
		}
		o.misses.Add(1)
		calls = append(calls, o.start(i))
	}
	for i := last + 1; i <= last+ahead && i*o.cfg.Chunk < o.v.Size; i++ {
		if !o.c.has(i) {
			o.start(i)
		}
	}
	var err error
	for _, c := range calls {
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
	n = max(0, min(n, o.v.Size-off))
	if n == 0 || off < 0 {
		return true
	}
	first, last := off/o.cfg.Chunk, (off+n-1)/o.cfg.Chunk
	o.c.mu.Lock()
	for i := first; i <= last; i++ {
		if !o.c.present[i] {
			o.c.mu.Unlock()
			return false
		}
	}
	o.c.mu.Unlock()
	o.hits.Add(last - first + 1)
	if ahead := o.readahead(off, n); ahead > 0 {
		for i := last + 1; i <= last+ahead && i*o.cfg.Chunk < o.v.Size; i++ {
			if !o.c.has(i) {
				o.start(i)
			}
		}
	}
	return true
}

// readahead returns how many chunks past this read to fetch: none for a
// random reader, doubling (up to cfg.Readahead) while reads follow each
// other. "Follow" is loose: the kernel's own readahead sends a sequential
// reader's requests a few at a time, from several threads, not quite in
// order, so a read starting within two chunks of where the last one
// ended counts.
func (o *Object) readahead(off, n int64) int64 {
	o.mu.Lock()
	defer o.mu.Unlock()
	near := 2 * o.cfg.Chunk
	if off != 0 && off >= o.next-near && off <= o.next+near {
		o.window = min(max(2*o.window, 1), o.cfg.Readahead)
		o.next = max(o.next, off+n)
	} else {
		o.window = 0
		o.next = off + n
	}
	return o.window
}

// start returns the fetch of chunk i: the one in flight, or a new one.
func (o *Object) start(i int64) *call {
	o.mu.Lock()
	if c, ok := o.inflight[i]; ok {
		o.mu.Unlock()
		return c
	}
	c := &call{done: make(chan struct{})}
	if o.changed != nil {
		c.err = o.changed
		close(c.done)
		o.mu.Unlock()
		return c
	}
	o.inflight[i] = c
	o.mu.Unlock()
	go func() {
		c.err = o.fetch(i)
		o.mu.Lock()
		delete(o.inflight, i)
		o.mu.Unlock()
		close(c.done)
	}()
	return c
}

// fetch transfers chunk i and stores it.
func (o *Object) fetch(i int64) error {
	if o.c.has(i) {
		return nil // stored while this call was being set up
	}
	o.sem <- struct{}{}
	defer func() { <-o.sem }()
	off := i * o.cfg.Chunk
	n := int(min(o.cfg.Chunk, o.v.Size-off))
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
	if err := o.c.store(i, p); err != nil {
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

// Prefetch fetches every chunk not yet present, in order, a few at a time,
// in the background; Stats reports its progress.
func (o *Object) Prefetch() {
	o.mu.Lock()
	if o.prefetch.Load() >= 0 {
		o.mu.Unlock()
		return
	}
	o.prefetch.Store(0)
	o.mu.Unlock()
	go func() {
		n := (o.v.Size + o.cfg.Chunk - 1) / o.cfg.Chunk
		window := int64(max(1, o.cfg.Parallel/2))
		for i := int64(0); i < n; i += window {
			var calls []*call
			for j := i; j < min(i+window, n); j++ {
				calls = append(calls, o.start(j))
			}
			for _, c := range calls {
				<-c.done
				if c.err != nil {
					o.prefetchE.Store(&errorAt{At: time.Now(), Err: c.err.Error()})
					return
				}
			}
			o.prefetch.Store(o.c.count())
		}
		o.prefetch.Store(o.c.count())
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
	present := o.c.count()
	s := Stats{URL: o.url, Size: o.v.Size, ETag: o.v.ETag, Cached: min(present*o.cfg.Chunk, o.v.Size),
		Fetched: o.fetched.Load(), Requests: o.requests.Load(), CacheHits: o.hits.Load(), CacheMisses: o.misses.Load()}
	if e := o.lastErr.Load(); e != nil {
		s.LastError = e.Err
		at := e.At
		s.LastErrorAt = &at
	}
	if p := o.prefetch.Load(); p >= 0 {
		s.PrefetchDone = min(p*o.cfg.Chunk, o.v.Size)
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
