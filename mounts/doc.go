// Package mounts is the registry of imgfuse mounts and what acts on them
// from outside the server: the mount table (mountinfo), the state files
// each server keeps (one JSON file per mount in the state directory,
// named by the SHA-256 of the canonical mountpoint), the servers' default
// logs beside them, status, the scan for what holds a busy mount, and
// unmount with its abort of a dead connection.
//
// State directory: /run/imgfuse for root; for a user
// $XDG_RUNTIME_DIR/imgfuse, else /run/user/UID/imgfuse if that exists,
// else /tmp/imgfuse-UID (never $TMPDIR: every command of a user must find
// the same directory). A directory another user owns or may write is
// refused (CheckStateDir), since Unmount trusts the pids and overlay
// names in it. A state file names the server's pid; Unmount waits for it
// to exit, checking /proc/PID/cmdline so that a recycled pid is not
// waited for, and reports the close error a server left in its file.
//
// Holders (holders.go) are found from /proc, /sys and the mount table
// only: a stat or open inside a busy FUSE mount from the process that
// serves it would wait for itself, and the server calls BusyReason too.
//
// Unmount never matches an error's text: fusermount3 says "busy" in words
// only, so a failed 'fusermount3 -u' of a mount that is still there and
// answering is taken as EBUSY (the caller has checked it owns the mount).
//
// Concurrency: none. Every function reads or writes files and returns;
// state files are replaced by rename, so a reader sees the old or the new
// file whole.
package mounts
