package remote

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"log"
	"math/rand"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// server is an HTTP server of one object that counts its answers.
type server struct {
	mu   sync.Mutex
	data []byte
	etag string

	requests atomic.Int64
	ranges   sync.Map // "first-last" -> *atomic.Int64
	// handle, if set, serves instead (it may call serve).
	handle func(w http.ResponseWriter, r *http.Request, s *server)
}

func newServer(t *testing.T, data []byte) (*server, *httptest.Server) {
	s := &server{data: data, etag: `"v1"`}
	ts := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		s.requests.Add(1)
		c, _ := s.ranges.LoadOrStore(r.Header.Get("Range"), new(atomic.Int64))
		c.(*atomic.Int64).Add(1)
		if s.handle != nil {
			s.handle(w, r, s)
			return
		}
		s.serve(w, r)
	}))
	t.Cleanup(ts.Close)
	return s, ts
}

// serve answers as a static file server does: ranges, ETag, If-Match,
// If-None-Match (ServeContent).
func (s *server) serve(w http.ResponseWriter, r *http.Request) {
	s.mu.Lock()
	data, etag := s.data, s.etag
	s.mu.Unlock()
	w.Header().Set("ETag", etag)
	http.ServeContent(w, r, "obj", time.Time{}, bytes.NewReader(data))
}

func (s *server) replace(data []byte, etag string) {
	s.mu.Lock()
	s.data, s.etag = data, etag
	s.mu.Unlock()
}

func testConfig(t *testing.T) Config {
	return Config{Dir: t.TempDir(), Block: 4 << 10, Chunk: 64 << 10, Timeout: 2 * time.Second, Backoff: 10 * time.Millisecond}
}

func randomBytes(n int, seed int64) []byte {
	b := make([]byte, n)
	rand.New(rand.NewSource(seed)).Read(b)
	return b
}

// readBack reads [off, off+n) of the object's local file after Fill.
func readBack(t *testing.T, o *Object, off, n int64) []byte {
	t.Helper()
	if err := o.Fill(off, n); err != nil {
		t.Fatalf("Fill(%d, %d): %v", off, n, err)
	}
	f, err := os.Open(o.Path())
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	p := make([]byte, n)
	if _, err := f.ReadAt(p, off); err != nil {
		t.Fatal(err)
	}
	return p
}

// TestFillReadsRanges: fills bring exactly the object's bytes, and a
// random reader transfers only the blocks it reads (plus the first chunk,
// with the open), in one request per run of blocks within a chunk.
func TestFillReadsRanges(t *testing.T) {
	data := randomBytes(1<<20+12345, 1)
	s, ts := newServer(t, data)
	objs := NewObjects(testConfig(t))
	defer objs.Close()
	o, err := objs.Open(ts.URL + "/disk.img")
	if err != nil {
		t.Fatal(err)
	}
	if o.Size() != int64(len(data)) {
		t.Fatalf("size %d, want %d", o.Size(), len(data))
	}
	for _, r := range [][2]int64{{0, 512}, {300000, 70000}, {int64(len(data)) - 100, 100}, {65535, 2}} {
		if got := readBack(t, o, r[0], r[1]); !bytes.Equal(got, data[r[0]:r[0]+r[1]]) {
			t.Errorf("bytes [%d, +%d) differ", r[0], r[1])
		}
	}
	// The open: chunk 0. [300000, 370000): blocks 73..90, in chunks 4
	// (73..79) and 5 (80..90). The last 100 bytes: blocks 258 and 259,
	// the end. 65535+2: block 15 (cached) and 16.
	const block = 4 << 10
	blocks := func(b0, b1 int64) int64 { return b1*block - b0*block }
	want := int64(64<<10) + blocks(73, 80) + blocks(80, 91) + (int64(len(data)) - 258*block) + blocks(16, 17)
	if n := s.requests.Load(); n != 5 {
		t.Errorf("%d requests, want 5", n)
	}
	st := o.Stats()
	if st.Fetched != want || st.CacheHits != 2 || st.CacheMisses != 18+2+1 {
		t.Errorf("stats %+v; want %d bytes fetched, 2 hits, 21 misses", st, want)
	}
	if !o.Present(0, 512) || !o.Present(300000, 70000) || o.Present(2*64<<10, 10) || o.Present(3*64<<10-10, 20) {
		t.Error("Present disagrees with what was fetched")
	}
	if st = o.Stats(); st.CacheHits != 2+1+18 {
		t.Errorf("cache hits %d, want 21", st.CacheHits)
	}
}

