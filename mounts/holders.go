package mounts

import (
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"

	"imgfuse/imgtool"
)

// Who keeps a mount busy. When umount fails with EBUSY, `unmount` (and the
// server, when a signal asks it to stop) names the holders and how to let
// go of each: a loop device attached to the disk, a process with a file of
// the mount open, mapped, or as its working or root directory, a mount on
// top of the disk.
//
// Nothing here touches the mount itself: a busy FUSE mount may be served by
// this very process (the server logs its holders), and a stat or open
// there would wait for an answer that only this process can give. Every
// check reads /proc and /sys instead: readlink of /proc/PID/{fd/*,cwd,root}
// (the kernel prints the path without asking the filesystem), the device
// numbers of /proc/PID/maps, /sys/block/loop*/loop/backing_file, and the
// mount table.

// holder is one user of a busy mount.
type holder struct {
	what string // "pid 1234 (fio) has MNT/disk open"
	fix  string // "stop it, or let it close the file"; a command to run, "umount /mnt/root"
}

// holderScan says where to look; tests point it at a fake tree.
type holderScan struct {
	proc, sys string // "/proc", "/sys"
	self      int    // a pid to skip (ours)
	mounts    []*Entry
}

// maxHolders bounds how many holders a message names.
const maxHolders = 6

// busyHolders returns the holders of the mount e, one of s.mounts.
// show turns a path under the mount into the user's spelling.
func (s holderScan) busyHolders(e *Entry, show func(string) string) []holder {
	mp := e.Mountpoint
	var out []holder
	out = append(out, s.loopHolders(mp, show)...)
	for _, m := range s.mounts {
		if under(m.Mountpoint, mp) && m.Mountpoint != mp {
			out = append(out, holder{
				what: fmt.Sprintf("a %s filesystem (%s) is mounted on %s", m.FSType, m.Source, show(m.Mountpoint)),
				fix:  "umount " + imgtool.ShellQuote(m.Mountpoint),
			})
		}
	}
	return append(out, s.processHolders(e, show)...)
}

// under reports whether path is mp or lies below it.
func under(path, mp string) bool {
	return path == mp || strings.HasPrefix(path, strings.TrimSuffix(mp, "/")+"/")
}

// loopHolders lists the loop devices whose backing file is under mp, with
// the mounts made from them (or from their partitions).
func (s holderScan) loopHolders(mp string, show func(string) string) []holder {
	names, _ := filepath.Glob(filepath.Join(s.sys, "block", "loop*", "loop", "backing_file"))
	sort.Strings(names)
	var out []holder
	for _, name := range names {
		b, err := os.ReadFile(name)
		if err != nil {
			continue // detached meanwhile
		}
		backing := strings.TrimSuffix(strings.TrimSuffix(string(b), "\n"), " (deleted)")
		if !under(backing, mp) {
			continue
		}
		sysDev := filepath.Dir(filepath.Dir(name))
		dev := "/dev/" + filepath.Base(sysDev)
		var on []string
		for _, m := range s.mounts {
			if m.Source == dev || strings.HasPrefix(m.Source, dev+"p") {
				on = append(on, m.Mountpoint)
			}
		}
		users, _ := os.ReadDir(filepath.Join(sysDev, "holders"))
		autoclear := readTrim(filepath.Join(sysDev, "loop", "autoclear")) == "1"
		h := holder{what: dev + " is attached to " + show(backing)}
		var fix []string
		switch {
		case len(on) > 0:
			h.what += " (mounted on " + strings.Join(on, ", ") + ")"
			for _, m := range on {
				fix = append(fix, "umount "+imgtool.ShellQuote(m))
			}
		case len(users) > 0:
			var u []string
			for _, d := range users {
				u = append(u, d.Name())
			}
			h.what += " (used by " + strings.Join(u, ", ") + ")"
			fix = append(fix, "stop using "+strings.Join(u, ", "))
		}
		if len(on) == 0 || !autoclear {
			fix = append(fix, "losetup -d "+dev)
		}
		h.fix = strings.Join(fix, " && ")
		out = append(out, h)
	}
	return out
}

