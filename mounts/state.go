package mounts

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"imgfuse/remote"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// State is what a serving process records so that `imgfuse unmount`
// can find it and wait for it to flush and exit.
type State struct {
	PID int `json:"pid"`
	// UID is the user who mounted (nil in the files of servers from
	// before it was recorded): status and unmount speak of a user's own
	// mounts only.
	UID        *int   `json:"uid,omitempty"`
	Image      string `json:"image"`
	Mountpoint string `json:"mountpoint"`
	Format     string `json:"format"`
	ReadOnly   bool   `json:"read-only"`
	// Passthrough is "on" when the kernel serves the disk's reads itself
	// (FUSE passthrough), else "off: " and why.
	Passthrough string `json:"passthrough,omitempty"`
	// Overlay is the qcow2 overlay that takes the writes (--overlay,
	// --overlay-keep); OverlayTemporary says it is removed on exit, so a
	// stale state file's overlay is removed with it.
	Overlay          string `json:"overlay,omitempty"`
	OverlayTemporary bool   `json:"overlay-temporary,omitempty"`
	// ServingMode is how the FUSE server reads requests (fusefs
	// Server.Mode); PIDFile the --pidfile.
	ServingMode string    `json:"serving-mode,omitempty"`
	PIDFile     string    `json:"pidfile,omitempty"`
	Started     time.Time `json:"started"`
	// CloseError is set by a server whose final flush or close failed,
	// just before it exits; 'imgfuse unmount' reports it.
	CloseError string `json:"close-error,omitempty"`
	// Log is the file the server logs to: --log FILE, else its default
	// log; "" for a --foreground server logging to its terminal.
	Log string `json:"log,omitempty"`
	// IOErrors counts the I/O errors (EIO) the mount returned, and
	// LastIOError is the last of them; the server rewrites the state
	// file as they happen (at most ioErrorPublishEvery apart).
	IOErrors    uint64        `json:"io-errors,omitempty"`
	LastIOError *IOErrorState `json:"last-io-error,omitempty"`
	// Remote holds, for a remote image (or a chain with one), each
	// object's counters: bytes fetched, cache hits, the last error,
	// the prefetch's progress; rewritten every second while it changes.
	Remote []remote.Stats `json:"remote,omitempty"`
}

// IOErrorState is the last I/O error of a mount, in the state file and in
// 'imgfuse status --output=json'.
type IOErrorState struct {
	Time      time.Time `json:"time"`
	Operation string    `json:"operation"`
	// Offset is the disk offset of the request, null for one without
	// (a flush).
	Offset *int64 `json:"offset"`
	Cause  string `json:"cause"`
}

// UIDOf is uid as State.UID records it.
func UIDOf(uid int) *int { return &uid }

// Mine reports whether st is a mount of user uid: root's are everyone's
// to see; a file that records no owner is taken as the state
// directory's, which is the user's own (CheckStateDir).
func (st State) Mine(uid int) bool {
	return uid == 0 || st.UID == nil || *st.UID == uid
}

// StateDir is where state files live: /run/imgfuse for root; for a user
// $XDG_RUNTIME_DIR/imgfuse, else imgfuse in the user's runtime directory
// /run/user/UID if it exists (what XDG_RUNTIME_DIR is in their login
// sessions, so that a command run outside one, from cron or sudo -u,
// finds the same mounts), else /tmp/imgfuse-UID: /tmp, not $TMPDIR, so
// that the user's commands agree whatever their TMPDIR.
func StateDir() string {
	return StateDirFor(os.Geteuid(), os.Getenv("XDG_RUNTIME_DIR"), "/run/user")
}

// StateDirFor is stateDir for user uid, with XDG_RUNTIME_DIR xdg and the
// runtime directories under runUser.
func StateDirFor(uid int, xdg, runUser string) string {
	if uid == 0 {
		return "/run/imgfuse"
	}
	if xdg != "" {
		return filepath.Join(xdg, "imgfuse")
	}
	if d := filepath.Join(runUser, strconv.Itoa(uid)); checkDirOwner(d, uid) == nil {
		return filepath.Join(d, "imgfuse")
	}
	return fmt.Sprintf("/tmp/imgfuse-%d", uid)
}

// CheckStateDir refuses a state directory that is not ours alone. The
// per-user directory under /tmp may have been made by anyone, and a state
// file is trusted: 'imgfuse unmount' waits for the pid it names and
// removes its temporary overlay.
func CheckStateDir(dir string) error { return checkDirOwner(dir, os.Geteuid()) }

// checkDirOwner checks that dir is a directory (not a symlink) of user
// uid that no other user may write.
func checkDirOwner(dir string, uid int) error {
	fi, err := os.Lstat(dir)
	if err != nil {
		return err // os.IsNotExist: no state yet
	}
	st, ok := fi.Sys().(*syscall.Stat_t)
	switch {
	case !fi.IsDir():
		return fmt.Errorf("state dir %s is not a directory", dir)
	case ok && int(st.Uid) != uid:
		return fmt.Errorf("state dir %s belongs to uid %d, not to uid %d", dir, st.Uid, uid)
	case fi.Mode().Perm()&0o022 != 0:
		return fmt.Errorf("state dir %s is writable by other users (mode %#o)", dir, fi.Mode().Perm())
	}
	return nil
}

