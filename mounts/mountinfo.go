package mounts

import (
	"path/filepath"
	"strconv"
	"strings"

	"github.com/moby/sys/mountinfo"
)

// Entry is one line of the mount table (/proc/thread-self/mountinfo),
// parsed and unescaped (\040 for a space) by moby/sys/mountinfo.
type Entry = mountinfo.Info

// Read returns the mount table of this process's mount namespace,
// filtered by f (nil for every mount), in mountinfo order: a mount comes
// after the mounts it covers.
func Read(f mountinfo.FilterFunc) ([]*Entry, error) {
	return mountinfo.GetMounts(f)
}

// Find returns the last (topmost) mount at mountpoint, which must be
// an absolute, symlink-free path.
func Find(mountpoint string) (*Entry, bool, error) {
	entries, err := Read(func(m *mountinfo.Info) (skip, stop bool) {
		return m.Mountpoint != mountpoint, false
	})
	if err != nil || len(entries) == 0 {
		return nil, false, err
	}
	return entries[len(entries)-1], true, nil
}

// CanonicalPath makes p absolute and resolves symlinks. When p itself
// cannot be resolved (a dead FUSE mount answers ENOTCONN), only its parent
// directory is resolved, which is what the kernel recorded in mountinfo.
func CanonicalPath(p string) (string, error) {
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

// Owner returns the uid a FUSE mount was made by (its user_id
// option), if the entry says.
func Owner(e *Entry) (int, bool) {
	for _, o := range strings.Split(e.VFSOptions, ",") {
		if v, ok := strings.CutPrefix(o, "user_id="); ok {
			uid, err := strconv.Atoi(v)
			return uid, err == nil
		}
	}
	return 0, false
}
