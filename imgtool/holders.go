package imgtool

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"github.com/moby/sys/mountinfo"

	"imgfuse/aio"
)

// Who holds an image's lock. QEMU's locks are OFD locks, which
// /proc/locks shows without a pid (-1), so the holders are found as the
// processes with the file open (/proc/PID/fd). Only readlink is used:
// stat on a descriptor that points into a FUSE mount could wait on its
// server.

// lockHolder is a process that has a locked image open.
type lockHolder struct {
	pid  int
	name string // comm, or for an imgfuse server "imgfuse"
	// mountpoint is the mount an imgfuse server serves, from its
	// command line ("" for other processes); mounted says whether it is
	// still in the mount table.
	mountpoint string
	mounted    bool
}

// lockHint is the end of the message of a lock conflict on file: who
// holds it, and the way out. An imgfuse server whose mount is gone is
// still closing the image (a plain umount returns before that): wait for
// it, or unmount with 'imgfuse unmount', which waits.
func lockHint(file string) string {
	hs := findLockHolders("/proc", file, os.Getpid())
	if len(hs) == 0 {
		return ForceShareHint
	}
	var parts []string
	closing := false
	for _, h := range hs {
		switch {
		case h.mountpoint != "" && !h.mounted:
			closing = true
			parts = append(parts, fmt.Sprintf("held by imgfuse (pid %d), which is still closing the image after %s was unmounted: "+
				"wait for it to exit, and unmount with 'imgfuse unmount', which waits for that", h.pid, h.mountpoint))
		case h.mountpoint != "":
			parts = append(parts, fmt.Sprintf("held by the imgfuse mount at %s (pid %d): 'imgfuse unmount %s' first",
				h.mountpoint, h.pid, ShellQuote(h.mountpoint)))
		default:
			parts = append(parts, fmt.Sprintf("held by pid %d (%s)", h.pid, h.name))
		}
	}
	if !closing {
		parts = append(parts, ForceShareHint)
	}
	return strings.Join(parts, "; ")
}

// lockedFile is the file whose lock err failed to get (a backing file's,
// perhaps), else image.
func lockedFile(image string, err error) string {
	var le *aio.LockError
	if errors.As(err, &le) && le.File != "" {
		return le.File
	}
	return image
}

// findLockHolders lists the processes under proc (but self) with file
// open.
func findLockHolders(proc, file string, self int) []lockHolder {
	target, err := filepath.Abs(file)
	if err != nil {
		return nil
	}
	if r, err := filepath.EvalSymlinks(target); err == nil {
		target = r
	}
	ents, err := os.ReadDir(proc)
	if err != nil {
		return nil
	}
	var mounts map[string]bool
	var hs []lockHolder
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == self {
			continue
		}
		fds, err := os.ReadDir(filepath.Join(proc, e.Name(), "fd"))
		if err != nil {
			continue
		}
		open := false
		for _, fd := range fds {
			if l, err := os.Readlink(filepath.Join(proc, e.Name(), "fd", fd.Name())); err == nil && l == target {
				open = true
				break
			}
		}
		if !open {
			continue
		}
		h := lockHolder{pid: pid, name: "?"}
		if b, err := os.ReadFile(filepath.Join(proc, e.Name(), "comm")); err == nil {
			h.name = strings.TrimSpace(string(b))
		}
		if cmdline, err := os.ReadFile(filepath.Join(proc, e.Name(), "cmdline")); err == nil {
			if mp, ok := serverMountpoint(cmdline); ok {
				if mounts == nil {
					mounts = map[string]bool{}
					if ms, err := mountinfo.GetMounts(nil); err == nil {
						for _, m := range ms {
							mounts[m.Mountpoint] = true
						}
					}
				}
				h.name, h.mountpoint, h.mounted = "imgfuse", mp, mounts[mp]
			}
		}
		hs = append(hs, h)
	}
	return hs
}

// serverMountpoint returns the mountpoint of an imgfuse mount server from
// its NUL-separated command line: "BINARY mount -- IMAGE MOUNTPOINT", as
// session.Start runs it (whatever the binary is called).
func serverMountpoint(cmdline []byte) (string, bool) {
	args := strings.Split(string(bytes.TrimRight(cmdline, "\x00")), "\x00")
	if len(args) != 5 || args[1] != "mount" || args[2] != "--" {
		return "", false
	}
	return args[4], true
}
