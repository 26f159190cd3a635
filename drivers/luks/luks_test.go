package luks

import (
	"errors"
	"os"
	"path/filepath"
	"syscall"
	"testing"

	"imgfuse/coroutine"
	"imgfuse/drivers"
	"imgfuse/drivers/raw"
)

func TestProbe(t *testing.T) {
	for _, tt := range []struct {
		head string
		want int
	}{
		{"LUKS\xba\xbe\x00\x01", 100},
		{"LUKS\xba\xbe\x00\x02" + string(make([]byte, 504)), 100},
		{"LUKS\xba\xbe", 100},
		{"LUKS\xba", 0},
		{"LUKS\xba\xbf\x00\x01", 0},
		{"QFI\xfb", 0},
		{"", 0},
	} {
		if got := (Format{}).Probe([]byte(tt.head)); got != tt.want {
			t.Errorf("Probe(%q) = %d, want %d", tt.head, got, tt.want)
		}
	}
}

// TestOpenRefused: a probing open of a LUKS file fails as unsupported,
// naming LUKS; naming raw opens its bytes.
func TestOpenRefused(t *testing.T) {
	path := filepath.Join(t.TempDir(), "c.luks")
	if err := os.WriteFile(path, append([]byte("LUKS\xba\xbe\x00\x01"), make([]byte, 1<<20-8)...), 0o644); err != nil {
		t.Fatal(err)
	}
	formats := []drivers.Format{raw.Format{}, Format{}}
	_, _, err := drivers.Open(path, "auto", drivers.OpenOptions{ReadOnly: true, Formats: formats})
	if !errors.Is(err, drivers.ErrUnsupported) || !errors.Is(err, ErrEncrypted) || err.Error() != "is a LUKS-encrypted image: not supported" {
		t.Errorf("probing open: %v", err)
	}
	d, f, err := drivers.Open(path, "raw", drivers.OpenOptions{ReadOnly: true, NoDirectIO: true, Formats: formats})
	if err != nil || f.Name() != "raw" || d.Size() != 1<<20 {
		t.Fatalf("open as raw: %v", err)
	}
	d.Close()
}

// TestRawHeadGuard: with luks among the formats, a probed writable raw
// image refuses a guest write that would make it probe as LUKS (EPERM),
// as it does for qcow2; the same write to a named raw image goes through.
func TestRawHeadGuard(t *testing.T) {
	formats := []drivers.Format{raw.Format{}, Format{}}
	for _, tt := range []struct {
		format string
		want   error
	}{{"auto", syscall.EPERM}, {"raw", nil}} {
		path := filepath.Join(t.TempDir(), "disk.raw")
		if err := os.WriteFile(path, make([]byte, 1<<20), 0o644); err != nil {
			t.Fatal(err)
		}
		d, _, err := drivers.Open(path, tt.format, drivers.OpenOptions{NoDirectIO: true, Formats: formats, Logf: t.Logf})
		if err != nil {
			t.Fatal(err)
		}
		coroutine.Run(func(co *coroutine.Co) { _, err = d.WriteAt(co, []byte("LUKS\xba\xbe\x00\x01"), 0) })
		d.Close()
		if !errors.Is(err, tt.want) && err != tt.want {
			t.Errorf("--format %s: write of the LUKS magic: %v, want %v", tt.format, err, tt.want)
		}
	}
}

func FuzzProbe(f *testing.F) {
	f.Add([]byte("LUKS\xba\xbe\x00\x01"))
	f.Add([]byte("LUKS"))
	f.Fuzz(func(t *testing.T, head []byte) {
		if s := (Format{}).Probe(head); s != 0 && s != 100 {
			t.Fatalf("score %d", s)
		}
	})
}