// TestNoRangeRefused: a server that answers a ranged GET with the whole
// object is refused at open, having sent one request.
func TestNoRangeRefused(t *testing.T) {
	s, ts := newServer(t, randomBytes(1<<20, 2))
	s.handle = func(w http.ResponseWriter, r *http.Request, s *server) {
		w.Header().Set("ETag", s.etag)
		w.Write(s.data)
	}
	_, err := NewObjects(testConfig(t)).Open(ts.URL + "/disk.img")
	if !errors.Is(err, ErrNoRange) {
		t.Fatalf("open: %v, want ErrNoRange", err)
	}
	if n := s.requests.Load(); n != 1 {
		t.Errorf("%d requests, want 1", n)
	}
}

// TestOpenErrors: 404, a refused connection and a malformed URL each fail
// the open with their own kind, and one line.
func TestOpenErrors(t *testing.T) {
	_, ts := newServer(t, nil)
	ts.Config.Handler = http.NotFoundHandler()
	closed := httptest.NewServer(http.NotFoundHandler())
	closedURL := closed.URL
	closed.Close()
	tls := httptest.NewUnstartedServer(http.NotFoundHandler()) // its certificate is trusted by nobody here
	tls.Config.ErrorLog = log.New(io.Discard, "", 0)
	tls.StartTLS()
	defer tls.Close()
	for _, c := range []struct {
		url  string
		kind error
	}{
		{ts.URL + "/missing.img", ErrNotFound},
		{closedURL + "/disk.img", ErrRefused},
		{"http://[::1/disk.img", ErrBadURL},
		{"http:///disk.img", ErrBadURL},
		{"s3://bucket", ErrBadURL},
		{tls.URL + "/disk.img", ErrCertificate},
	} {
		cfg := testConfig(t)
		cfg.Retries = 1
		_, err := NewObjects(cfg).Open(c.url)
		if !errors.Is(err, c.kind) || !errors.Is(err, syscallEIO) || strings.Contains(err.Error(), "\n") {
			t.Errorf("open %s: %v, want %v", c.url, err, c.kind)
		}
	}
}

// TestChangedObject: once the object changes on the server, reads of
// chunks not cached fail with ErrChanged (If-Match answered 412), and
// never return new bytes; cached chunks still read the old ones; a new
// open sees the new object whole.
func TestChangedObject(t *testing.T) {
	old := randomBytes(512<<10, 3)
	s, ts := newServer(t, old)
	cfg := testConfig(t)
	objs := NewObjects(cfg)
	o, err := objs.Open(ts.URL + "/disk.img")
	if err != nil {
		t.Fatal(err)
	}
	readBack(t, o, 100<<10, 10)
	s.replace(randomBytes(512<<10, 4), `"v2"`)
	if err := o.Fill(300<<10, 10); !errors.Is(err, ErrChanged) {
		t.Fatalf("fill after the change: %v, want ErrChanged", err)
	}
	if got := readBack(t, o, 100<<10, 10); !bytes.Equal(got, old[100<<10:100<<10+10]) {
		t.Error("a cached chunk changed")
	}
	if st := o.Stats(); !strings.Contains(st.LastError, "changed") {
		t.Errorf("last error %q", st.LastError)
	}
	objs.Close()
	objs2 := NewObjects(cfg)
	defer objs2.Close()
	o2, err := objs2.Open(ts.URL + "/disk.img")
	if err != nil {
		t.Fatal(err)
	}
	s.mu.Lock()
	now := s.data
	s.mu.Unlock()
	if got := readBack(t, o2, 0, int64(len(now))); !bytes.Equal(got, now) {
		t.Error("a new open mixes old and new bytes")
	}
}

