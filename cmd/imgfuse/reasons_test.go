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

	"imgfuse/drivers/driverstest"
	"imgfuse/imgtool"
	"imgfuse/mounts"
	"imgfuse/session"
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
			if code != imgtool.ExitMount {
				t.Errorf("exit %d, want %d; stderr %q", code, imgtool.ExitMount, stderr)
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
	for _, o := range []*session.Options{
		{Image: top, Mountpoint: empty, Format: "auto"},
		{Image: top, Mountpoint: notes, Format: "auto", NonEmpty: true},
	} {
		if err := o.Validate(); err != nil {
			t.Errorf("validate %s on %s (nonempty %v): %v", o.Image, o.Mountpoint, o.NonEmpty, err)
		}
	}
}

// TestStatusIOErrors: the I/O errors and the log a server records reach
// status, in JSON (io-errors, last-io-error with offset and cause, log)
// and in the table (the count, the log, a line with the last error).
func TestStatusIOErrors(t *testing.T) {
	dir := t.TempDir()
	off := int64(0x60000000)
	when := time.Date(2026, 12, 7, 16, 0, 0, 0, time.UTC)
	st := mounts.State{PID: 1 << 30, Image: "/t.qcow2", Mountpoint: "/mnt/t", Format: "qcow2", Started: when,
		Log: "/run/imgfuse/x.log", IOErrors: 3,
		LastIOError: &mounts.IOErrorState{Time: when, Operation: "read", Offset: &off, Cause: "qcow2: /t.qcow2: L1 entry 3: past the end"}}
	if _, err := mounts.WriteState(dir, st); err != nil {
		t.Fatal(err)
	}
	entries, err := mounts.List(dir)
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
	if err := mounts.PrintStatus(&out, entries); err != nil {
		t.Fatal(err)
	}
	for _, want := range []string{"IO-ERRORS", "LOG", "/run/imgfuse/x.log",
		"/mnt/t: 3 I/O error(s); the last at 2026-12-07T16:00:00Z: read at disk offset 0x60000000: qcow2: /t.qcow2: L1 entry 3: past the end"} {
		if !strings.Contains(out.String(), want) {
			t.Errorf("table lacks %q:\n%s", want, out.String())
		}
	}

	// A mount without errors: 0, null, and the table says 0.
	st2 := mounts.State{PID: 1 << 30, Image: "/u.raw", Mountpoint: "/mnt/u", Format: "raw", Started: when}
	if _, err := mounts.WriteState(dir, st2); err != nil {
		t.Fatal(err)
	}
	entries, _ = mounts.List(dir)
	b, _ = json.Marshal(entries[1])
	if !bytes.Contains(b, []byte(`"io-errors":0,"last-io-error":null,"log":null`)) {
		t.Errorf("entry without errors: %s", b)
	}
}
