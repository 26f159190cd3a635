package main

import (
	"bytes"
	"errors"
	"fmt"
	"log"
	"os"
	"strings"
	"syscall"
	"testing"
	"time"

	"imgfuse/coroutine"
	"imgfuse/drivers"
)

// closeDriver is a drivers.Driver that only records Flush and Close.
type closeDriver struct {
	drivers.Driver // nil: any other method panics
	flushErr       error
	closeErr       error
	calls          []string
}

func (d *closeDriver) Flush(co *coroutine.Co) error {
	d.calls = append(d.calls, "flush")
	return d.flushErr
}

func (d *closeDriver) Close() error {
	d.calls = append(d.calls, "close")
	return d.closeErr
}

// TestCloseImage: the server flushes then closes the image at the end, and
// closes it even when the flush fails; a failure is logged and returned
// (so the exit status is non-zero).
func TestCloseImage(t *testing.T) {
	flushErr := syscall.EIO
	closeErr := errors.New("close failed")
	for _, tc := range []struct {
		name              string
		flush, close      error
		want              []string // in the error
		wantLog, wantNone bool
	}{
		{"clean", nil, nil, nil, false, true},
		{"flush fails", flushErr, nil, []string{"flush img.qcow2: input/output error"}, true, false},
		{"close fails", nil, closeErr, []string{"close img.qcow2: close failed"}, false, false},
		{"both fail", flushErr, closeErr, []string{"flush img.qcow2", "close img.qcow2"}, true, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			d := &closeDriver{flushErr: tc.flush, closeErr: tc.close}
			var logBuf bytes.Buffer
			err := closeImage(d, "img.qcow2", log.New(&logBuf, "", 0))
			if strings.Join(d.calls, ",") != "flush,close" {
				t.Errorf("calls %v, want flush then close", d.calls)
			}
			if tc.wantNone != (err == nil) {
				t.Fatalf("closeImage = %v", err)
			}
			for _, w := range tc.want {
				if !strings.Contains(err.Error(), w) {
					t.Errorf("error %q lacks %q", err, w)
				}
			}
			if tc.flush != nil && !errors.Is(err, tc.flush) {
				t.Errorf("error %v does not wrap the flush error", err)
			}
			if got := strings.Contains(logBuf.String(), "flush img.qcow2"); got != tc.wantLog {
				t.Errorf("log %q", logBuf.String())
			}
		})
	}
}

// TestServerCloseError: a close error recorded in the state file is
// reported by unmount once, and only for the server that recorded it.
func TestServerCloseError(t *testing.T) {
	dir := t.TempDir()
	st := daemonState{PID: 4242, Image: "/i.qcow2", Mountpoint: "/mnt/x", Started: time.Now()}
	if _, err := writeState(dir, st); err != nil {
		t.Fatal(err)
	}
	if err := serverCloseError(dir, "/mnt/x", 4242, "mnt/x"); err != nil {
		t.Errorf("no close error recorded, got %v", err)
	}
	st.CloseError = "flush /i.qcow2: input/output error"
	if _, err := writeState(dir, st); err != nil {
		t.Fatal(err)
	}
	if err := serverCloseError(dir, "/mnt/x", 99, "mnt/x"); err != nil {
		t.Errorf("another server's error reported: %v", err)
	}
	err := serverCloseError(dir, "/mnt/x", 4242, "mnt/x")
	if err == nil || exitCode(err) != exitFlush || !strings.Contains(err.Error(), "unmounted mnt/x, but its server failed to write the image back: flush /i.qcow2: input/output error") {
		t.Errorf("serverCloseError = %v", err)
	}
	if _, err := os.Stat(statePath(dir, "/mnt/x")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("state file left after reporting: %v", err)
	}
}

// pickyFormat opens anything read-only and refuses to open it for writing,
// like the qcow2 driver with a corrupt image.
type pickyFormat struct{}

func (pickyFormat) Name() string                 { return "picky" }
func (pickyFormat) Probe(drivers.ProbeInput) int { return 0 }
func (pickyFormat) Open(path string, opts drivers.OpenOptions) (drivers.Driver, error) {
	if !opts.ReadOnly {
		return nil, fmt.Errorf("picky: %s: the corrupt bit is set: %w", path, drivers.ErrCorrupt)
	}
	return &closeDriver{}, nil
}

// TestExplainWritableOpen: a writable open that fails where a read-only
// one works says so and points at --read-only; other failures are left as
// they are.
func TestExplainWritableOpen(t *testing.T) {
	opts := drivers.OpenOptions{Formats: []drivers.Format{pickyFormat{}}, Growable: true}
	_, _, err := drivers.Open("x.img", "picky", opts)
	if err == nil {
		t.Fatal("writable open succeeded")
	}
	got := explainWritableOpen("x.img", "picky", opts, err)
	if !errors.Is(got, drivers.ErrCorrupt) || !strings.Contains(got.Error(), "the corrupt bit is set") ||
		!strings.Contains(got.Error(), "--read-only mounts it read-only") {
		t.Errorf("explained: %v", got)
	}
	// No hint when the read-only open fails too, or was what failed.
	if got := explainWritableOpen("x.img", "nope", opts, err); got != err {
		t.Errorf("hint without a working read-only open: %v", got)
	}
	opts.ReadOnly = true
	if got := explainWritableOpen("x.img", "picky", opts, err); got != err {
		t.Errorf("hint for a read-only open: %v", got)
	}
}
