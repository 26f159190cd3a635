package remote

import (
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"sync"
	"syscall"
	"time"

	"imgfuse/aio"
)

// The cache directory holds one directory per URL, named by the URL's
// SHA-256, with
//
//	meta.json  the URL, the version (size, ETag, Last-Modified) and the chunk size
//	data       the object's bytes where fetched: a sparse file of its size
//	map        one byte per chunk: 1 once the chunk's bytes are in data, on disk
//	lock       flock'd shared while a process uses the entry, exclusive to evict it
//
// A chunk's bytes are written and fdatasync'ed before its map byte is
// written, so a map byte that survives a crash always names bytes that
// did: a chunk written but not marked is fetched again, never served half
// written. The fdatasync is batched (markLoop): the process that fetched
// a chunk reads it at once from the page cache, and one fdatasync makes
// every chunk stored meanwhile durable before they are all marked. A new version of the object (another ETag or Last-Modified)
// replaces the entry whole: meta.json goes first, then data and map are
// made anew (a process still reading the old version keeps its open,
// now unlinked, files), then meta.json is written again.

const (
	metaName = "meta.json"
	dataName = "data"
	mapName  = "map"
	lockName = "lock"
)

type meta struct {
	URL     string  `json:"url"`
	Version version `json:"version"`
	Chunk   int64   `json:"chunk"`
}

// entry is one object's cache files, open.
type entry struct {
	dir   string
	chunk int64
	size  int64
	data  *aio.File // written by store; readers open their own descriptor
	mapf  *aio.File
	lock  *os.File

	mu sync.Mutex
	// present[i] is set once chunk i's bytes are in the data file (in
	// the page cache at least: this process reads them from there).
	// Protected by mu.
	present []bool
	// pending lists the chunks stored but not yet marked in the map
	// file; syncing is set while markLoop runs, idle signalled when it
	// stops. Protected by mu.
	pending []int64
	syncing bool
	idle    *sync.Cond
}

// entryDir is the directory of url's entry in the cache at dir.
func entryDir(dir, url string) string {
	h := sha256.Sum256([]byte(url))
	return filepath.Join(dir, hex.EncodeToString(h[:16]))
}

// loadMeta reads the entry's meta.json; nil if there is none or it is
// unreadable (the entry is then remade).
func loadMeta(dir string) *meta {
	b, err := os.ReadFile(filepath.Join(dir, metaName))
	if err != nil {
		return nil
	}
	var m meta
	if json.Unmarshal(b, &m) != nil || m.Chunk <= 0 || m.Version.Size <= 0 {
		return nil
	}
	return &m
}

// lockEntry takes the entry's lock file, shared (in use, creating it) or
// exclusive without waiting (to evict it: a directory without a lock file
// is not an entry, and is left alone).
func lockEntry(dir string, exclusive bool) (*os.File, error) {
	flags := os.O_RDWR | syscall.O_CLOEXEC
	if !exclusive {
		flags |= os.O_CREATE
	}
	f, err := os.OpenFile(filepath.Join(dir, lockName), flags, 0o600)
	if err != nil {
		return nil, err
	}
	how := syscall.LOCK_SH
	if exclusive {
		how = syscall.LOCK_EX | syscall.LOCK_NB
	}
	for {
		err = syscall.Flock(int(f.Fd()), how)
		if err != syscall.EINTR {
			break
		}
	}
	if err != nil {
		f.Close()
		return nil, err
	}
	return f, nil
}

// openEntry opens url's entry for version v, remaking it if the cache holds
// another version (or none). head, if not nil, is the object's first bytes,
// stored as chunk 0 (and what follows, whole chunks only).
func openEntry(cacheDir, url string, v version, chunk int64) (*entry, error) {
	dir := entryDir(cacheDir, url)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	lock, err := lockEntry(dir, false)
	if err != nil {
		return nil, err
	}
	e, err := openEntryLocked(dir, url, v, chunk)
	if err != nil {
		lock.Close()
		return nil, err
	}
	e.lock = lock
	now := time.Now()
	os.Chtimes(filepath.Join(dir, metaName), now, now) // last use, for eviction
	return e, nil
}

func openEntryLocked(dir, url string, v version, chunk int64) (*entry, error) {
	nchunks := (v.Size + chunk - 1) / chunk
	m := loadMeta(dir)
	fresh := m == nil || m.URL != url || m.Version != v || m.Chunk != chunk
	if !fresh {
		if fi, err := os.Stat(filepath.Join(dir, mapName)); err != nil || fi.Size() != nchunks {
			fresh = true
		}
		if fi, err := os.Stat(filepath.Join(dir, dataName)); err != nil || fi.Size() != v.Size {
			fresh = true
		}
	}
	if fresh {
		if err := makeEntry(dir, url, v, chunk, nchunks); err != nil {
			return nil, err
		}
	}
	e := &entry{dir: dir, chunk: chunk, size: v.Size}
	e.idle = sync.NewCond(&e.mu)
	var err error
	if e.data, err = aio.Open(filepath.Join(dir, dataName), aio.Options{NoDirectIO: true, NoLock: true}); err != nil {
		return nil, err
	}
	if e.mapf, err = aio.Open(filepath.Join(dir, mapName), aio.Options{NoDirectIO: true, NoLock: true}); err != nil {
		e.data.Close()
		return nil, err
	}
	bits := make([]byte, nchunks)
	if err := e.mapf.Pread(bits, 0); err != nil {
		e.close()
		return nil, err
	}
	e.present = make([]bool, nchunks)
	for i, b := range bits {
		e.present[i] = b == 1
	}
	return e, nil
}

