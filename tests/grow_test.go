package tests

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"syscall"
	"testing"

	"imgfuse/drivers/driverstest"
)

// TestGrowTruncate grows a qcow2 disk with truncate(2) through the mount,
// writes its new last byte, and checks what qemu sees; shrinking is
// refused and a write past the end fails with ENOSPC.
func TestGrowTruncate(t *testing.T) {
	t.Parallel()
	requireE2E(t)
	for _, opts := range []string{"", "cluster_size=512", "compat=0.10"} {
		name := opts
		if name == "" {
			name = "default"
		}
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			const from, to = 64 << 20, 128 << 20
			img := filepath.Join(t.TempDir(), "img.qcow2")
			args := []string{"create", "-q", "-f", "qcow2"}
			if opts != "" {
				args = append(args, "-o", opts)
			}
			driverstest.Cmd(t, "qemu-img", append(args, img, fmtSize(from))...)
			driverstest.QemuIO(t, img, "write -P 0x33 0 1M", fmt.Sprintf("write -P 0x34 %d 65536", from-65536))
			mp, disk := mount(t, img, false)
			if err := os.Truncate(disk, to); err != nil {
				t.Fatalf("truncate -s %d: %v", to, err)
			}
			if st, err := os.Stat(disk); err != nil || st.Size() != to {
				t.Fatalf("after truncate the disk is %v bytes (%v), want %d", st.Size(), err, to)
			}
			f, err := os.OpenFile(disk, os.O_RDWR, 0)
			if err != nil {
				t.Fatal(err)
			}
			defer f.Close()
			if _, err := f.WriteAt([]byte{0x5a}, to-1); err != nil {
				t.Fatalf("write the last byte: %v", err)
			}
			// The grown space between the old end and the last byte
			// reads as zeros.
			if errno, b := readErrno(t, disk, from-4096, 1<<20); errno != 0 {
				t.Fatalf("read across the old end: %v", errno)
			} else if d := firstDiff(b[4096:], make([]byte, len(b)-4096)); d >= 0 || b[0] != 0x34 {
				t.Fatalf("across the old end: first byte %#x (want 0x34), non-zero grown byte at +%d", b[0], d)
			}

			// The README promises EOPNOTSUPP for a shrink.
			if err := os.Truncate(disk, 32<<20); !errors.Is(err, syscall.EOPNOTSUPP) {
				t.Errorf("shrinking a qcow2 disk to 32 MiB: %v, want EOPNOTSUPP", err)
			}
			if st, err := os.Stat(disk); err != nil || st.Size() != to {
				t.Errorf("after a refused shrink the disk is %v bytes (%v), want %d", st.Size(), err, to)
			}

			_, err = f.WriteAt([]byte{1, 2, 3}, to)
			if !errors.Is(err, syscall.ENOSPC) {
				t.Errorf("a write past the end: %v, want ENOSPC", err)
			}
			f.Close()
			unmountBusyRetry(t, mp)

			if got := virtualSize(t, img); got != to {
				t.Errorf("qemu-img info: virtual-size %d, want %d", got, to)
			}
			driverstest.QemuIO(t, img, fmt.Sprintf("read -P 0x5a %d 1", to-1),
				"read -P 0x33 0 1M", fmt.Sprintf("read -P 0 %d %d", from, to-from-1))
			requireClean(t, img)
		})
	}
}

