package fusefs

import (
	"os"
	"path/filepath"
	"syscall"
	"testing"

	"imgfuse/drivers"
	"imgfuse/internal/testenv"
)

// BenchmarkRead measures one 4k O_DIRECT read through the mount from an
// in-memory disk: the FUSE round trip plus the handler, with and without
// the DirectReader fast path.
func BenchmarkRead(b *testing.B) {
	for _, tc := range []struct {
		name   string
		direct bool
	}{{"coroutine", false}, {"fast-path", true}} {
		b.Run(tc.name, func(b *testing.B) {
			requireFUSE(b)
			mem := newMemDriver(make([]byte, 64<<20))
			var d drivers.Driver = mem
			if tc.direct {
				d = &directMemDriver{memDriver: mem}
			}
			mp := b.TempDir()
			s, err := Mount(mp, d, Options{})
			if err != nil {
				testenv.Skip(b, "mount: %v", err)
			}
			defer func() { s.Unmount(); s.Wait() }()
			f, err := os.OpenFile(filepath.Join(mp, "disk"), os.O_RDONLY|syscall.O_DIRECT, 0)
			if err != nil {
				b.Fatal(err)
			}
			defer f.Close()
			p := alignedBuf(4096)
			b.SetBytes(4096)
			b.ResetTimer()
			for i := 0; b.Loop(); i++ {
				if _, err := f.ReadAt(p, int64(i%16384)*4096); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}
