package foreign

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"syscall"
	"testing"

	"imgfuse/coroutine"
	"imgfuse/drivers"
)

// TestOpenRefused: a probing open of a foreign file fails as unsupported
// with an *Error naming the format; naming raw opens its bytes.
func TestOpenRefused(t *testing.T) {
	t.Parallel()
	for _, tt := range []struct {
		head, msg string
	}{
		{"LUKS\xba\xbe\x00\x01", "is a LUKS-encrypted image: not supported"},
		{"WithouFreSpacExt\x02\x00\x00\x00", "is a Parallels image: not supported"},
		{"QED\x00", "is a QED image: not supported"},
	} {
		path := filepath.Join(t.TempDir(), "c.img")
		if err := os.WriteFile(path, append([]byte(tt.head), make([]byte, 1<<20-len(tt.head))...), 0o644); err != nil {
			t.Fatal(err)
		}
		_, _, err := drivers.Open(path, "auto", drivers.OpenOptions{ReadOnly: true, Formats: all()})
		var fe *Error
		if !errors.Is(err, drivers.ErrUnsupported) || !errors.As(err, &fe) || err.Error() != tt.msg {
			t.Errorf("probing open of %q: %v", tt.head, err)
		}
		d, f, err := drivers.Open(path, "raw", drivers.OpenOptions{ReadOnly: true, NoDirectIO: true, Formats: all()})
		if err != nil || f.Name() != "raw" || d.Size() != 1<<20 {
			t.Fatalf("open as raw: %v", err)
		}
		d.Close()
	}
}

// guardCases are sectors a guest could write to make its probed raw disk
// another format next time: a header at the start, or a fixed VHD footer
// at the end.
var guardCases = []struct {
	name string
	p    []byte
	tail bool // written as the last sector
}{
	{"LUKS", []byte("LUKS\xba\xbe\x00\x01"), false},
	{"VHDX", []byte("vhdxfile"), false},
	{"VMDK", []byte("KDMV\x01\x00\x00\x00"), false},
	{"VMDK descriptor", []byte("# Disk DescriptorFile\nversion=1\n"), false},
	{"VDI", sector(map[int]string{0x40: "\x7f\x10\xda\xbe"}), false},
	{"VHD", []byte("conectix"), false},
	{"qcow", []byte("QFI\xfb\x00\x00\x00\x01"), false},
	{"QED", []byte("QED\x00"), false},
	{"Parallels", sector(map[int]string{0: "WithouFreSpacExt", 16: le32(2)}), false},
	{"cloop", []byte(cloopMagic), false},
	{"fixed VHD footer", vhdFooter(2, false), true},
}

func openRaw(t *testing.T, size int, format string, growable bool) (drivers.Driver, string) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "disk.raw")
	if err := os.WriteFile(path, bytes.Repeat([]byte{0x5a}, size), 0o644); err != nil {
		t.Fatal(err)
	}
	d, f, err := drivers.Open(path, format, drivers.OpenOptions{NoDirectIO: true, Growable: growable, Formats: all(), Logf: t.Logf})
	if err != nil || f.Name() != "raw" {
		t.Fatalf("open: %v", err)
	}
	t.Cleanup(func() { d.Close() })
	return d, path
}

func probeFile(t *testing.T, path string) string {
	t.Helper()
	f, err := drivers.ProbeFile(all(), path)
	if err != nil {
		t.Fatal(err)
	}
	return f.Name()
}

