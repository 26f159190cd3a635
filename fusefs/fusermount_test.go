package fusefs

import (
	"bytes"
	"errors"
	"os"
	"os/exec"
	"strings"
	"testing"

	"golang.org/x/sys/unix"
)

// TestFusermountError: fusermount3's lines become the error, on one line
// and without the helper's directory; other output is handed back; an
// error without such lines is left alone.
func TestFusermountError(t *testing.T) {
	goFuse := errors.New("fusermount exited with code 256\n")
	for _, tc := range []struct {
		name, out, msg, rest string
	}{
		{"mountpoint", "/usr/bin/fusermount3: user has no write access to mountpoint /m\n",
			"fusermount3: user has no write access to mountpoint /m", ""},
		{"/dev/fuse", "fusermount3: failed to open /dev/fuse: Permission denied\n",
			"fusermount3: failed to open /dev/fuse: Permission denied", ""},
		{"two lines and others", "log line\n/bin/fusermount: a\nfusermount3: b\nmore",
			"fusermount: a; fusermount3: b", "log line\nmore"},
		{"no fusermount", "something else: happened\n", "", "something else: happened\n"},
		{"no message", "", "", ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err, rest := fusermountError(goFuse, []byte(tc.out))
			var fe *FusermountError
			switch {
			case tc.msg == "" && err != goFuse:
				t.Errorf("got %v, want go-fuse's error as it is", err)
			case tc.msg != "" && (!errors.As(err, &fe) || fe.Msg != tc.msg || err.Error() != tc.msg):
				t.Errorf("got %q, want %q", err, tc.msg)
			case tc.msg != "" && !errors.Is(err, goFuse):
				t.Errorf("%v does not wrap go-fuse's error", err)
			}
			if string(rest) != tc.rest {
				t.Errorf("rest %q, want %q", rest, tc.rest)
			}
		})
	}
}

// TestCaptureStderr: what this process and a child write to descriptor 2
// during a capture is captured, and descriptor 2 is the original file
// again afterwards.
func TestCaptureStderr(t *testing.T) {
	var before, after unix.Stat_t
	if err := unix.Fstat(2, &before); err != nil {
		t.Fatal(err)
	}
	c, err := captureStderr()
	if err != nil {
		t.Fatal(err)
	}
	fmtErr := func() error {
		_, err := os.Stderr.WriteString("from the process\n")
		return err
	}()
	// As go-fuse runs fusermount3: the child inherits os.Stderr.
	cmd := exec.Command("sh", "-c", "echo from the child >&2")
	cmd.Stderr = os.Stderr
	runErr := cmd.Run()
	out := c.stop()
	if fmtErr != nil || runErr != nil {
		t.Fatal(fmtErr, runErr)
	}
	if want := "from the process\nfrom the child\n"; string(out) != want {
		t.Errorf("captured %q, want %q", out, want)
	}
	if err := unix.Fstat(2, &after); err != nil {
		t.Fatal(err)
	}
	if before.Dev != after.Dev || before.Ino != after.Ino {
		t.Errorf("descriptor 2 is not the original file after the capture")
	}
}

// FuzzFusermountError: whatever was written to stderr during a mount, the
// error is one line, and nothing written is lost: every line is either in
// the message or handed back.
func FuzzFusermountError(f *testing.F) {
	f.Add([]byte("/usr/bin/fusermount3: user has no write access to mountpoint /m\n"))
	f.Add([]byte("x\nfusermount: a\r\nfusermount3:\n: b\n/fusermount3: c"))
	goFuse := errors.New("fusermount exited with code 256\n")
	f.Fuzz(func(t *testing.T, out []byte) {
		err, rest := fusermountError(goFuse, out)
		var fe *FusermountError
		if !errors.As(err, &fe) {
			if err != goFuse || !bytes.Equal(rest, out) {
				t.Fatalf("no fusermount lines, yet got %v and rest %q", err, rest)
			}
			return
		}
		if strings.ContainsAny(fe.Msg, "\n") || fe.Msg == "" {
			t.Fatalf("message %q is not one line", fe.Msg)
		}
		if len(rest) >= len(out) {
			t.Fatalf("rest %q keeps everything of %q", rest, out)
		}
	})
}