// TestTruncatedBodyRetried: an answer cut short is retried, and the chunk
// then holds the right bytes.
func TestTruncatedBodyRetried(t *testing.T) {
	data := randomBytes(256<<10, 5)
	s, ts := newServer(t, data)
	var cut atomic.Int64
	s.handle = func(w http.ResponseWriter, r *http.Request, s *server) {
		if r.Header.Get("Range") == fmt.Sprintf("bytes=%d-%d", 128<<10, 192<<10-1) && cut.Add(1) <= 2 {
			w.Header().Set("ETag", s.etag)
			w.Header().Set("Content-Range", fmt.Sprintf("bytes %d-%d/%d", 128<<10, 192<<10-1, len(s.data)))
			w.Header().Set("Content-Length", fmt.Sprint(64<<10))
			w.WriteHeader(http.StatusPartialContent)
			w.Write(s.data[128<<10 : 130<<10])
			panic(http.ErrAbortHandler)
		}
		s.serve(w, r)
	}
	o, err := NewObjects(testConfig(t)).Open(ts.URL + "/disk.img")
	if err != nil {
		t.Fatal(err)
	}
	if got := readBack(t, o, 128<<10, 64<<10); !bytes.Equal(got, data[128<<10:192<<10]) {
		t.Error("chunk differs after retries")
	}
	if cut.Load() != 3 {
		t.Errorf("chunk requested %d times, want 3 (two cut short)", cut.Load())
	}
}

// TestSlowServerTimesOut: a server that stops answering fails the read
// with ErrTimeout within the bounded time (timeout × tries + pauses).
func TestSlowServerTimesOut(t *testing.T) {
	s, ts := newServer(t, randomBytes(256<<10, 6))
	var slow atomic.Bool
	release := make(chan struct{})
	defer close(release)
	s.handle = func(w http.ResponseWriter, r *http.Request, s *server) {
		if slow.Load() {
			select {
			case <-release:
			case <-r.Context().Done():
			}
			return
		}
		s.serve(w, r)
	}
	cfg := testConfig(t)
	cfg.Timeout, cfg.Retries = 200*time.Millisecond, 2
	o, err := NewObjects(cfg).Open(ts.URL + "/disk.img")
	if err != nil {
		t.Fatal(err)
	}
	slow.Store(true)
	start := time.Now()
	err = o.Fill(128<<10, 10)
	if !errors.Is(err, ErrTimeout) {
		t.Errorf("fill from a hung server: %v, want ErrTimeout", err)
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Errorf("fill took %v", d)
	}
	slow.Store(false)
	if err := o.Fill(128<<10, 10); err != nil {
		t.Errorf("fill once the server answers again: %v", err)
	}
}

// TestDuplicateRequestsMerged: concurrent reads of one chunk make one
// request.
func TestDuplicateRequestsMerged(t *testing.T) {
	s, ts := newServer(t, randomBytes(256<<10, 7))
	s.handle = func(w http.ResponseWriter, r *http.Request, s *server) {
		time.Sleep(50 * time.Millisecond)
		s.serve(w, r)
	}
	o, err := NewObjects(testConfig(t)).Open(ts.URL + "/disk.img")
	if err != nil {
		t.Fatal(err)
	}
	var wg sync.WaitGroup
	for i := range 16 {
		wg.Add(1)
		go func() {
			defer wg.Done()
			if err := o.Fill(int64(64<<10+i*100), 50); err != nil {
				t.Error(err)
			}
		}()
	}
	wg.Wait()
	asked := 0
	s.ranges.Range(func(k, v any) bool {
		if v.(*atomic.Int64).Load() != 1 {
			t.Errorf("%s requested %d times", k, v.(*atomic.Int64).Load())
		}
		if k != "bytes=0-65535" {
			asked++
		}
		return true
	})
	if asked == 0 {
		t.Error("no request after the open")
	}
}

