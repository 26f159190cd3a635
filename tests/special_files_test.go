package tests

import (
	"bytes"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// TestSpecialFiles: an image or backing file that is not a regular file or
// a block device (a FIFO, a character device, a directory, a socket, a
// symlink to a FIFO) makes `imgfuse info` and `imgfuse mount` (writable
// and read-only) fail within seconds with a one-line message, leaving no
// mount. A FIFO used to block both for ever, before any daemon existed.
func TestSpecialFiles(t *testing.T) {
	requireE2E(t)
	t.Parallel()
	dir := t.TempDir()
	fifo := filepath.Join(dir, "fifo")
	if err := unix.Mkfifo(fifo, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(fifo, filepath.Join(dir, "link")); err != nil {
		t.Fatal(err)
	}
	if err := os.Mkdir(filepath.Join(dir, "dir"), 0o755); err != nil {
		t.Fatal(err)
	}
	l, err := net.Listen("unix", filepath.Join(dir, "sock"))
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	overlay := func(name, backing, fmtName string) string {
		p := filepath.Join(dir, name)
		args := []string{"create", "-q", "-f", "qcow2", "-u", "-b", backing, "-F", "raw", p, "1M"}
		if fmtName != "" {
			args[len(args)-3] = fmtName
		}
		if out, err := exec.Command("qemu-img", args...).CombinedOutput(); err != nil {
			t.Fatalf("qemu-img %v: %v\n%s", args, err, out)
		}
		return p
	}
	overlay("fifo-backing.qcow2", fifo, "")
	overlay("zero-backing.qcow2", "/dev/zero", "qcow2")
	// A backing file whose format is probed: drop the backing-format
	// extension by renaming its type to one readers skip.
	probed := overlay("fifo-backing-probed.qcow2", fifo, "")
	b, err := os.ReadFile(probed)
	if err != nil {
		t.Fatal(err)
	}
	i := bytes.Index(b[:65536], []byte{0xe2, 0x79, 0x2a, 0xca})
	if i < 0 {
		t.Fatal("no backing-format extension in the overlay")
	}
	copy(b[i:], []byte{0x12, 0x34, 0x56, 0x78})
	if err := os.WriteFile(probed, b, 0o644); err != nil {
		t.Fatal(err)
	}

	for _, c := range []struct{ image, kind string }{
		{fifo, "a FIFO"},
		{filepath.Join(dir, "link"), "a FIFO"},
		{"/dev/zero", "a character device"},
		{filepath.Join(dir, "dir"), "a directory"},
		{filepath.Join(dir, "sock"), "a socket"},
		{filepath.Join(dir, "fifo-backing.qcow2"), "a FIFO"},
		{probed, "a FIFO"},
		{filepath.Join(dir, "zero-backing.qcow2"), "a character device"},
	} {
		for _, args := range [][]string{
			{"info", c.image},
			{"info", "--format", "raw", c.image},
			{"mount", c.image},
			{"mount", "--read-only", c.image},
			{"mount", "--format", "raw", c.image},
		} {
			var mp string
			if args[0] == "mount" {
				mp = newMountpoint(t, false)
				args = append(args, mp)
			}
			if strings.HasSuffix(c.image, ".qcow2") && strings.Contains(strings.Join(args, " "), "--format raw") {
				continue // a qcow2 file opened as raw has no backing file
			}
			start := time.Now()
			r := imgfuse(t, nil, args...)
			took := time.Since(start)
			msg := strings.TrimSpace(r.stderr)
			want := "is " + c.kind + ", not a regular file or block device"
			if took > 10*time.Second {
				t.Errorf("imgfuse %v took %v", args, took)
			}
			switch {
			case r.code == 0 && args[0] == "info" && strings.HasSuffix(c.image, ".qcow2"):
				// info describes what it can of a chain: the
				// overlay, then the backing file it cannot open.
				if !strings.Contains(r.stdout, want) {
					t.Errorf("imgfuse %v: the backing file's entry does not say it %s:\n%s", args, want, r.stdout)
				}
			case r.code == 0:
				t.Errorf("imgfuse %v succeeded", args)
			case r.code != 0 && (!strings.Contains(msg, want) || strings.Contains(msg, "\n")):
				t.Errorf("imgfuse %v: want a one-line message saying the file is %s, got %q", args, c.kind, msg)
			}
			if mp != "" && mounted(t, mp) {
				t.Errorf("imgfuse %v left %s mounted", args, mp)
			}
		}
	}
}
