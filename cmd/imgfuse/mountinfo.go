package main

import (
	"path/filepath"
	"strconv"
	"strings"

	"github.com/moby/sys/mountinfo"
)

// mountEntry is one line of the mount table (/proc/thread-self/mountinfo),
// parsed and unescaped (\040 for a space) by moby/sys/mountinfo.
type mountEntry = mountinfo.Info

// readMounts returns the mount table of this process's mount namespace,
// filtered by f (nil for every mount), in mountinfo order: a mount comes
// after the mounts it covers.
func readMounts(f mountinfo.FilterFunc) ([]*mountEntry, error) {
	return mountinfo.GetMounts(f)
}

// findMount returns the last (topmost) mount at mountpoint, which must be
// an absolute, symlink-free path.
func findMount(mountpoint string) (*mountEntry, bool, error) {
	entries, err := readMounts(func(m *mountinfo.Info) (skip, stop bool) {
		return m.Mountpoint != mountpoint, false
	})
	if err != nil || len(entries) == 0 {
		return nil, false, err
	}
	return entries[len(entries)-1], true, nil
}

// canonicalPath makes p absolute and resolves symlinks. When p itself
// cannot be resolved (a dead FUSE mount answers ENOTCONN), only its parent
// directory is resolved, which is what the kernel recorded in mountinfo.
func canonicalPath(p string) (string, error) {
	abs, err := filepath.Abs(p)
	if err != nil {
		return "", err
	}
	if r, err := filepath.EvalSymlinks(abs); err == nil {
		return r, nil
	}
	dir, err := filepath.EvalSymlinks(filepath.Dir(abs))
	if err != nil {
		return "", err
	}
	return filepath.Join(dir, filepath.Base(abs)), nil
}

// mountOwner returns the uid a FUSE mount was made by (its user_id
// option), if the entry says.
func mountOwner(e *mountEntry) (int, bool) {
	for _, o := range strings.Split(e.VFSOptions, ",") {
		if v, ok := strings.CutPrefix(o, "user_id="); ok {
			uid, err := strconv.Atoi(v)
			return uid, err == nil
		}
	}
	return 0, false
}
