package raw

import (
	"os"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"

	"imgfuse/drivers"
)

// TestLendBackingFd: a raw image on a regular file lends the descriptor of
// that very file.
func TestLendBackingFd(t *testing.T) {
	path := filepath.Join(t.TempDir(), "img.raw")
	if err := os.WriteFile(path, make([]byte, 65536), 0o644); err != nil {
		t.Fatal(err)
	}
	d, err := Open(path, drivers.OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	var fb drivers.FileBacked = d
	want, _ := os.Stat(path)
	calls := 0
	err = fb.LendBackingFd(func(fd int) error {
		calls++
		var st unix.Stat_t
		if err := unix.Fstat(fd, &st); err != nil {
			return err
		}
		got, _ := os.Stat(path)
		if !os.SameFile(got, want) || st.Size != 65536 {
			t.Error("the lent descriptor is not the image file")
		}
		return nil
	})
	if err != nil || calls != 1 {
		t.Fatalf("LendBackingFd: %v, fn called %d times", err, calls)
	}
}