// TestRawProbeGuard: with the foreign formats in the list, a probed
// writable raw image refuses (EPERM) a guest write that would make it
// probe as one of them: a header in the first sector, a fixed VHD footer
// in the last; the file is unchanged. The same write to an image opened
// as named raw goes through, and the file then probes as the format.
func TestRawProbeGuard(t *testing.T) {
	t.Parallel()
	const size = 1 << 20
	for _, tt := range guardCases {
		off := int64(0)
		if tt.tail {
			off = size - int64(len(tt.p))
		}
		d, path := openRaw(t, size, "auto", false)
		before, _ := os.ReadFile(path)
		var err error
		coroutine.Run(func(co *coroutine.Co) { _, err = d.WriteAt(co, tt.p, off) })
		if !errors.Is(err, syscall.EPERM) {
			t.Errorf("%s: write to a probed raw image: %v, want EPERM", tt.name, err)
		}
		if after, _ := os.ReadFile(path); !bytes.Equal(before, after) {
			t.Errorf("%s: a refused write changed the image", tt.name)
		}

		d, path = openRaw(t, size, "raw", false)
		coroutine.Run(func(co *coroutine.Co) { _, err = d.WriteAt(co, tt.p, off) })
		if err != nil {
			t.Errorf("%s: write to a named raw image: %v", tt.name, err)
		}
		if got := probeFile(t, path); got == "raw" {
			t.Errorf("%s: written with --format raw, the image still probes as raw: the case tests nothing", tt.name)
		}
	}
}

// TestRawProbeGuardTail: the last sector is guarded however it is
// reached: a footer written in pieces, a footer left just before the end
// and moved into the last sector by growing the disk (Truncate, or a
// growing write), a footer whose checksum a zero range would complete.
// Writes that leave the tail raw go through.
func TestRawProbeGuardTail(t *testing.T) {
	t.Parallel()
	const size = 64 << 10
	footer := vhdFooter(2, false)
	run := func(d drivers.Driver, f func(co *coroutine.Co) error) (err error) {
		coroutine.Run(func(co *coroutine.Co) { err = f(co) })
		return err
	}
	write := func(d drivers.Driver, p []byte, off int64) error {
		return run(d, func(co *coroutine.Co) error { _, err := d.WriteAt(co, p, off); return err })
	}

	d, path := openRaw(t, size, "auto", true)
	if err := write(d, footer[:300], size-512); err != nil {
		t.Fatalf("first part of the footer: %v", err) // a bad checksum: raw
	}
	if err := write(d, footer[300:], size-212); !errors.Is(err, syscall.EPERM) {
		t.Errorf("completing the footer: %v, want EPERM", err)
	}
	// The whole footer 100 bytes before the end: the last sector then
	// starts with 100 bytes of it, not a footer.
	if err := write(d, make([]byte, 512), size-512); err != nil {
		t.Fatal(err)
	}
	if err := write(d, footer[:412], size-412); err != nil {
		t.Fatalf("a footer's start inside the last sector: %v", err)
	}
	// Growing by 100 bytes would make those 412 bytes and 100 zeros the
	// last sector: a valid footer (its last 100 bytes are zeros).
	if err := run(d, func(co *coroutine.Co) error { return d.Truncate(co, size+100) }); !errors.Is(err, syscall.EPERM) {
		t.Errorf("truncate that makes the last sector a footer: %v, want EPERM", err)
	}
	if err := write(d, []byte{0}, size+99); !errors.Is(err, syscall.EPERM) {
		t.Errorf("growing write that makes the last sector a footer: %v, want EPERM", err)
	}
	if fi, _ := os.Stat(path); fi.Size() != size {
		t.Errorf("refused growth changed the size to %d", fi.Size())
	}
	if err := run(d, func(co *coroutine.Co) error { return d.Truncate(co, size+4096) }); err != nil {
		t.Errorf("truncate that leaves zeros at the end: %v", err)
	}
	if got := probeFile(t, path); got != "raw" {
		t.Errorf("after refused changes the image probes as %s", got)
	}

	// A footer whose checksum counts bytes a zero range then clears.
	d, path = openRaw(t, size, "auto", false)
	bad := bytes.Clone(footer)
	bad[100] = 7
	if err := write(d, bad, size-512); err != nil {
		t.Fatalf("footer with a wrong checksum: %v", err)
	}
	err := run(d, func(co *coroutine.Co) error { return d.WriteZeroes(co, size-512+100, 1, false) })
	if !errors.Is(err, syscall.EPERM) {
		t.Errorf("zeroing the byte that spoils the checksum: %v, want EPERM", err)
	}
	err = run(d, func(co *coroutine.Co) error { return d.Discard(co, size-512, 512) })
	if err != nil {
		t.Errorf("discarding the last sector: %v", err)
	}
	if got := probeFile(t, path); got != "raw" {
		t.Errorf("image probes as %s", got)
	}
}
