package fusefs

import (
	"bytes"
	"os"
	"path/filepath"
	"slices"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"imgfuse/drivers"
	"imgfuse/drivers/raw"
)

// TestRawImage serves a real raw image file through the mount, for both
// I/O modes of the aio layer.
func TestRawImage(t *testing.T) {
	for _, noDirect := range []bool{false, true} {
		t.Run(map[bool]string{false: "O_DIRECT", true: "buffered"}[noDirect], func(t *testing.T) {
			requireFUSE(t)
			const size = 4<<20 + 512
			model := pattern(size, 10)
			dir := t.TempDir()
			image := filepath.Join(dir, "image.raw")
			if err := os.WriteFile(image, model, 0o600); err != nil {
				t.Fatal(err)
			}
			mtime := time.Date(2022, 1, 1, 0, 0, 0, 5, time.UTC)
			if err := os.Chtimes(image, mtime, mtime); err != nil {
				t.Fatal(err)
			}
			d, err := raw.Open(image, drivers.OpenOptions{NoDirectIO: noDirect})
			if err != nil {
				t.Fatal(err)
			}
			mp := filepath.Join(dir, "mnt")
			if err := os.Mkdir(mp, 0o755); err != nil {
				t.Fatal(err)
			}
			s, err := Mount(mp, d, Options{ModTime: mtime, FSName: "imgfuse:" + image})
			if err != nil {
				d.Close()
				t.Fatal(err)
			}
			unmounted := false
			defer func() {
				if !unmounted {
					s.Unmount()
					waitT(t, s)
				}
				d.Close()
			}()
			path := filepath.Join(mp, "disk")

			got, err := os.ReadFile(path)
			if err != nil || !bytes.Equal(got, model) {
				t.Fatalf("whole read: %d bytes, %v", len(got), err)
			}
			// Aligned O_DIRECT reads take the driver's fast path; the
			// unaligned one must be bounced by the lower layers.
			df, err := os.OpenFile(path, os.O_RDWR|syscall.O_DIRECT, 0)
			if err != nil {
				t.Fatal(err)
			}
			for _, r := range []struct {
				off int64
				n   int
			}{{0, 1 << 20}, {1 << 20, 4096}, {700, 100}, {size - 512, 512}} {
				p := alignedBuf(r.n)
				if n, err := df.ReadAt(p, r.off); n != r.n || err != nil || !bytes.Equal(p, model[r.off:r.off+int64(r.n)]) {
					t.Errorf("O_DIRECT read %d@%d = %d, %v (data equal %v)", r.n, r.off, n, err,
						bytes.Equal(p[:n], model[r.off:r.off+int64(n)]))
				}
			}
			// Writes, aligned and not, reach the image.
			for _, w := range []struct {
				off int64
				n   int
			}{{8192, 65536}, {12345, 777}, {size - 100, 100}} {
				p := pattern(w.n, uint64(w.off))
				if n, err := unix.Pwrite(int(df.Fd()), alignedCopy(p), w.off); n != w.n || err != nil {
					t.Errorf("pwrite %d@%d = %d, %v", w.n, w.off, n, err)
				}
				copy(model[w.off:], p)
			}
			if err := unix.Fallocate(int(df.Fd()), unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, 1<<20, 3<<20); err != nil {
				t.Errorf("punch hole: %v", err)
			}
			clear(model[1<<20 : 4<<20])
			if err := df.Sync(); err != nil {
				t.Errorf("fsync: %v", err)
			}
			if err := df.Close(); err != nil {
				t.Errorf("close: %v", err)
			}
			var st syscall.Stat_t
			if err := syscall.Stat(path, &st); err != nil {
				t.Fatal(err)
			}
			if got := time.Unix(st.Mtim.Unix()); !got.Equal(mtime) {
				t.Errorf("mtime %v, want %v", got, mtime)
			}
			mounts, _ := os.ReadFile("/proc/self/mounts")
			if !bytes.Contains(mounts, []byte("imgfuse:"+image+" "+mp+" fuse.imgfuse ")) {
				t.Errorf("/proc/self/mounts has no line for %s", mp)
			}

			if err := s.Unmount(); err != nil {
				t.Fatal(err)
			}
			waitT(t, s)
			unmounted = true
			got, err = os.ReadFile(image)
			if err != nil || !slices.Equal(got, model) {
				t.Errorf("image after unmount differs from the model (%d bytes, %v)", len(got), err)
			}
		})
	}
}

func alignedCopy(p []byte) []byte {
	b := alignedBuf(len(p))
	copy(b, p)
	return b
}
