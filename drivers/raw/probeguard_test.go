package raw_test

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"syscall"
	"testing"

	"imgfuse/coroutine"
	"imgfuse/drivers"
	"imgfuse/drivers/qcow2"
	"imgfuse/drivers/raw"
)

var formats = []drivers.Format{qcow2.Format{}, raw.Format{}}

// qcow2Magic is the start of a qcow2 header: "QFI\xfb", version 3.
var qcow2Magic = []byte{'Q', 'F', 'I', 0xfb, 0, 0, 0, 3}

// openGuarded opens a fresh raw image of size bytes (filled with 0x5a) as
// drivers.Open does for the format name given ("auto" probes), collecting
// the log lines.
func openGuarded(t *testing.T, size int, format string, opts drivers.OpenOptions) (drivers.Driver, string, *[]string) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "disk.raw")
	if err := os.WriteFile(path, bytes.Repeat([]byte{0x5a}, size), 0o644); err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	logs := new([]string)
	opts.Formats = formats
	opts.Logf = func(f string, args ...any) {
		mu.Lock()
		*logs = append(*logs, fmt.Sprintf(f, args...))
		mu.Unlock()
	}
	d, f, err := drivers.Open(path, format, opts)
	if err != nil {
		t.Fatal(err)
	}
	if f.Name() != "raw" {
		t.Fatalf("opened as %s", f.Name())
	}
	t.Cleanup(func() { d.Close() })
	return d, path, logs
}

func writeAt(d drivers.Driver, p []byte, off int64) (err error) {
	coroutine.Run(func(co *coroutine.Co) { _, err = d.WriteAt(co, p, off) })
	return err
}

func probe(t *testing.T, path string) string {
	t.Helper()
	f, err := drivers.ProbeFile(formats, path)
	if err != nil {
		t.Fatal(err)
	}
	return f.Name()
}

// TestProbedHeadGuard: on a writable raw image whose format was probed,
// every write that would make the first sector probe as qcow2 fails with
// EPERM and changes nothing, whatever its alignment or size; writes that
// keep it raw, and writes elsewhere, go through; the refusal is logged
// once. Naming the format lifts the guard.
func TestProbedHeadGuard(t *testing.T) {
	t.Parallel()
	sector := append(bytes.Clone(qcow2Magic), make([]byte, 504)...)
	big := append(bytes.Clone(sector), bytes.Repeat([]byte{1}, 65536-512)...)
	refused := []struct {
		name string
		p    []byte
		off  int64
	}{
		{"aligned sector", sector, 0},
		{"unaligned magic only", qcow2Magic[:4], 0},
		{"64 KiB from 0", big, 0},
		{"odd length", qcow2Magic[:7], 0},
	}
	d, path, logs := openGuarded(t, 1<<20, "auto", drivers.OpenOptions{})
	before, _ := os.ReadFile(path)
	for _, c := range refused {
		err := writeAt(d, c.p, c.off)
		if !errors.Is(err, syscall.EPERM) {
			t.Errorf("%s: got %v, want EPERM", c.name, err)
		}
	}
	if after, _ := os.ReadFile(path); !bytes.Equal(before, after) {
		t.Error("a refused write changed the image")
	}
	if probe(t, path) != "raw" {
		t.Fatal("image probes as qcow2 after refused writes")
	}
	if len(*logs) != 1 || !bytes.Contains([]byte((*logs)[0]), []byte("--format raw")) {
		t.Errorf("want one log line naming --format raw, got %q", *logs)
	}

	// Allowed: the magic elsewhere, anything raw at 0, half the magic.
	for _, c := range []struct {
		name string
		p    []byte
		off  int64
	}{
		{"magic in sector 1", sector, 512},
		{"magic at byte 1", qcow2Magic[:4], 1},
		{"plain data at 0", bytes.Repeat([]byte{7}, 4096), 0},
		{"first half of the magic", qcow2Magic[:2], 0},
	} {
		if err := writeAt(d, c.p, c.off); err != nil {
			t.Errorf("%s: %v", c.name, err)
		}
	}
	// The second half now completes the magic with the first: refused.
	if err := writeAt(d, qcow2Magic[2:4], 2); !errors.Is(err, syscall.EPERM) {
		t.Errorf("completing the magic across two writes: got %v, want EPERM", err)
	}
	// Zeroing and discarding the first sector keep it raw.
	coroutine.Run(func(co *coroutine.Co) {
		if err := d.WriteZeroes(co, 0, 4096, false); err != nil {
			t.Errorf("write zeroes: %v", err)
		}
		if err := d.Discard(co, 0, 1024); err != nil {
			t.Errorf("discard: %v", err)
		}
	})
	if probe(t, path) != "raw" {
		t.Fatal("image probes as qcow2")
	}

	// --format raw: the user asked for raw; the write goes through and
	// the next probing open sees qcow2.
	d2, path2, logs2 := openGuarded(t, 1<<20, "raw", drivers.OpenOptions{})
	if err := writeAt(d2, sector, 0); err != nil {
		t.Fatalf("named format: %v", err)
	}
	if probe(t, path2) != "qcow2" || len(*logs2) != 0 {
		t.Errorf("named format: probes as %s, logs %q", probe(t, path2), *logs2)
	}
}

// TestProbedHeadGuardSmallGrowable: an image shorter than a sector, grown by
// the write, is checked on what the file will hold.
func TestProbedHeadGuardSmallGrowable(t *testing.T) {
	t.Parallel()
	d, path, _ := openGuarded(t, 3, "auto", drivers.OpenOptions{Growable: true})
	if err := writeAt(d, qcow2Magic, 0); !errors.Is(err, syscall.EPERM) {
		t.Errorf("got %v, want EPERM", err)
	}
	if fi, _ := os.Stat(path); fi.Size() != 3 {
		t.Errorf("refused write changed the size to %d", fi.Size())
	}
	if err := writeAt(d, []byte("hello, world"), 0); err != nil {
		t.Errorf("raw data: %v", err)
	}
}

// TestProbedHeadGuardConcurrent: two writers each writing half of the
// magic, many times and concurrently: one of each pair may land, never
// both (each write is checked against what it lands on).
func TestProbedHeadGuardConcurrent(t *testing.T) {
	t.Parallel()
	d, path, _ := openGuarded(t, 4096, "auto", drivers.OpenOptions{})
	for round := range 50 {
		if err := writeAt(d, []byte{0, 0, 0, 0}, 0); err != nil {
			t.Fatal(err)
		}
		var wg sync.WaitGroup
		for _, half := range []int64{0, 2} {
			wg.Go(func() { writeAt(d, qcow2Magic[half:half+2], half) })
		}
		wg.Wait()
		if probe(t, path) != "raw" {
			t.Fatalf("round %d: two half-magic writes made the image probe as qcow2", round)
		}
	}
}
