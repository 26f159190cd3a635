package mounts

import (
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"
)

// DefaultLogMax is the size at which the default log is rotated.
const DefaultLogMax = 1 << 20

// defaultLogKeep is how long the log of a server that is gone is kept
// when nothing mounts at its mountpoint again.
const defaultLogKeep = 7 * 24 * time.Hour

// DefaultLogPath names the default log of a canonical mountpoint.
func DefaultLogPath(dir, mountpoint string) string {
	return strings.TrimSuffix(StatePath(dir, mountpoint), ".json") + ".log"
}

// OpenDefaultLog makes the state directory if needed and starts the
// default log of mountpoint afresh (removing the rotated one), for the
// parent to hand to the daemon as its stdout and stderr.
func OpenDefaultLog(mountpoint string) (*os.File, string, error) {
	dir := StateDir()
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, "", fmt.Errorf("state dir: %w", err)
	}
	if err := CheckStateDir(dir); err != nil {
		return nil, "", err
	}
	pruneDefaultLogs(dir, time.Now().Add(-defaultLogKeep))
	path := DefaultLogPath(dir, mountpoint)
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
