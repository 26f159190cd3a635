package aio

import (
	"errors"
	"net"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// TestOpenRefusesSpecialFiles: Open and OpenHead refuse every file that is
// not a regular file or a block device, by kind, without blocking (a FIFO
// with no writer would block a plain open for ever), in every mode; a
// symlink to such a file is refused as what it points at.
func TestOpenRefusesSpecialFiles(t *testing.T) {
	dir := t.TempDir()
	fifo := filepath.Join(dir, "fifo")
	if err := unix.Mkfifo(fifo, 0o644); err != nil {
		t.Fatal(err)
	}
	sub := filepath.Join(dir, "dir")
	if err := os.Mkdir(sub, 0o755); err != nil {
		t.Fatal(err)
	}
	sock := filepath.Join(dir, "sock")
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	link := filepath.Join(dir, "link")
	if err := os.Symlink(fifo, link); err != nil {
		t.Fatal(err)
	}
	reg := filepath.Join(dir, "reg")
	if err := os.WriteFile(reg, make([]byte, 8192), 0o644); err != nil {
		t.Fatal(err)
	}
	cases := []struct{ path, kind string }{
		{fifo, "a FIFO"},
		{link, "a FIFO"},
		{"/dev/zero", "a character device"},
		{"/dev/null", "a character device"},
		{sub, "a directory"},
		{sock, "a socket"},
	}
	modes := []struct {
		name string
		open func(path string) error
	}{
		{"read-write", func(p string) error { return closeIfOpen(Open(p, Options{})) }},
		{"read-only", func(p string) error { return closeIfOpen(Open(p, Options{ReadOnly: true})) }},
		{"buffered", func(p string) error { return closeIfOpen(Open(p, Options{NoDirectIO: true, NoLock: true})) }},
		{"head", func(p string) error {
			f, err := OpenHead(p)
			if err == nil {
				f.Close()
			}
			return err
		}},
	}
	for _, c := range cases {
		for _, m := range modes {
			done := make(chan error, 1)
			go func() { done <- m.open(c.path) }()
			select {
			case err := <-done:
				var ne *NotImageError
				if !errors.As(err, &ne) || !errors.Is(err, ErrNotImage) || ne.Kind != c.kind {
					t.Errorf("%s %s: got %v, want a NotImageError for %s", m.name, c.path, err, c.kind)
				} else if msg := err.Error(); !strings.Contains(msg, c.path) || strings.Contains(msg, "\n") {
					t.Errorf("%s %s: message %q does not name the path on one line", m.name, c.path, msg)
				}
			case <-time.After(5 * time.Second):
				t.Fatalf("%s %s: open blocked for 5 s", m.name, c.path)
			}
		}
	}
	// Positive control: a regular file opens, and blocking I/O is back on.
	f, err := Open(reg, Options{NoLock: true})
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	fl, err := unix.FcntlInt(uintptr(f.fd), unix.F_GETFL, 0)
	if err != nil || fl&unix.O_NONBLOCK != 0 {
		t.Errorf("regular file left with flags %#x (err %v): O_NONBLOCK not cleared", fl, err)
	}
	h, err := OpenHead(reg)
	if err != nil {
		t.Fatal(err)
	}
	h.Close()
}

func closeIfOpen(f *File, err error) error {
	if err == nil {
		f.Close()
	}
	return err
}
