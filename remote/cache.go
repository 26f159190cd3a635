package remote

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"math/bits"
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
//	meta.json  the URL, the version (size, ETag, Last-Modified) and the block size
//	data       the object's bytes where fetched: a sparse file of its size
//	map        a bitmap of the blocks (4 KiB): set once the block's bytes are in data, on disk
//	lock       flock'd shared while a process uses the entry, exclusive to evict it
//
// A block's bytes are written and fdatasync'ed before its map bit is
// written, so a map bit that survives a crash always names bytes that
// did: a block written but not marked is fetched again, never served half
// written. The fdatasync is batched (markLoop): the process that fetched
// a block reads it at once from the page cache, and one fdatasync makes
// every block stored meanwhile durable before they are all marked. A new
// version of the object (another ETag or Last-Modified) replaces the
// entry whole: meta.json goes first, then data and map are made anew (a
// process still reading the old version keeps its open, now unlinked,
// files), then meta.json is written again.

const (
	metaName = "meta.json"
	dataName = "data"
	mapName  = "map"
	lockName = "lock"
)

type meta struct {
	URL     string  `json:"url"`
	Version version `json:"version"`
	Block   int64   `json:"block"`
}

// entry is one object's cache files, open. The object is cut in blocks
// (Config.Block); the map file is a bitmap of them, bit b%8 of byte b/8
// for block b.
type entry struct {
	dir     string
	block   int64
	size    int64
	nblocks int64
	data    *aio.File // written by store; readers open their own descriptor
	mapf    *aio.File
	lock    *os.File

	mu sync.Mutex
	// present has the bit of a block set once its bytes are in the
	// data file (in the page cache at least: this process reads them
	// from there); durable once they are on disk and marked in the map
	// file, whose bytes it mirrors. Protected by mu.
	present, durable []byte
	// pending lists the block ranges stored but not yet marked;
	// syncing is set while markLoop runs, idle signalled when it stops.
	// Protected by mu.
	pending [][2]int64
	syncing bool
	idle    *sync.Cond
}

