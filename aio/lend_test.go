package aio

import (
	"errors"
	"os"
	"testing"

	"golang.org/x/sys/unix"
)

// TestLendFd: the lent descriptor is the image file, open with the File's
// access mode, only for the length of the call; fn's error comes back
// wrapped; after Close nothing is lent.
func TestLendFd(t *testing.T) {
	for _, c := range engineCases(t) {
		for _, ro := range []bool{false, true} {
			name := c.name
			if ro {
				name += "/read-only"
			}
			t.Run(name, func(t *testing.T) {
				path := createFile(t, c.dir, make([]byte, 8192))
				c := c
				c.opts.ReadOnly = ro
				f := openCase(t, c, path)
				want, err := os.Stat(path)
				if err != nil {
					t.Fatal(err)
				}
				err = f.LendFd(func(fd int) error {
					var st unix.Stat_t
					if err := unix.Fstat(fd, &st); err != nil {
						return err
					}
					if got, _ := os.Stat(path); !os.SameFile(got, want) || st.Size != 8192 {
						t.Errorf("lent descriptor is not the image file")
					}
					fl, err := unix.FcntlInt(uintptr(fd), unix.F_GETFL, 0)
					if err != nil {
						return err
					}
					wantAcc := unix.O_RDWR
					if ro {
						wantAcc = unix.O_RDONLY
					}
					if fl&unix.O_ACCMODE != wantAcc {
						t.Errorf("lent descriptor access mode %#x, want %#x", fl&unix.O_ACCMODE, wantAcc)
					}
					return nil
				})
				if err != nil {
					t.Fatal(err)
				}
				sentinel := errors.New("refused")
				if err := f.LendFd(func(int) error { return sentinel }); !errors.Is(err, sentinel) {
					t.Errorf("LendFd returned %v, want it to wrap fn's error", err)
				}
				if f.BlockDevice() {
					t.Error("a regular file reported as a block device")
				}
				if err := f.Close(); err != nil {
					t.Fatal(err)
				}
				called := false
				if err := f.LendFd(func(int) error { called = true; return nil }); !errors.Is(err, ErrClosed) || called {
					t.Errorf("LendFd after Close: %v (fn called: %v), want ErrClosed", err, called)
				}
			})
		}
	}
}
