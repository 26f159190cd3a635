package session

import (
	"os"
	"sync"

	"golang.org/x/sys/unix"
)

// The default log (issue 12). A daemon started without --log used to
// discard its messages, so the reason for an EIO or for the daemon's death
// was lost. Now its stdout and stderr go to a file next to its state file
// (STATEDIR/HASH.log, named by 'imgfuse status'), bounded: past
// defaultLogMax bytes it is renamed to HASH.log.1 (replacing the previous
// one) and a new one is started, so at most twice that is kept. The log
// outlives the daemon — after a crash it is what tells why — and the next
// mount at the same mountpoint starts it afresh. The state directory is on
// a tmpfs (/run, $XDG_RUNTIME_DIR) wherever that exists, cleared at boot;
// so that mounts at ever new places (a CI machine's temporary
// directories) do not fill it meanwhile, each mount also removes the logs
// of mountpoints without a server that nobody wrote for defaultLogKeep.

// boundedLog writes the daemon's log to f, rotating the file at path once
// it would pass max bytes. With dupTo set (the daemon's stdout and
// stderr), the new file is made those descriptors, so that what the Go
// runtime writes to fd 2 (a panic) lands in the current file too.
type boundedLog struct {
	path  string
	max   int64
	dupTo []int

	// mu protects f and size.
	mu   sync.Mutex
	f    *os.File
	size int64
}

func newBoundedLog(f *os.File, path string, max int64, dupTo []int) *boundedLog {
	b := &boundedLog{path: path, max: max, dupTo: dupTo, f: f}
	if fi, err := f.Stat(); err == nil {
		b.size = fi.Size()
	}
	return b
}

func (b *boundedLog) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.size > 0 && b.size+int64(len(p)) > b.max {
		// A failed rotation keeps writing where it was: better a long
		// log than a lost one.
		_ = b.rotateLocked()
	}
	n, err := b.f.Write(p)
	b.size += int64(n)
	return n, err
}

// rotateLocked renames the log to path.1 and starts a new one at path.
func (b *boundedLog) rotateLocked() error {
	if err := os.Rename(b.path, b.path+".1"); err != nil {
		return err
	}
	nf, err := os.OpenFile(b.path, os.O_WRONLY|os.O_CREATE|os.O_TRUNC|os.O_APPEND, 0o600)
	if err != nil {
		return err
	}
	if len(b.dupTo) > 0 {
		for _, fd := range b.dupTo {
			if err := unix.Dup3(int(nf.Fd()), fd, 0); err != nil {
				nf.Close()
				return err
			}
		}
		nf.Close() // b.f is one of dupTo, now the new file
	} else {
		b.f.Close()
		b.f = nf
	}
	b.size = 0
	return nil
}
