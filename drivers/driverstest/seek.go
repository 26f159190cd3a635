package driverstest

import (
	"errors"
	"io"
	"testing"
)

// Seek is one lseek(2) call and what it must return: Want, or the error
// Err when Err is set.
type Seek struct {
	Off    int64
	Whence int // unix.SEEK_DATA, unix.SEEK_HOLE, ...
	Want   int64
	Err    error
}

// CheckSeeks makes each call on f (an *os.File passes any whence to
// lseek) and reports every answer that differs.
func CheckSeeks(t testing.TB, f io.Seeker, seeks []Seek) {
	t.Helper()
	for _, c := range seeks {
		got, err := f.Seek(c.Off, c.Whence)
		if c.Err != nil {
			if !errors.Is(err, c.Err) {
				t.Errorf("lseek(%d, %d) = %d, %v; want %v", c.Off, c.Whence, got, err, c.Err)
			}
			continue
		}
		if err != nil || got != c.Want {
			t.Errorf("lseek(%d, %d) = %d, %v; want %d", c.Off, c.Whence, got, err, c.Want)
		}
	}
}
