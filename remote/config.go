package remote

import (
	"os"
	"path/filepath"
	"sort"
	"sync"
	"sync/atomic"
	"time"

	"imgfuse/aio"
)

// Config is how remote objects are fetched and cached. The zero value of a
// field means its default (see Defaults).
type Config struct {
	// Dir is the cache directory: --cache-dir, else
	// $XDG_CACHE_HOME/imgfuse, else ~/.cache/imgfuse.
	Dir string `json:"cache-dir,omitempty"`
	// Max bounds what the cache holds (--cache-max): least recently
	// used objects not in use are evicted when an object is opened and
	// as chunks are stored (noteStored). 0: no bound.
	Max int64 `json:"cache-max,omitempty"`
	// S3Endpoint is --s3-endpoint (host:port or a URL); "" for the
	// environment's (AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL) or AWS's.
	S3Endpoint string `json:"s3-endpoint,omitempty"`

	Block     int64         `json:"-"` // bytes per block, the cache's unit and a random reader's (4 KiB)
	Chunk     int64         `json:"-"` // a sequential reader's request, a multiple of Block (1 MiB)
	Readahead int64         `json:"-"` // chunks, at most, ahead of a sequential reader (16)
	Parallel  int           `json:"-"` // requests in flight per object (8)
	Timeout   time.Duration `json:"-"` // per request: connect, TLS, headers, body (10 s)
	Retries   int           `json:"-"` // of a transient failure (3)
	Backoff   time.Duration `json:"-"` // first pause between tries, then doubled (100 ms)
}

// MaxSize bounds the size of an object: 1 TiB, whose two block bitmaps
// (present, durable) then take 64 MiB of memory.
const MaxSize = 1 << 40

// DefaultDir is the cache directory when none is given.
func DefaultDir() string {
	if d := os.Getenv("XDG_CACHE_HOME"); d != "" && filepath.IsAbs(d) {
		return filepath.Join(d, "imgfuse")
	}
	if d, err := os.UserHomeDir(); err == nil {
		return filepath.Join(d, ".cache", "imgfuse")
	}
	return filepath.Join(os.TempDir(), "imgfuse-cache")
}

// withDefaults returns cfg with every zero field set to its default.
func (cfg Config) withDefaults() Config {
	if cfg.Dir == "" {
		cfg.Dir = DefaultDir()
	}
	if cfg.Block <= 0 {
		cfg.Block = 4 << 10
	}
	if cfg.Chunk <= 0 {
		cfg.Chunk = 1 << 20
	}
	cfg.Chunk = (cfg.Chunk + cfg.Block - 1) / cfg.Block * cfg.Block
	if cfg.Readahead <= 0 {
		cfg.Readahead = 16
	}
	if cfg.Parallel <= 0 {
		cfg.Parallel = 8
	}
	if cfg.Timeout <= 0 {
		cfg.Timeout = 10 * time.Second
	}
	if cfg.Retries <= 0 {
		cfg.Retries = 3
	}
	if cfg.Backoff <= 0 {
		cfg.Backoff = 100 * time.Millisecond
	}
	return cfg
}

// Objects opens each URL once per process (the probe, the driver and a
// backing chain that names one URL twice share it) and keeps it open.
type Objects struct {
	cfg Config

	mu   sync.Mutex
	objs map[string]*Object // by URL; protected by mu
	// prefetch: Prefetch every object opened. Protected by mu.
	prefetch bool

	// sinceTrim counts the bytes stored since the cache was last
	// trimmed to Max; trimming is set while a trim runs.
	sinceTrim atomic.Int64
	trimming  atomic.Bool
}

// NewObjects returns a set of objects fetched and cached as cfg says.
func NewObjects(cfg Config) *Objects {
	return &Objects{cfg: cfg.withDefaults(), objs: map[string]*Object{}}
}

// Open returns the object url, opening it on first use.
func (s *Objects) Open(url string) (*Object, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if o, ok := s.objs[url]; ok {
		return o, nil
	}
	// Private: a cached object may be one only its owner's credentials
	// can read.
	if err := os.MkdirAll(s.cfg.Dir, 0o700); err != nil {
		return nil, &Error{Op: "open", URL: url, Kind: ErrCache, Cause: err.Error()}
	}
	o, err := openObject(url, &s.cfg)
	if err != nil {
		return nil, err
	}
	s.objs[url] = o
	if s.cfg.Max > 0 {
		Prune(s.cfg.Dir, s.cfg.Max) // objects open here are in use: kept
		o.stored = s.noteStored
	}
	if s.prefetch {
		o.Prefetch()
	}
	return o, nil
}

// noteStored trims the cache to Max, in the background, each time an
// eighth of Max (at most 64 MiB) has been stored since the last trim.
// Objects in use, by this process or another, are kept: one larger than
// Max makes the cache larger than Max while it is in use.
func (s *Objects) noteStored(n int64) {
	if s.sinceTrim.Add(n) < min(s.cfg.Max/8+1, 64<<20) || !s.trimming.CompareAndSwap(false, true) {
		return
	}
	s.sinceTrim.Store(0)
	go func() {
		defer s.trimming.Store(false)
		Prune(s.cfg.Dir, s.cfg.Max)
	}()
}

// PrefetchAll makes every object opened, and every one opened from now on,
// fetch itself whole in the background.
func (s *Objects) PrefetchAll() {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.prefetch = true
	for _, o := range s.objs {
		o.Prefetch()
	}
}

// Stats returns the statistics of every object open, sorted by URL.
func (s *Objects) Stats() []Stats {
	s.mu.Lock()
	defer s.mu.Unlock()
	var out []Stats
	for _, o := range s.objs {
		out = append(out, o.Stats())
	}
	sort.Slice(out, func(i, j int) bool { return out[i].URL < out[j].URL })
	return out
}

// Close closes every object.
func (s *Objects) Close() {
	s.mu.Lock()
	defer s.mu.Unlock()
	for u, o := range s.objs {
		o.Close()
		delete(s.objs, u)
	}
}

// Install makes aio open URLs this package supports through s (and refuse
// other schemes): after it, a URL is accepted wherever an image file name
// is.
func Install(s *Objects) {
	aio.SetRemoteOpener(func(url string) (string, aio.Filler, error) {
		if !Supported(url) {
			return "", nil, &Error{Op: "open", URL: url, Kind: ErrBadURL,
				Cause: "unsupported scheme (imgfuse reads http://, https:// and s3:// URLs)"}
		}
		o, err := s.Open(url)
		if err != nil {
			return "", nil, err
		}
		return o.Path(), o, nil
	})
}
