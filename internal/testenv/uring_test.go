package testenv

import (
	"bytes"
	"os"
	"testing"
	"time"
)

// TestURingJoin: a second user of the FUSE-over-io_uring switch joins a
// first one that holds it (as bench/run --smoke does for minutes during
// the end-to-end tests) at once instead of waiting for it to finish, and
// the last one to leave puts the switch back as it found it.
func TestURingJoin(t *testing.T) {
	if _, err := os.Stat(URingParam); err != nil {
		Skip(t, "this kernel has no FUSE-over-io_uring: %v", err)
	}
	if os.Geteuid() != 0 {
		Skip(t, "turning on %s needs root", URingParam)
	}
	orig, err := os.ReadFile(URingParam)
	if err != nil {
		t.Fatal(err)
	}
	open := func() *os.File {
		f, err := os.OpenFile(URingLock, os.O_RDWR|os.O_CREATE, 0o600)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { f.Close() })
		return f
	}
	first, second := open(), open()
	if err := joinURing(int(first.Fd())); err != nil {
		t.Fatal(err)
	}
	joined := make(chan error, 1)
	go func() { joined <- joinURing(int(second.Fd())) }()
	select {
	case err := <-joined:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(10 * time.Second):
		leaveURing(int(first.Fd()))
		t.Fatal("the second user still waits for the first to finish after 10s")
	}
	on := func() bool {
		b, _ := os.ReadFile(URingParam)
		return string(bytes.TrimSpace(b)) == "Y"
	}
	if !on() {
		t.Fatalf("%s is not on with two users", URingParam)
	}
	if err := leaveURing(int(first.Fd())); err != nil {
		t.Fatal(err)
	}
	first.Close()
	if !on() {
		t.Fatalf("%s turned off while the second user still holds it", URingParam)
	}
	if err := leaveURing(int(second.Fd())); err != nil {
		t.Fatal(err)
	}
	if now, _ := os.ReadFile(URingParam); !bytes.Equal(bytes.TrimSpace(now), bytes.TrimSpace(orig)) && !otherUsers() {
		t.Errorf("%s is %q after the last user left, was %q", URingParam, bytes.TrimSpace(now), bytes.TrimSpace(orig))
	}
}

// otherUsers reports whether another process (a test binary running
// beside this one, bench/run) holds the switch, which then stays on.
func otherUsers() bool {
	b, _ := os.ReadFile(URingLock)
	return len(bytes.TrimSpace(b)) > 0
}
