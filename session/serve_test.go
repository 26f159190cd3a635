package session

import (
	"bytes"
	"errors"
	"fmt"
	"log"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"imgfuse/coroutine"
	"imgfuse/drivers"
	"imgfuse/imgtool"
	"imgfuse/mounts"
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
			s := &session{o: &Options{Image: "img.qcow2"}, log: log.New(&logBuf, "", 0), d: d}
			err := s.closeImage()
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

// pickyFormat opens anything read-only and refuses to open it for writing,
// like the qcow2 driver with a corrupt image.
type pickyFormat struct{}

func (pickyFormat) Name() string { return "picky" }

func (pickyFormat) Probe(drivers.ProbeInput) int { return 0 }

func (pickyFormat) Open(path string, opts drivers.OpenOptions) (drivers.Driver, error) {
	if !opts.ReadOnly {
		if strings.Contains(path, "marked") {
			return nil, fmt.Errorf("picky: %s: the corrupt bit is set; open it read-only: %w", path, drivers.ErrCorrupt)
		}
		return nil, &drivers.DamageError{Format: "picky", Path: path, Err: fmt.Errorf("L1 table past the end of the file: %w", drivers.ErrCorrupt)}
	}
	return &closeDriver{}, nil
}

// TestExplainWritableOpen: a writable open that fails where a read-only
// one works says so and points at --read-only; other failures are left as
// they are.
func TestExplainWritableOpen(t *testing.T) {
	opts := drivers.OpenOptions{Formats: []drivers.Format{pickyFormat{}}, Growable: true}
	wopts := opts
	failed := func(image string) *imgtool.Error {
		t.Helper()
		_, _, err := drivers.Open(image, "picky", wopts)
		if err == nil {
			t.Fatal("writable open succeeded")
		}
		return imgtool.OpenFailed(image, err)
	}
	got := explainWritableOpen("x.img", "picky", opts, failed("x.img"))
	if !errors.Is(got, drivers.ErrCorrupt) || !strings.Contains(got.Error(), "L1 table past the end") ||
		!strings.Contains(got.Error(), "--read-only mounts it read-only") {
		t.Errorf("explained: %v", got)
	}
	// No second hint when the driver explains its refusal itself.
	if got := explainWritableOpen("marked.img", "picky", opts, failed("marked.img")); strings.Contains(got.Error(), "--read-only mounts") {
		t.Errorf("hint on an explained refusal: %v", got)
	}
	// No hint when the read-only open fails too, or was what failed.
	if got := explainWritableOpen("x.img", "nope", opts, failed("x.img")); strings.Contains(got.Error(), "--read-only mounts") {
		t.Errorf("hint without a working read-only open: %v", got)
	}
	opts.ReadOnly = true
	if got := explainWritableOpen("x.img", "picky", opts, failed("x.img")); strings.Contains(got.Error(), "--read-only mounts") {
		t.Errorf("hint for a read-only open: %v", got)
	}
}

// TestOverlayTempDirFallback: a $TMPDIR that does not exist is passed
// over for /var/tmp, and the overlay made there is a qcow2 image over the
// base.
func TestOverlayTempDirFallback(t *testing.T) {
	base := filepath.Join(t.TempDir(), "base.raw")
	if err := os.WriteFile(base, make([]byte, 1<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	t.Setenv("TMPDIR", filepath.Join(t.TempDir(), "missing"))
	path, err := createOverlay(base, "raw", 1<<20, "")
	if err != nil {
		t.Fatal(err)
	}
	defer os.Remove(path)
	if filepath.Dir(path) != "/var/tmp" || !mounts.IsTempOverlay(path) {
		t.Errorf("overlay at %s, want a temporary overlay in /var/tmp", path)
	}
	f, err := drivers.ProbeFile(imgtool.Formats(), path)
	if err != nil || f.Name() != "qcow2" {
		t.Errorf("overlay probes as %v, %v", f, err)
	}
	// And $TMPDIR first when it works.
	dir := t.TempDir()
	t.Setenv("TMPDIR", dir)
	path, err = createOverlay(base, "raw", 1<<20, "")
	if err != nil || filepath.Dir(path) != dir {
		t.Errorf("overlay at %s (%v), want it in $TMPDIR %s", path, err, dir)
	}
}
