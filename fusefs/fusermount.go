package fusefs

import (
	"bytes"
	"errors"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"golang.org/x/sys/unix"
)

// A user other than root mounts through fusermount3, the set-uid helper
// that checks the user's rights, opens /dev/fuse and mounts. go-fuse runs
// it with the process's own stderr and, when it fails, returns only
// "fusermount exited with code 256": the reason ("fusermount3: user has no
// write access to mountpoint /mnt", "fusermount3: failed to open
// /dev/fuse: Permission denied") went to descriptor 2, which for a
// daemonized server is a log file or /dev/null. So newServer points
// descriptor 2 at a pipe while go-fuse mounts (stderrCapture) and turns
// fusermount3's lines into the error (FusermountError).

// FusermountError is a mount that fusermount3 refused. Msg is what it
// said, on one line ("fusermount3: user has no write access to mountpoint
// /mnt").
type FusermountError struct {
	Msg string
	Err error // go-fuse's error ("fusermount exited with code 256")
}

func (e *FusermountError) Error() string { return e.Msg }
func (e *FusermountError) Unwrap() error { return e.Err }

// fusermountError makes a failed mount's error from what was written to
// stderr meanwhile: the lines fusermount3 (or fusermount) wrote, which it
// prefixes with its name, joined into one line, the name without its
// directory. It returns the error and
// the rest of out, which is not fusermount's. Without such lines err is
// returned as it is.
func fusermountError(err error, out []byte) (error, []byte) {
	var msgs []string
	var rest bytes.Buffer
	for _, line := range strings.SplitAfter(string(out), "\n") {
		// fusermount3 names itself as it was run: go-fuse runs it by
		// its path ("/usr/bin/fusermount3: ...").
		prog, msg, ok := strings.Cut(strings.TrimSpace(line), ": ")
		if name := filepath.Base(prog); ok && strings.HasPrefix(name, "fusermount") && !strings.ContainsRune(name, ' ') {
			msgs = append(msgs, name+": "+msg)
		} else {
			rest.WriteString(line)
		}
	}
	if len(msgs) == 0 {
		return err, out
	}
	return &FusermountError{Msg: strings.Join(msgs, "; "), Err: err}, rest.Bytes()
}

// captureLimit bounds what a capture keeps; more is passed through.
const captureLimit = 64 << 10

// stderrCapture redirects the process's descriptor 2 to a pipe until stop.
// Everything written to it meanwhile, by this process or by a child that
// inherits it, is collected (and lost if the process dies before stop: the
// window is one mount long). Callers must serialise captures (mountMu).
type stderrCapture struct {
	saved int // the original descriptor 2
	r     int // the pipe's read end
	eof   chan struct{}

	mu      sync.Mutex
	buf     bytes.Buffer // protected by mu
	stopped bool         // protected by mu: later output goes to saved
}

// captureStderr starts a capture. On error nothing has changed.
func captureStderr() (*stderrCapture, error) {
	// With descriptor 2 closed the pipe could take its number.
	if _, err := unix.FcntlInt(2, unix.F_GETFD, 0); err != nil {
		return nil, err
	}
	var p [2]int
	if err := unix.Pipe2(p[:], unix.O_CLOEXEC); err != nil {
		return nil, err
	}
	saved, err := unix.FcntlInt(2, unix.F_DUPFD_CLOEXEC, 3)
	if err == nil {
		// Not close-on-exec: a child started meanwhile (fusermount3)
		// writes its messages into the pipe.
		err = unix.Dup3(p[1], 2, 0)
		if err != nil {
			unix.Close(saved)
		}
	}
	unix.Close(p[1])
	if err != nil {
		unix.Close(p[0])
		return nil, err
	}
	c := &stderrCapture{saved: saved, r: p[0], eof: make(chan struct{})}
	go c.drain()
	return c, nil
}

// drain reads the pipe until every write end is closed: into buf while
// capturing, then (a child that inherited the pipe lives on) straight to
// the original stderr. The pipe never fills, so no writer ever blocks.
func (c *stderrCapture) drain() {
	defer close(c.eof)
	b := make([]byte, 4096)
	for {
		n, err := unix.Read(c.r, b)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if n <= 0 {
			return
		}
		c.mu.Lock()
		if c.stopped || c.buf.Len() >= captureLimit {
			_, _ = unix.Write(c.saved, b[:n])
		} else {
			c.buf.Write(b[:n])
		}
		c.mu.Unlock()
	}
}

// stop puts the original descriptor 2 back and returns what was written
// to the pipe. It waits a moment for writers that still hold the pipe,
// then returns what it has; their later output goes to stderr.
func (c *stderrCapture) stop() []byte {
	_ = unix.Dup3(c.saved, 2, 0)
	select {
	case <-c.eof:
	case <-time.After(time.Second):
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	c.stopped = true
	out := bytes.Clone(c.buf.Bytes())
	go func() {
		// The original stderr stays open for drain until the last
		// writer lets go of the pipe.
		<-c.eof
		unix.Close(c.r)
		unix.Close(c.saved)
	}()
	return out
}

// forwardStderr writes out, captured output that is not part of an
// error, to stderr, where it was meant to go.
func forwardStderr(out []byte) {
	for len(out) > 0 {
		n, err := unix.Write(2, out)
		if errors.Is(err, unix.EINTR) {
			continue
		}
		if n <= 0 {
			return
		}
		out = out[n:]
	}
}
