package main

import (
	"bufio"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
)

// mountEntry is one line of /proc/self/mountinfo, the fields we use.
type mountEntry struct {
	Dev        string // "major:minor" of the mounted filesystem
	MountPoint string
	FSType     string
	Source     string
}

// readMountInfo parses a mountinfo file (proc(5)):
//
//	36 35 98:0 /mnt1 /mnt/parent rw,noatime master:1 - ext3 /dev/root rw
//
// Field 5 is the mount point; after the "-" separator come the filesystem
// type and the source. Paths are octal-escaped (\040 for a space).
func readMountInfo(path string) ([]mountEntry, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	var out []mountEntry
	sc := bufio.NewScanner(f)
	sc.Buffer(make([]byte, 64<<10), 1<<20)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		sep := -1
		for i, f := range fields {
			if f == "-" && i >= 6 {
				sep = i
				break
			}
		}
		if len(fields) < 5 || sep < 0 || sep+2 >= len(fields) {
			continue
		}
		out = append(out, mountEntry{
			Dev:        fields[2],
			MountPoint: unescapeMountInfo(fields[4]),
			FSType:     fields[sep+1],
			Source:     unescapeMountInfo(fields[sep+2]),
		})
	}
	if err := sc.Err(); err != nil {
		return nil, fmt.Errorf("%s: %w", path, err)
	}
	return out, nil
}

// unescapeMountInfo undoes the kernel's \ooo escapes of space, tab, newline
// and backslash.
func unescapeMountInfo(s string) string {
	if !strings.Contains(s, `\`) {
		return s
	}
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+4 <= len(s) {
			if v, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(v))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// findMount returns the last (topmost) mount at mountpoint, which must be
// an absolute, symlink-free path.
func findMount(mountpoint string) (mountEntry, bool, error) {
	entries, err := readMountInfo("/proc/self/mountinfo")
	if err != nil {
		return mountEntry{}, false, err
	}
	var found mountEntry
	ok := false
	for _, e := range entries {
		if e.MountPoint == mountpoint {
			found, ok = e, true
		}
	}
	return found, ok, nil
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