// processHolders lists the processes with a file under e open or mapped,
// or with their working or root directory there.
func (s holderScan) processHolders(e *Entry, show func(string) string) []holder {
	ents, err := os.ReadDir(s.proc)
	if err != nil {
		return nil
	}
	mp := e.Mountpoint
	var out []holder
	for _, ent := range ents {
		pid, err := strconv.Atoi(ent.Name())
		if err != nil || pid == s.self {
			continue
		}
		dir := filepath.Join(s.proc, ent.Name())
		var uses []string
		files := false // a file open or mapped, not only a directory
		seen := map[string]bool{}
		use := func(u string) {
			if !seen[u] {
				seen[u] = true
				uses = append(uses, u)
			}
		}
		fds, _ := os.ReadDir(filepath.Join(dir, "fd"))
		for _, fd := range fds {
			if t, err := os.Readlink(filepath.Join(dir, "fd", fd.Name())); err == nil && under(t, mp) {
				use("has " + show(t) + " open")
				files = true
			}
		}
		if t, err := os.Readlink(filepath.Join(dir, "cwd")); err == nil && under(t, mp) {
			use("has its working directory in " + show(t))
		}
		if t, err := os.Readlink(filepath.Join(dir, "root")); err == nil && under(t, mp) && t != "/" {
			use("has its root directory in " + show(t))
		}
		for _, p := range mappedFiles(filepath.Join(dir, "maps"), e.Major, e.Minor) {
			use("has " + show(p) + " mapped in memory")
			files = true
		}
		if len(uses) == 0 {
			continue
		}
		who := "pid " + ent.Name()
		if comm := readTrim(filepath.Join(dir, "comm")); comm != "" {
			who += " (" + comm + ")"
		}
		h := holder{what: who + " " + strings.Join(uses, " and "), fix: "stop it, or let it close the file"}
		if !files {
			h.fix = "stop it, or let it change directory"
		}
		out = append(out, h)
	}
	return out
}

// mappedFiles returns the paths of the mappings in the /proc/PID/maps file
// maps whose device is major:minor, each once.
func mappedFiles(maps string, major, minor int) []string {
	b, err := os.ReadFile(maps)
	if err != nil {
		return nil
	}
	return parseMaps(string(b), fmt.Sprintf("%02x:%02x", major, minor))
}

// parseMaps returns the paths of the mappings of device dev ("00:2d", as
// proc(5) prints it) in the text of a maps file, each once:
//
//	7f2c4a000000-7f2c4a001000 r--s 00000000 00:2d 1    /mnt/img/disk
func parseMaps(text, dev string) []string {
	var out []string
	seen := map[string]bool{}
	for _, line := range strings.Split(text, "\n") {
		f := strings.Fields(line)
		if len(f) < 6 || f[3] != dev {
			continue
		}
		// The path is the rest of the line from its first '/' (no
		// field before it holds one); it may hold spaces.
		i := strings.IndexByte(line, '/')
		if i < 0 {
			continue
		}
		p := strings.TrimSuffix(line[i:], " (deleted)")
		if !seen[p] {
			seen[p] = true
			out = append(out, p)
		}
	}
	return out
}

// readTrim returns the contents of a small /proc or /sys file without its
// newline, "" if it cannot be read.
func readTrim(path string) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return ""
	}
	return strings.TrimSpace(string(b))
}

// describeHolders makes one line of hs: each holder and its fix,
// "/dev/loop3 is attached to m/disk (mounted on /mnt/root): umount /mnt/root".
func describeHolders(hs []holder) string {
	var parts []string
	for i, h := range hs {
		if i == maxHolders {
			parts = append(parts, fmt.Sprintf("and %d more", len(hs)-i))
			break
		}
		parts = append(parts, h.what+": "+h.fix)
	}
	return strings.Join(parts, "; ")
}
