package main

import (
	"bytes"
	"crypto/sha256"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"imgfuse/drivers"
	"imgfuse/drivers/driverstest"
)

// fileSums returns the SHA-256 of each file, to show a refusal changed
// nothing.
func fileSums(t *testing.T, paths ...string) map[string][32]byte {
	t.Helper()
	sums := map[string][32]byte{}
	for _, p := range paths {
		b, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		sums[p] = sha256.Sum256(b)
	}
	return sums
}

// TestMountpointFileRules: a regular-file mountpoint obeys the rules of a
// directory (not empty: refused unless --nonempty), and one that is a
// file of the image's chain — the image, its backing file, its external
// data file, reached directly, through a hard link or a symbolic link —
// is refused even with --nonempty, saying which file it is. Every
// refusal is exit 7 before a daemon starts, and changes no file.
func TestMountpointFileRules(t *testing.T) {
	driverstest.RequireTools(t, "qemu-img")
	dir := t.TempDir()
	base := filepath.Join(dir, "base.qcow2")
	top := filepath.Join(dir, "top.qcow2")
	data := filepath.Join(dir, "data.raw")
	ext := filepath.Join(dir, "ext.qcow2")
	driverstest.Cmd(t, "qemu-img", "create", "-q", "-f", "qcow2", base, "1M")
	driverstest.Cmd(t, "qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top)
	driverstest.Cmd(t, "qemu-img", "create", "-q", "-f", "qcow2", "-o", "data_file="+data, ext, "1M")
	hard := filepath.Join(dir, "hard")
	if err := os.Link(base, hard); err != nil {
		t.Fatal(err)
	}
	sym := filepath.Join(dir, "sym")
	if err := os.Symlink("base.qcow2", sym); err != nil {
		t.Fatal(err)
	}
	topLink := filepath.Join(dir, "top-link.qcow2")
	if err := os.Symlink("top.qcow2", topLink); err != nil {
		t.Fatal(err)
	}
	notes := filepath.Join(dir, "notes.txt")
	if err := os.WriteFile(notes, []byte("keep me\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	empty := filepath.Join(dir, "empty")
	writeFile(t, empty, 0)
	sums := fileSums(t, base, top, data, ext, notes)

	backingOfTop := "is the backing file of " + top + " (" + base + ")"
	refused := []struct {
		name string
		args []string
		want string
	}{
		{"non-empty file", []string{top, notes}, "mountpoint " + notes + " is a file of 8 bytes; the mount would hide its contents: choose an empty file or a directory, or give --nonempty"},
		{"the image", []string{"--nonempty", top, top}, "mountpoint " + top + " is the image itself: "},
		{"the image through a symlink", []string{"--nonempty", "-r", topLink, top}, "mountpoint " + top + " is the image itself"},
		{"the backing file", []string{"-r", top, base}, "mountpoint " + base + " " + backingOfTop},
		{"the backing file, --nonempty", []string{"--nonempty", "-r", top, base}, backingOfTop},
		{"the backing file's hard link", []string{"--nonempty", top, hard}, "mountpoint " + hard + " " + backingOfTop},
		{"the backing file's symlink", []string{"--nonempty", top, sym}, "mountpoint " + sym + " " + backingOfTop},
		{"the backing file of an overlay mount", []string{"--nonempty", "--overlay", top, base}, backingOfTop},
		{"the data file", []string{"--nonempty", ext, data}, "is the external data file of " + ext + " (" + data + ")"},
	}
	for _, c := range refused {
		t.Run(c.name, func(t *testing.T) {
			code, _, stderr := runCLI(t, append([]string{"mount"}, c.args...)...)
			if code != exitMount {
				t.Errorf("exit %d, want %d; stderr %q", code, exitMount, stderr)
			}
			if !strings.Contains(stderr, c.want) || strings.Count(stderr, "\n") != 1 || strings.Count(stderr, "imgfuse: ") != 1 {
				t.Errorf("stderr %q: want one line, one prefix, containing %q", stderr, c.want)
			}
			if c.name != "non-empty file" && !strings.Contains(stderr, "--nonempty does not allow this") {
				t.Errorf("stderr %q does not say --nonempty cannot help", stderr)
			}
			assertNotMounted(t, c.args[len(c.args)-1])
		})
	}
	if got := fileSums(t, base, top, data, ext, notes); fmt.Sprint(got) != fmt.Sprint(sums) {
		t.Error("a refused mount changed a file")
	}

	// Allowed (checked without mounting): an empty file, and a non-empty
	// one with --nonempty.
	for _, o := range []*mountOptions{
		{image: top, mountpoint: empty, format: "auto"},
		{image: top, mountpoint: notes, format: "auto", nonEmpty: true},
	} {
		if err := o.validate(); err != nil {
			t.Errorf("validate %s on %s (nonempty %v): %v", o.image, o.mountpoint, o.nonEmpty, err)
		}
	}
}

func TestSplitWarnings(t *testing.T) {
	for _, c := range []struct {
		in, rest string
		warnings []string
	}{
		{readyOK, readyOK, nil},
		{"W warning: a\nW warning: b\n" + readyOK, readyOK, []string{"warning: a", "warning: b"}},
		{"W warning: a\nE6 open x: bad", "E6 open x: bad", []string{"warning: a"}},
		{"", "", nil},
		{"W cut short", "W cut short", nil}, // no newline: not a whole warning
	} {
		rest, w := splitWarnings(c.in)
		if rest != c.rest || fmt.Sprint(w) != fmt.Sprint(c.warnings) {
			t.Errorf("splitWarnings(%q) = %q, %q; want %q, %q", c.in, rest, w, c.rest, c.warnings)
		}
	}
}

func TestDamageWarning(t *testing.T) {
	cause := fmt.Errorf("L1 entry 3: L2 table offset 0x60000 is past the end of the file (300000 bytes): %w", drivers.ErrCorrupt)
	got := damageWarning("t.qcow2", &drivers.DamageError{Format: "qcow2", Path: "t.qcow2", Err: cause})
	want := "warning: t.qcow2: L1 entry 3: L2 table offset 0x60000 is past the end of the file (300000 bytes): image is corrupt; " +
		"reads of the damaged range fail with EIO; run 'imgfuse check t.qcow2' for a full report"
	if got != want {
		t.Errorf("damageWarning:\n got %q\nwant %q", got, want)
	}
	got = damageWarning("top.qcow2", &drivers.DamageError{Format: "qcow2", Path: "/d/my base\n.qcow2", Err: cause})
	if !strings.Contains(got, "warning: /d/my base .qcow2 (in the backing chain of top.qcow2): L1 entry 3") ||
		!strings.Contains(got, "run 'imgfuse check '/d/my base .qcow2''") || strings.Contains(got, "\n") {
		t.Errorf("damageWarning of a backing file: %q", got)
	}
}

// TestStatusIOErrors: the I/O errors and the log a server records reach
// status, in JSON (io-errors, last-io-error with offset and cause, log)
// and in the table (the count, the log, a line with the last error).
func TestStatusIOErrors(t *testing.T) {
	dir := t.TempDir()
	off := int64(0x60000000)
	when := time.Date(2026, 12, 7, 16, 0, 0, 0, time.UTC)
	st := daemonState{PID: 1 << 30, Image: "/t.qcow2", Mountpoint: "/mnt/t", Format: "qcow2", Started: when,
		Log: "/run/imgfuse/x.log", IOErrors: 3,
		LastIOError: &ioErrorState{Time: when, Operation: "read", Offset: &off, Cause: "qcow2: /t.qcow2: L1 entry 3: past the end"}}
	if _, err := writeState(dir, st); err != nil {
		t.Fatal(err)
	}
	entries, err := listStatus(dir)
	if err != nil || len(entries) != 1 {
		t.Fatalf("listStatus: %+v, %v", entries, err)
	}
	b, err := json.Marshal(entries)
	if err != nil {
		t.Fatal(err)
	}
	var back []map[string]any
	if err := json.Unmarshal(b, &back); err != nil {
		t.Fatal(err)
	}
	e := back[0]
	last, _ := e["last-io-error"].(map[string]any)
	if e["io-errors"] != float64(3) || e["log"] != "/run/imgfuse/x.log" || last == nil ||
		last["offset"] != float64(off) || last["operation"] != "read" || last["cause"] != st.LastIOError.Cause ||
		last["time"] != "2026-12-07T16:00:00Z" {
		t.Errorf("JSON entry: %s", b)
	}
	var out bytes.Buffer
	if err := printStatus(&out, entries); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"IO-ERRORS", "LOG", "/run/imgfuse/x.log",
		"/mnt/t: 3 I/O error(s); the last at 2026-12-07T16:00:00Z: read at disk offset 0x60000000: qcow2: /t.qcow2: L1 entry 3: past the end"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("table lacks %q:\n%s", want, out.String())
		}
	}

	// A mount without errors: 0, null, and the table says 0.
	st2 := daemonState{PID: 1 << 30, Image: "/u.raw", Mountpoint: "/mnt/u", Format: "raw", Started: when}
	if _, err := writeState(dir, st2); err != nil {
		t.Fatal(err)
	}
	entries, _ = listStatus(dir)
	b, _ = json.Marshal(entries[1])
	if !bytes.Contains(b, []byte(`"io-errors":0,"last-io-error":null,"log":null`)) {
		t.Errorf("entry without errors: %s", b)
	}
}

// TestBoundedLog: the default log is rotated once it would pass its
// bound, keeping one previous file; nothing written is lost across the
// rotation, and the files stay bounded.
func TestBoundedLog(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "x.log")
	f, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	b := newBoundedLog(f, path, 100, nil)
	defer func() { b.f.Close() }()
	line := strings.Repeat("x", 39) + "\n" // 40 bytes
	for i := range 7 {
		if _, err := fmt.Fprintf(b, "%d%s", i, line[1:]); err != nil {
			t.Fatal(err)
		}
	}
	cur, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	prev, err := os.ReadFile(path + ".1")
	if err != nil {
		t.Fatal(err)
	}
	// 40-byte lines, 100-byte bound: two lines a file; lines 0-3 went
	// to rotated files (the first of them replaced), 4-5 to .1, 6 here.
	if !strings.HasPrefix(string(prev), "4") || len(prev) != 80 || !strings.HasPrefix(string(cur), "6") || len(cur) != 40 {
		t.Errorf("after 7 lines: %s.1 = %q, %s = %q", path, prev, path, cur)
	}
	// A log that cannot be rotated keeps growing rather than losing lines.
	if err := os.Remove(path); err != nil {
		t.Fatal(err)
	}
	for range 3 {
		if _, err := fmt.Fprint(b, line); err != nil {
			t.Errorf("write when the rotation fails: %v", err)
		}
	}
	if b.size != 40+120 {
		t.Errorf("the log holds %d bytes after a failed rotation, want 160", b.size)
	}
}

// TestPruneDefaultLogs: old logs of mountpoints without a server go; a
// recent one, one whose server has a state file, and files that are not
// logs stay.
func TestPruneDefaultLogs(t *testing.T) {
	dir := t.TempDir()
	old := time.Now().Add(-8 * 24 * time.Hour)
	files := map[string]bool{ // name: kept
		"aaaa.log": false, "aaaa.log.1": false, // old, no server
		"bbbb.log": true, "bbbb.json": true, // old, but its server's state is there
		"cccc.log": true,                     // recent
		"dddd.txt": true, "eeee.log.2": true, // not ours
	}
	for name := range files {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte("x"), 0o600); err != nil {
			t.Fatal(err)
		}
		if name != "cccc.log" {
			if err := os.Chtimes(p, old, old); err != nil {
				t.Fatal(err)
			}
		}
	}
	pruneDefaultLogs(dir, time.Now().Add(-defaultLogKeep))
	for name, kept := range files {
		_, err := os.Stat(filepath.Join(dir, name))
		if (err == nil) != kept {
			t.Errorf("%s: kept %v, want %v", name, err == nil, kept)
		}
	}
}