// TestGrowable: with --growable a write past the end succeeds and grows the
// disk to its end.
func TestGrowable(t *testing.T) {
	requireE2E(t)
	t.Parallel()
	const from = 32 << 20
	img := filepath.Join(t.TempDir(), "img.qcow2")
	driverstest.Cmd(t, "qemu-img", "create", "-q", "-f", "qcow2", img, fmtSize(from))
	mp, disk := mount(t, img, false, "--growable")
	f, err := os.OpenFile(disk, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	end := int64(from + 3<<20 + 4096)
	p := patternAt(end-8192, 8192, 0x5a)
	if _, err := f.WriteAt(p, end-8192); err != nil {
		t.Fatalf("write past the end with --growable: %v", err)
	}
	if st, err := os.Stat(disk); err != nil || st.Size() < end {
		t.Errorf("after a write to %d the disk is %v bytes (%v)", end, st.Size(), err)
	}
	errno, b := readErrno(t, disk, end-8192, 8192)
	if errno != 0 || firstDiff(b, p) >= 0 {
		t.Errorf("read back of the write past the old end: errno %v, equal %v", errno, firstDiff(b, p) < 0)
	}
	f.Close()
	unmountBusyRetry(t, mp)
	if got := virtualSize(t, img); got < end {
		t.Errorf("qemu-img info: virtual-size %d, want at least %d", got, end)
	}
	ref, err := os.ReadFile(driverstest.ConvertRef(t, img, "", t.TempDir()))
	if err != nil {
		t.Fatal(err)
	}
	if int64(len(ref)) < end || firstDiff(ref[end-8192:end], p) >= 0 || firstDiff(ref[:end-8192], make([]byte, end-8192)) >= 0 {
		t.Errorf("qemu-img convert of the grown image does not hold the write at its end")
	}
	requireClean(t, img)
}

// Header fields of qcow2 version 3 (docs/interop/qcow2.txt), big endian.
const (
	hdrCompatible  = 80  // compatible_features, u64
	hdrAutoclear   = 88  // autoclear_features, u64
	hdrLength      = 100 // header_length, u32
	unknownCompat  = 1 << 40
	unknownAuto    = 1 << 40
	unknownExtType = 0x1badcafe
)

// TestHeaderPreserved writes to and grows an image whose header carries an
// unknown compatible feature bit, an unknown autoclear bit and an unknown
// header extension. Whoever writes the image must keep the compatible bit
// and the extension (they mean nothing to us but something to another
// reader) and clear the autoclear bit (its data may now be stale).
func TestHeaderPreserved(t *testing.T) {
	requireE2E(t)
	t.Parallel()
	img := filepath.Join(t.TempDir(), "img.qcow2")
	driverstest.Cmd(t, "qemu-img", "create", "-q", "-f", "qcow2", img, "32M")
	hdr := readHeader(t, img)
	be := binary.BigEndian
	be.PutUint64(hdr[hdrCompatible:], be.Uint64(hdr[hdrCompatible:])|unknownCompat)
	be.PutUint64(hdr[hdrAutoclear:], be.Uint64(hdr[hdrAutoclear:])|unknownAuto)
	end := extensionEnd(t, hdr)
	ext := []byte("imgfuse!")
	be.PutUint32(hdr[end:], unknownExtType)
	be.PutUint32(hdr[end+4:], uint32(len(ext)))
	copy(hdr[end+8:], ext)
	clear(hdr[end+16 : end+24]) // the end-of-extensions marker
	writeHeader(t, img, hdr)
	// qemu-img itself accepts the doctored image.
	driverstest.Cmd(t, "qemu-img", "check", "-q", "-U", img)

	mp, disk := mount(t, img, false)
	f, err := os.OpenFile(disk, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteAt(patternAt(0, 200000, 7), 12345); err != nil {
		t.Fatal(err)
	}
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
	f.Close()
	if err := os.Truncate(disk, 48<<20); err != nil {
		t.Fatalf("grow: %v", err)
	}
	unmountBusyRetry(t, mp)

	hdr = readHeader(t, img)
	if be.Uint64(hdr[hdrCompatible:])&unknownCompat == 0 {
		t.Errorf("the unknown compatible feature bit was dropped")
	}
	if be.Uint64(hdr[hdrAutoclear:])&unknownAuto != 0 {
		t.Errorf("the unknown autoclear bit is still set after writes")
	}
	found := false
	for off := int(be.Uint32(hdr[hdrLength:])); off+8 <= len(hdr); {
		typ, n := be.Uint32(hdr[off:]), int(be.Uint32(hdr[off+4:]))
		if typ == 0 || off+8+n > len(hdr) {
			break
		}
		if typ == unknownExtType && string(hdr[off+8:off+8+n]) == string(ext) {
			found = true
		}
		off += 8 + (n+7)&^7
	}
	if !found {
		t.Errorf("the unknown header extension was dropped")
	}
	if got := virtualSize(t, img); got != 48<<20 {
		t.Errorf("virtual size %d after growing to 48 MiB", got)
	}
	driverstest.QemuIO(t, img, "read -P 0 0 12345", "read -P 0 212345 1M")
	requireClean(t, img)
}

// readHeader returns the first 4 KiB of img (the header and its
// extensions; qemu-img create keeps them in there).
func readHeader(t *testing.T, img string) []byte {
	t.Helper()
	f, err := os.Open(img)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	b := make([]byte, 4096)
	if _, err := io.ReadFull(f, b); err != nil {
		t.Fatal(err)
	}
	if string(b[:4]) != "QFI\xfb" || binary.BigEndian.Uint32(b[4:]) != 3 {
		t.Fatalf("%s: not a qcow2 v3 header", img)
	}
	return b
}

func writeHeader(t *testing.T, img string, b []byte) {
	t.Helper()
	f, err := os.OpenFile(img, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteAt(b, 0); err != nil {
		t.Fatal(err)
	}
}

// extensionEnd returns the offset of the end-of-extensions marker, failing
// t unless there is room after it for one more 8-byte extension.
func extensionEnd(t *testing.T, hdr []byte) int {
	t.Helper()
	be := binary.BigEndian
	off := int(be.Uint32(hdr[hdrLength:]))
	for off+8 <= len(hdr) {
		typ, n := be.Uint32(hdr[off:]), int(be.Uint32(hdr[off+4:]))
		if typ == 0 {
			break
		}
		off += 8 + (n+7)&^7
	}
	if off+24 > len(hdr) {
		t.Fatalf("no room for a header extension (end at %d)", off)
	}
	for _, c := range hdr[off+8 : off+24] {
		if c != 0 {
			t.Fatalf("the bytes after the header extensions are in use")
		}
	}
	return off
}