// makeEntry (re)creates the entry's files for version v.
func makeEntry(dir, url string, v version, chunk, nchunks int64) error {
	metaPath := filepath.Join(dir, metaName)
	if err := os.Remove(metaPath); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	for _, f := range []struct {
		name string
		size int64
	}{{dataName, v.Size}, {mapName, nchunks}} {
		p := filepath.Join(dir, f.name)
		if err := os.Remove(p); err != nil && !errors.Is(err, fs.ErrNotExist) {
			return err
		}
		fh, err := os.OpenFile(p, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o600)
		if err != nil {
			return err
		}
		err = fh.Truncate(f.size)
		if cerr := fh.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			return err
		}
	}
	b, err := json.MarshalIndent(meta{URL: url, Version: v, Chunk: chunk}, "", "  ")
	if err != nil {
		return err
	}
	tmp := metaPath + ".tmp"
	if err := os.WriteFile(tmp, append(b, '\n'), 0o600); err != nil {
		return err
	}
	return os.Rename(tmp, metaPath)
}

// has reports whether chunk i is on disk.
func (e *entry) has(i int64) bool {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.present[i]
}

// count returns how many chunks are on disk.
func (e *entry) count() int64 {
	e.mu.Lock()
	defer e.mu.Unlock()
	var n int64
	for _, p := range e.present {
		if p {
			n++
		}
	}
	return n
}

// store writes chunk i's bytes p; readers of this process may read them
// at once (from the page cache). The chunk is marked in the map file
// later, by markLoop, once an fdatasync of the data file has made its
// bytes durable (see the ordering above): one fdatasync covers every
// chunk stored meanwhile. It blocks.
func (e *entry) store(i int64, p []byte) error {
	if err := e.data.Pwrite(p, i*e.chunk); err != nil {
		return err
	}
	e.mu.Lock()
	e.present[i] = true
	e.pending = append(e.pending, i)
	start := !e.syncing
	e.syncing = true
	e.mu.Unlock()
	if start {
		go e.markLoop()
	}
	return nil
}

// markLoop makes the pending chunks durable and marks them, batch after
// batch, until none is left. A chunk whose fdatasync failed stays
// unmarked: the next process fetches it again.
func (e *entry) markLoop() {
	for {
		e.mu.Lock()
		batch := e.pending
		e.pending = nil
		if len(batch) == 0 {
			e.syncing = false
			e.idle.Broadcast()
			e.mu.Unlock()
			return
		}
		e.mu.Unlock()
		if e.data.Fdatasync() != nil {
			continue
		}
		// The map byte needs no sync of its own: lost in a crash,
		// it only costs a second fetch.
		for _, i := range batch {
			e.mapf.Pwrite([]byte{1}, i)
		}
	}
}

func (e *entry) close() {
	e.mu.Lock()
	for e.syncing {
		e.idle.Wait()
	}
	e.mu.Unlock()
	if e.mapf != nil {
		e.mapf.Fdatasync()
		e.mapf.Close()
	}
	if e.data != nil {
		e.data.Close()
	}
	if e.lock != nil {
		e.lock.Close()
	}
}

// Entry describes one object in the cache, for `imgfuse cache ls`.
type Entry struct {
	URL      string    `json:"url"`
	ETag     string    `json:"etag,omitempty"`
	Size     int64     `json:"size"`
	Cached   int64     `json:"cached"` // bytes on disk
	LastUsed time.Time `json:"last-used"`
	InUse    bool      `json:"in-use"`
	dir      string
}

// List returns the objects in the cache at dir, least recently used first.
// An entry whose meta.json is missing (being remade, or a crash while it
// was) has no URL; Prune removes it like any other.
func List(dir string) ([]Entry, error) {
	ents, err := os.ReadDir(dir)
	if errors.Is(err, fs.ErrNotExist) {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	var out []Entry
	for _, de := range ents {
		if !de.IsDir() {
			continue
		}
		d := filepath.Join(dir, de.Name())
		if _, err := os.Stat(filepath.Join(d, lockName)); err != nil {
			continue // not an entry
		}
		e := Entry{dir: d}
		if m := loadMeta(d); m != nil {
			e.URL, e.ETag, e.Size = m.URL, m.Version.ETag, m.Version.Size
		}
		if fi, err := os.Stat(filepath.Join(d, metaName)); err == nil {
			e.LastUsed = fi.ModTime()
		}
		if fi, err := os.Stat(filepath.Join(d, dataName)); err == nil {
			if st, ok := fi.Sys().(*syscall.Stat_t); ok {
				e.Cached = st.Blocks * 512
			}
		}
		if l, err := lockEntry(d, true); err == nil {
			l.Close()
		} else {
			e.InUse = true
		}
		out = append(out, e)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].LastUsed.Before(out[j].LastUsed) })
	return out, nil
}

// Prune removes objects from the cache at dir, least recently used first,
// until what it holds is at most max bytes; objects in use by a mount are
// kept. It returns what it removed.
func Prune(dir string, max int64) ([]Entry, error) {
	ents, err := List(dir)
	if err != nil {
		return nil, err
	}
	var total int64
	for _, e := range ents {
		total += e.Cached
	}
	var removed []Entry
	for _, e := range ents {
		if total <= max {
			break
		}
		l, err := lockEntry(e.dir, true)
		if err != nil {
			continue // in use
		}
		err = os.RemoveAll(e.dir)
		l.Close()
		if err != nil {
			return removed, fmt.Errorf("remove %s: %w", e.dir, err)
		}
		total -= e.Cached
		removed = append(removed, e)
	}
	return removed, nil
}
