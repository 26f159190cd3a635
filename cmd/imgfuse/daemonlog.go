package main

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

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

// defaultLogMax is the size at which the default log is rotated.
const defaultLogMax = 1 << 20

// defaultLogKeep is how long the log of a server that is gone is kept
// when nothing mounts at its mountpoint again.
const defaultLogKeep = 7 * 24 * time.Hour

// defaultLogPath names the default log of a canonical mountpoint.
func defaultLogPath(dir, mountpoint string) string {
	return strings.TrimSuffix(statePath(dir, mountpoint), ".json") + ".log"
}

// openDefaultLog makes the state directory if needed and starts the
// default log of mountpoint afresh (removing the rotated one), for the
// parent to hand to the daemon as its stdout and stderr.
func openDefaultLog(mountpoint string) (*os.File, string, error) {
	dir := stateDir()
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, "", fmt.Errorf("state dir: %w", err)
	}
	if err := checkStateDir(dir); err != nil {
		return nil, "", err
	}
	pruneDefaultLogs(dir, time.Now().Add(-defaultLogKeep))
	path := defaultLogPath(dir, mountpoint)
	os.Remove(path + ".1")
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_TRUNC|os.O_APPEND, 0o600)
	if err != nil {
		return nil, "", err
	}
	return f, path, nil
}

// pruneDefaultLogs removes the default logs (and rotated logs) in dir last
// written before cutoff whose mountpoint has no state file: their server
// is gone and 'imgfuse unmount' has cleared what it left.
func pruneDefaultLogs(dir string, cutoff time.Time) {
	ents, err := os.ReadDir(dir)
	if err != nil {
		return
	}
	for _, e := range ents {
		name := e.Name()
		base, ok := strings.CutSuffix(strings.TrimSuffix(name, ".1"), ".log")
		if !ok || !e.Type().IsRegular() {
			continue
		}
		if _, err := os.Lstat(filepath.Join(dir, base+".json")); err == nil {
			continue // a server (live, or dead and not yet cleared) owns it
		}
		if fi, err := e.Info(); err == nil && fi.ModTime().Before(cutoff) {
			os.Remove(filepath.Join(dir, name))
		}
	}
}

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
