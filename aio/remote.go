package aio

import (
	"errors"
	"fmt"
	"io"
	"os"
	"regexp"
	"sync"

	"golang.org/x/sys/unix"

	"imgfuse/coroutine"
)

// A remote image (an object named by a URL, see package remote) is read
// through a local file that holds the bytes fetched so far: the remote
// cache's sparse data file. The File opened on it is read-only and has a
// Filler, which every read calls first to make the read's range present;
// after that the read is an ordinary read of a local file, so every driver
// (and the raw driver's direct-read fast path, which goes through pread
// too) works on a remote image unchanged. The file's descriptor is never
// lent (FUSE passthrough would let the kernel read holes that were never
// fetched).

// Filler makes ranges of a remote object's local file present.
type Filler interface {
	// Fill returns once [off, off+n) of the local file holds the
	// object's bytes, fetching what is missing, or fails (the read then
	// fails). It blocks the calling goroutine: a coroutine calls it
	// through coroutine.RunInWorker.
	Fill(off, n int64) error
}

// PresentFiller is a Filler that can also tell, without blocking, that a
// range is present already: a read of a cached range then skips the
// worker hand-off (a few microseconds) that Fill needs.
type PresentFiller interface {
	Filler
	// Present reports whether [off, off+n) is present, counting it
	// as a cache hit if so.
	Present(off, n int64) bool
}

// SettledFiller is a PresentFiller that also tells whether a present
// range is on disk yet. A read of a range present but not settled is
// served from the page cache (File.fresh), where its blocks wait, dirty,
// for the filler's sync: a direct read would wait for their writeback.
type SettledFiller interface {
	PresentFiller
	Settled(off, n int64) bool
}

// RemoteOpener opens the object named by url for reading: it returns the
// path of the local file that holds its bytes (the object's size, sparse
// where nothing was fetched) and the Filler that fetches into it.
type RemoteOpener func(url string) (path string, fill Filler, err error)

// ErrRemoteUnavailable is the cause of the refusal of a URL when no
// RemoteOpener was installed (a program that reads local files only) or
// the URL's scheme is one no opener serves.
var ErrRemoteUnavailable = errors.New("remote images are not supported by this program")

// errRemoteReadOnly refuses a writable open of a URL; it matches
// ErrReadOnly.
type errRemoteReadOnly struct{}

func (errRemoteReadOnly) Error() string { return "remote images are read-only" }
func (errRemoteReadOnly) Unwrap() error { return ErrReadOnly }

// ErrNoLend is returned by LendFd for a remote image's local file.
var ErrNoLend = errors.New("the file is a remote image's cache: its descriptor cannot be lent")

var remote struct {
	mu   sync.Mutex
	open RemoteOpener
}

// SetRemoteOpener installs the function that Open, OpenHead and IsRemote
// use for URLs; nil removes it. Programs call it once at start-up (the
// remote package's Install does), before opening images.
func SetRemoteOpener(fn RemoteOpener) {
	remote.mu.Lock()
	remote.open = fn
	remote.mu.Unlock()
}

func remoteOpener() RemoteOpener {
	remote.mu.Lock()
	defer remote.mu.Unlock()
	return remote.open
}

// urlScheme matches the scheme:// of a URL (RFC 3986's scheme).
var urlScheme = regexp.MustCompile(`^[A-Za-z][A-Za-z0-9+.-]*://`)

// IsURL reports whether name is a URL (scheme://...) rather than a file:
// a local file whose name merely looks like one (in a directory "https:")
// is a file.
func IsURL(name string) bool {
	if !urlScheme.MatchString(name) {
		return false
	}
	_, err := os.Lstat(name)
	return err != nil
}

// openRemote opens the local file of the object url for reading through
// its filler.
func openRemote(url string, opts Options) (*File, error) {
	open := remoteOpener()
	if open == nil {
		return nil, &os.PathError{Op: "open", Path: url, Err: ErrRemoteUnavailable}
	}
	if !opts.ReadOnly {
		return nil, &os.PathError{Op: "open for writing", Path: url, Err: errRemoteReadOnly{}}
	}
	path, fill, err := open(url)
	if err != nil {
		return nil, err
	}
	// Direct, as a local image: the filler writes (and syncs) each block
	// through another descriptor before it is marked present, and a
	// direct read of a range still dirty in the page cache writes it back
	// first, so the engine reads what the filler wrote. Buffered reads
	// through the fallback engine's threads made a warm (fully cached)
	// image read at about half a local image's speed.
	f, err := openFile(path, Options{ReadOnly: true})
	if err != nil {
		return nil, err
	}
	f.name = url
	f.filler = fill
	if f.direct {
		fresh, err := os.Open(path)
		if err != nil {
			f.Close()
			return nil, err
		}
		f.fresh = fresh
	}
	f.engDesc += " (remote image: " + path + ")"
	return f, nil
}

// fill runs the filler, if any, for [off, off+n): off the coroutine's loop
// (it waits for the network), in place for a plain caller.
func (f *File) fill(co *coroutine.Co, off, n int64) (fetched bool, err error) {
	if f.filler == nil {
		return false, nil
	}
	if pf, ok := f.filler.(PresentFiller); ok && pf.Present(off, n) {
		sf, ok := f.filler.(SettledFiller)
		return ok && !sf.Settled(off, n), nil
	}
	return true, f.fillInWorker(co, off, n)
}

// fillInWorker calls Fill on a worker for a coroutine (on the caller's
// goroutine without one). Apart from fill so that the closure's variable
// is allocated only for a read that fetches: every read of a local file
// goes through fill too.
func (f *File) fillInWorker(co *coroutine.Co, off, n int64) error {
	if co == nil {
		return f.filler.Fill(off, n)
	}
	var err error
	coroutine.RunInWorker(co, func() { err = f.filler.Fill(off, n) })
	return err
}

// readFresh reads p at off through the buffered descriptor: blocks the
// filler has just written are in the page cache, so this copies memory
// (on the calling thread) where a direct read would first wait for their
// writeback. Past the end of the file reads as zeros, as readDirect.
func (f *File) readFresh(p []byte, off int64) error {
	n, err := f.fresh.ReadAt(p, off)
	if err == io.EOF {
		clear(p[n:])
		err = nil
	}
	return err
}

// Remote reports whether the file is a remote image's local file.
func (f *File) Remote() bool { return f.filler != nil }

// openRemoteHead is OpenHead for a URL.
func openRemoteHead(url string) (*os.File, error) {
	open := remoteOpener()
	if open == nil {
		return nil, &os.PathError{Op: "open", Path: url, Err: ErrRemoteUnavailable}
	}
	path, fill, err := open(url)
	if err != nil {
		return nil, err
	}
	fd, err := openImageFD(path, unix.O_RDONLY|unix.O_CLOEXEC)
	if err != nil {
		return nil, err
	}
	file := os.NewFile(uintptr(fd), url)
	size, err := file.Seek(0, io.SeekEnd)
	if err == nil {
		err = fill.Fill(0, min(size, headBytes))
	}
	if tail := max(size-headBytes, 0); err == nil && tail > 0 {
		err = fill.Fill(tail, size-tail)
	}
	if err == nil {
		_, err = file.Seek(0, io.SeekStart)
	}
	if err != nil {
		file.Close()
		return nil, fmt.Errorf("aio: %s: %w", url, err)
	}
	return file, nil
}