// StatePath names the state file of a canonical mountpoint: a hash, so any
// path (spaces, slashes, length) maps to one flat file name.
func StatePath(dir, mountpoint string) string {
	sum := sha256.Sum256([]byte(mountpoint))
	return filepath.Join(dir, hex.EncodeToString(sum[:])+".json")
}

// WriteState records st atomically (write a temporary file, rename).
func WriteState(dir string, st State) (string, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return "", fmt.Errorf("state dir: %w", err)
	}
	if err := CheckStateDir(dir); err != nil {
		return "", err
	}
	b, err := json.MarshalIndent(st, "", "  ")
	if err != nil {
		return "", err
	}
	path := StatePath(dir, st.Mountpoint)
	tmp, err := os.CreateTemp(dir, ".state-*")
	if err != nil {
		return "", fmt.Errorf("state file: %w", err)
	}
	_, err = tmp.Write(append(b, '\n'))
	if cerr := tmp.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp.Name(), path)
	}
	if err != nil {
		os.Remove(tmp.Name())
		return "", fmt.Errorf("state file: %w", err)
	}
	return path, nil
}

// ReadState loads the state file of a canonical mountpoint.
func ReadState(dir, mountpoint string) (State, error) {
	var st State
	if err := CheckStateDir(dir); err != nil {
		return st, err
	}
	b, err := os.ReadFile(StatePath(dir, mountpoint))
	if err != nil {
		return st, err
	}
	if err := json.Unmarshal(b, &st); err != nil {
		return st, fmt.Errorf("state file %s: %w", StatePath(dir, mountpoint), err)
	}
	if st.Mountpoint != mountpoint {
		return st, fmt.Errorf("state file %s is for %s", StatePath(dir, mountpoint), st.Mountpoint)
	}
	return st, nil
}

// ServerRunning reports whether pid is still a live imgfuse process
// serving a mount: the pid exists, is not a zombie, and its command line is
// an imgfuse mount (so a recycled pid is not waited for).
func ServerRunning(pid int) bool {
	if pid <= 0 {
		return false
	}
	stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	// The state follows the parenthesised command name, which may itself
	// contain ") ".
	if i := bytes.LastIndexByte(stat, ')'); i >= 0 && i+2 < len(stat) && stat[i+2] == 'Z' {
		return false
	}
	cmdline, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	if err != nil {
		return false
	}
	return isImgfuseMountCmdline(cmdline)
}

// isImgfuseMountCmdline checks a NUL-separated /proc/PID/cmdline.
func isImgfuseMountCmdline(cmdline []byte) bool {
	args := strings.Split(strings.TrimRight(string(cmdline), "\x00"), "\x00")
	if len(args) < 2 || !strings.Contains(filepath.Base(args[0]), "imgfuse") {
		return false
	}
	for _, a := range args[1:] {
		if a == "mount" || a == "demo" {
			return true
		}
	}
	return false
}

// Abort aborts the FUSE connection behind e (root only), failing
// every pending and future request with ENOTCONN. It frees processes stuck
// waiting on a server that will never answer.
func Abort(e *Entry) {
	if e.Major != 0 {
		return
	}
	_ = os.WriteFile("/sys/fs/fuse/connections/"+strconv.Itoa(e.Minor)+"/abort", []byte("1"), 0)
}

// OverlayPrefix starts the name of every temporary overlay: a state file
// naming anything else as a temporary overlay is not trusted with a
// removal.
const OverlayPrefix = "imgfuse-overlay-"

// IsTempOverlay reports whether path may be removed as a temporary
// overlay recorded in a state file.
func IsTempOverlay(path string) bool {
	return filepath.IsAbs(path) && strings.HasPrefix(filepath.Base(path), OverlayPrefix) &&
		strings.HasSuffix(path, ".qcow2")
}

// RemoveStale removes the state file of a server that is gone, its
// --pidfile if that still holds its pid (a stale pid file could make a
// script signal whatever process gets the pid next), and the temporary
// overlay it recorded; it returns the overlay removed, if any.
func RemoveStale(dir, mp string, st State) string {
	os.Remove(StatePath(dir, mp))
	if st.PIDFile != "" {
		if b, err := os.ReadFile(st.PIDFile); err == nil && strings.TrimSpace(string(b)) == strconv.Itoa(st.PID) {
			os.Remove(st.PIDFile)
		}
	}
	if st.OverlayTemporary && IsTempOverlay(st.Overlay) && os.Remove(st.Overlay) == nil {
		return st.Overlay
	}
	return ""
}