// TestCacheCrashSafety: a chunk whose bytes are in the data file but not
// marked in the map (a crash between the two) is fetched again, and a
// second open of an unchanged object transfers nothing but a
// revalidation (304).
func TestCacheCrashSafety(t *testing.T) {
	data := randomBytes(512<<10, 8)
	s, ts := newServer(t, data)
	cfg := testConfig(t)
	url := ts.URL + "/disk.img"
	objs := NewObjects(cfg)
	o, err := objs.Open(url)
	if err != nil {
		t.Fatal(err)
	}
	readBack(t, o, 0, int64(len(data)))
	objs.Close()
	// Chunk 3 (blocks 48..63: map bytes 6 and 7) half written, its
	// marks lost.
	dir := entryDir(cfg.Dir, url)
	m, err := os.OpenFile(filepath.Join(dir, mapName), os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	m.WriteAt([]byte{0, 0}, 6)
	m.Close()
	d, err := os.OpenFile(filepath.Join(dir, dataName), os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	d.WriteAt(bytes.Repeat([]byte{0xee}, 1000), 3*64<<10+5)
	d.Close()

	before := s.requests.Load()
	objs2 := NewObjects(cfg)
	defer objs2.Close()
	o2, err := objs2.Open(url)
	if err != nil {
		t.Fatal(err)
	}
	if n := s.requests.Load() - before; n != 1 {
		t.Errorf("reopen made %d requests, want 1 (the revalidation)", n)
	}
	if got := readBack(t, o2, 0, int64(len(data))); !bytes.Equal(got, data) {
		t.Error("a chunk written but not marked was served")
	}
	if n := s.requests.Load() - before; n != 2 {
		t.Errorf("%d requests, want 2 (the revalidation, chunk 3)", n)
	}
	if st := o2.Stats(); st.Fetched != 64<<10 {
		t.Errorf("fetched %d bytes, want one chunk", st.Fetched)
	}
}

// TestReadahead: a sequential reader gets chunks fetched ahead of it; a
// random one does not.
func TestReadahead(t *testing.T) {
	data := randomBytes(4<<20, 9)
	s, ts := newServer(t, data)
	o, err := NewObjects(testConfig(t)).Open(ts.URL + "/disk.img")
	if err != nil {
		t.Fatal(err)
	}
	for off := int64(0); off < 8*64<<10; off += 64 << 10 {
		readBack(t, o, off, 64<<10)
	}
	deadline := time.Now().Add(2 * time.Second)
	for o.Stats().Cached < 10*64<<10 && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if n := o.Stats().Cached; n < 10*64<<10 {
		t.Errorf("%d bytes present after 8 sequential reads of a 64 KiB chunk each: no readahead", n)
	}
	// A random reader's blocks only: no readahead.
	idle := func() bool {
		o.mu.Lock()
		defer o.mu.Unlock()
		return len(o.inflight) == 0
	}
	for !idle() && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	before := o.Stats().Fetched
	readBack(t, o, 3<<20+5000, 100) // past the window (16 chunks)
	time.Sleep(50 * time.Millisecond)
	if got := o.Stats().Fetched - before; got != 4<<10 {
		t.Errorf("a random 100-byte read fetched %d bytes, want one 4 KiB block", got)
	}
	_ = s
}

// TestPruneKeepsEntriesInUse: prune removes entries not in use, least
// recently used first, and keeps one a process has open.
func TestPruneKeepsEntriesInUse(t *testing.T) {
	_, ts := newServer(t, randomBytes(256<<10, 10))
	cfg := testConfig(t)
	a := NewObjects(cfg)
	oa, err := a.Open(ts.URL + "/a.img")
	if err != nil {
		t.Fatal(err)
	}
	readBack(t, oa, 0, 256<<10)
	a.Close()
	b := NewObjects(cfg)
	defer b.Close()
	ob, err := b.Open(ts.URL + "/b.img")
	if err != nil {
		t.Fatal(err)
	}
	readBack(t, ob, 0, 256<<10)
	ents, err := List(cfg.Dir)
	if err != nil || len(ents) != 2 {
		t.Fatalf("list: %v %v", ents, err)
	}
	removed, err := Prune(cfg.Dir, 0)
	if err != nil || len(removed) != 1 || removed[0].URL != ts.URL+"/a.img" {
		t.Fatalf("prune removed %v (%v), want a.img only", removed, err)
	}
	if got := readBack(t, ob, 0, 10); len(got) != 10 {
		t.Fatal("b unreadable")
	}
}

// TestHostileServer: answers that claim an object too large to cache, a
// first range longer than asked for, or an unreadable range are refused
// with an error, without a large allocation.
func TestHostileServer(t *testing.T) {
	for _, c := range []struct {
		name         string
		contentRange string
		body         []byte
		kind         error
	}{
		{"huge", fmt.Sprintf("bytes 0-65535/%d", int64(1)<<62), make([]byte, 64<<10), ErrServer},
		{"long first range", "bytes 0-1099511627775/1099511627776", nil, ErrServer},
		{"garbage", "bytes zero-one/two", nil, ErrServer},
	} {
		t.Run(c.name, func(t *testing.T) {
			s, ts := newServer(t, nil)
			s.handle = func(w http.ResponseWriter, r *http.Request, s *server) {
				w.Header().Set("ETag", `"x"`)
				w.Header().Set("Content-Range", c.contentRange)
				w.WriteHeader(http.StatusPartialContent)
				w.Write(c.body)
			}
			cfg := testConfig(t)
			cfg.Retries = 1
			_, err := NewObjects(cfg).Open(ts.URL + "/disk.img")
			if !errors.Is(err, c.kind) {
				t.Errorf("open: %v, want %v", err, c.kind)
			}
		})
	}
}

// TestCacheMax: with Max set, objects not in use are evicted, least
// recently used first, as others are opened and filled.
func TestCacheMax(t *testing.T) {
	_, ts := newServer(t, randomBytes(512<<10, 13))
	cfg := testConfig(t)
	cfg.Max = 700 << 10
	for _, name := range []string{"a.img", "b.img", "c.img"} {
		objs := NewObjects(cfg)
		o, err := objs.Open(ts.URL + "/" + name)
		if err != nil {
			t.Fatal(err)
		}
		readBack(t, o, 0, o.Size())
		objs.Close()
		time.Sleep(20 * time.Millisecond) // distinct last-use times
	}
	objs := NewObjects(cfg)
	defer objs.Close()
	if _, err := objs.Open(ts.URL + "/d.img"); err != nil {
		t.Fatal(err)
	}
	ents, err := List(cfg.Dir)
	if err != nil {
		t.Fatal(err)
	}
	var total int64
	var urls []string
	for _, e := range ents {
		total += e.Cached
		urls = append(urls, strings.TrimPrefix(e.URL, ts.URL+"/"))
	}
	if total > cfg.Max || len(ents) != 2 || urls[0] != "c.img" || urls[1] != "d.img" {
		t.Errorf("cache holds %v, %d bytes; want c.img and d.img within %d", urls, total, cfg.Max)
	}
}

// TestDefaultDir: the cache is $XDG_CACHE_HOME/imgfuse, else
// ~/.cache/imgfuse (a relative XDG_CACHE_HOME is ignored, as the XDG
// specification says).
func TestDefaultDir(t *testing.T) {
	t.Setenv("HOME", "/home/someone")
	t.Setenv("XDG_CACHE_HOME", "/var/cache/me")
	if d := DefaultDir(); d != "/var/cache/me/imgfuse" {
		t.Errorf("with XDG_CACHE_HOME: %s", d)
	}
	t.Setenv("XDG_CACHE_HOME", "relative")
	if d := DefaultDir(); d != "/home/someone/.cache/imgfuse" {
		t.Errorf("with a relative XDG_CACHE_HOME: %s", d)
	}
	t.Setenv("XDG_CACHE_HOME", "")
	if d := DefaultDir(); d != "/home/someone/.cache/imgfuse" {
		t.Errorf("without XDG_CACHE_HOME: %s", d)
	}
}