func bit(m []byte, b int64) bool { return m[b>>3]&(1<<(b&7)) != 0 }
func setBits(m []byte, b0, b1 int64) {
	for b := b0; b < b1; b++ {
		m[b>>3] |= 1 << (b & 7)
	}
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
	if json.Unmarshal(b, &m) != nil || m.Block <= 0 || m.Version.Size <= 0 {
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
// another version (or none).
func openEntry(cacheDir, url string, v version, block int64) (*entry, error) {
	dir := entryDir(cacheDir, url)
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, err
	}
	lock, err := lockEntry(dir, false)
	if err != nil {
		return nil, err
	}
	e, err := openEntryLocked(dir, url, v, block)
	if err != nil {
		lock.Close()
		return nil, err
	}
	e.lock = lock
	now := time.Now()
	os.Chtimes(filepath.Join(dir, metaName), now, now) // last use, for eviction
	return e, nil
}

func openEntryLocked(dir, url string, v version, block int64) (*entry, error) {
	nblocks := (v.Size + block - 1) / block
	mapSize := (nblocks + 7) / 8
	m := loadMeta(dir)
	fresh := m == nil || m.URL != url || m.Version != v || m.Block != block
	if !fresh {
		if fi, err := os.Stat(filepath.Join(dir, mapName)); err != nil || fi.Size() != mapSize {
			fresh = true
		}
		if fi, err := os.Stat(filepath.Join(dir, dataName)); err != nil || fi.Size() != v.Size {
			fresh = true
		}
	}
	if fresh {
		if err := makeEntry(dir, url, v, block, mapSize); err != nil {
			return nil, err
		}
	}
	e := &entry{dir: dir, block: block, size: v.Size, nblocks: nblocks}
	e.idle = sync.NewCond(&e.mu)
	var err error
	if e.data, err = aio.Open(filepath.Join(dir, dataName), aio.Options{NoDirectIO: true, NoLock: true}); err != nil {
		return nil, err
	}
	if e.mapf, err = aio.Open(filepath.Join(dir, mapName), aio.Options{NoDirectIO: true, NoLock: true}); err != nil {
		e.data.Close()
		return nil, err
	}
	e.durable = make([]byte, mapSize)
	if err := e.mapf.Pread(e.durable, 0); err != nil {
		e.close()
		return nil, err
	}
	if r := nblocks & 7; r != 0 {
		e.durable[mapSize-1] &= 1<<r - 1 // no bits past the last block
	}
	e.present = bytes.Clone(e.durable)
	return e, nil
}

// makeEntry (re)creates the entry's files for version v.
func makeEntry(dir, url string, v version, block, mapSize int64) error {
	metaPath := filepath.Join(dir, metaName)
	if err := os.Remove(metaPath); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	for _, f := range []struct {
		name string
		size int64
	}{{dataName, v.Size}, {mapName, mapSize}} {
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
	b, err := json.MarshalIndent(meta{URL: url, Version: v, Block: block}, "", "  ")
	if err != nil {
		return err
	}
	tmp := metaPath + ".tmp"
	if err := os.WriteFile(tmp, append(b, '\n'), 0o600); err != nil {
		return err
	}
	return os.Rename(tmp, metaPath)
}

// has reports whether block b is present.
func (e *entry) has(b int64) bool {
	e.mu.Lock()
	defer e.mu.Unlock()
	return bit(e.present, b)
}

// hasAll reports whether blocks [b0, b1) are all present.
func (e *entry) hasAll(b0, b1 int64) bool {
	e.mu.Lock()
	defer e.mu.Unlock()
	for b := b0; b < b1; b++ {
		if !bit(e.present, b) {
			return false
		}
	}
	return true
}

// allDurable reports whether blocks [b0, b1) are all on disk (synced):
// their pages in the page cache, if any, are clean.
func (e *entry) allDurable(b0, b1 int64) bool {
	e.mu.Lock()
	defer e.mu.Unlock()
	for b := b0; b < b1; b++ {
		if !bit(e.durable, b) {
			return false
		}
	}
	return true
}

// count returns how many blocks are present.
func (e *entry) count() int64 {
	e.mu.Lock()
	defer e.mu.Unlock()
	var n int
	for _, x := range e.present {
		n += bits.OnesCount8(x)
	}
	return int64(n)
}

// store writes p, the bytes of the blocks from b0 on (whole blocks, the
// last one ending at the object's end); readers of this process may read
// them at once (from the page cache). They are marked in the map file
// later, by markLoop, once an fdatasync of the data file has made them
// durable (see the ordering above): one fdatasync covers every block
// stored meanwhile. It blocks.
func (e *entry) store(b0 int64, p []byte) error {
	if err := e.data.Pwrite(p, b0*e.block); err != nil {
		return err
	}
	b1 := b0 + (int64(len(p))+e.block-1)/e.block
	e.mu.Lock()
	setBits(e.present, b0, b1)
	e.pending = append(e.pending, [2]int64{b0, b1})
	start := !e.syncing
	e.syncing = true
	e.mu.Unlock()
	if start {
		go e.markLoop()
	}
	return nil
}

// markLoop makes the pending blocks durable and marks them, batch after
// batch, until none is left. Blocks whose fdatasync failed stay unmarked:
// the next process fetches them again.
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
		// The map bytes need no sync of their own: lost in a crash,
		// they only cost a second fetch. Each write copies bytes of
		// durable, which only ever has bits of synced blocks.
		for _, r := range batch {
			e.mu.Lock()
			setBits(e.durable, r[0], r[1])
			x0, x1 := r[0]>>3, (r[1]-1)>>3+1
			buf := bytes.Clone(e.durable[x0:x1])
			e.mu.Unlock()
			e.mapf.Pwrite(buf, x0)
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
