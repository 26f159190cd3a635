package aio

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"sync"
	"testing"

	"imgfuse/coroutine"
)

// fakeFiller fills a local file from data, recording the ranges asked for.
type fakeFiller struct {
	path string
	data []byte
	mu   sync.Mutex
	asks [][2]int64
}

func (f *fakeFiller) Fill(off, n int64) error {
	f.mu.Lock()
	f.asks = append(f.asks, [2]int64{off, n})
	f.mu.Unlock()
	fh, err := os.OpenFile(f.path, os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	defer fh.Close()
	_, err = fh.WriteAt(f.data[off:off+n], off)
	return err
}

// TestRemoteFile: a URL opens through the installed opener, read-only;
// every read (plain, from a coroutine, the aligned fast path) fills its
// range first; writes and lending the descriptor are refused; OpenHead
// fills the head and tail.
func TestRemoteFile(t *testing.T) {
	data := bytes.Repeat([]byte("0123456789abcdef"), 1<<14) // 256 KiB
	path := filepath.Join(t.TempDir(), "data")
	if err := os.WriteFile(path, make([]byte, len(data)), 0o644); err != nil {
		t.Fatal(err)
	}
	ff := &fakeFiller{path: path, data: data}
	SetRemoteOpener(func(url string) (string, Filler, error) { return path, ff, nil })
	defer SetRemoteOpener(nil)
	const url = "http://example.invalid/disk.img"
	if _, err := Open(url, Options{}); !errors.Is(err, ErrReadOnly) {
		t.Errorf("writable open of a URL: %v, want ErrReadOnly", err)
	}
	f, err := Open(url, Options{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	p := make([]byte, 4096)
	if err := f.Pread(p, 8192); err != nil || !bytes.Equal(p, data[8192:8192+4096]) {
		t.Errorf("Pread: %v", err)
	}
	coroutine.Run(func(co *coroutine.Co) {
		if ok, err := f.PreadAlignedCo(co, p, 65536); !ok || err != nil || !bytes.Equal(p, data[65536:65536+4096]) {
			t.Errorf("PreadAlignedCo: %v %v", ok, err)
		}
	})
	if len(ff.asks) != 2 || ff.asks[0] != [2]int64{8192, 4096} || ff.asks[1] != [2]int64{65536, 4096} {
		t.Errorf("fills %v", ff.asks)
	}
	if err := f.Pwrite(p, 0); !errors.Is(err, ErrReadOnly) {
		t.Errorf("Pwrite: %v", err)
	}
	if err := f.LendFd(func(int) error { return nil }); !errors.Is(err, ErrNoLend) {
		t.Errorf("LendFd: %v", err)
	}
	h, err := OpenHead(url)
	if err != nil {
		t.Fatal(err)
	}
	head := make([]byte, 512)
	if _, err := h.ReadAt(head, 0); err != nil || !bytes.Equal(head, data[:512]) {
		t.Errorf("OpenHead: head %v", err)
	}
	h.Close()
	SetRemoteOpener(nil)
	if _, err := Open(url, Options{ReadOnly: true}); !errors.Is(err, ErrRemoteUnavailable) {
		t.Errorf("open of a URL without an opener: %v", err)
	}
}
