package qcow2

import (
	"errors"
	"path/filepath"
	"strings"
	"testing"

	"imgfuse/coroutine"
	"imgfuse/drivers"
	"imgfuse/drivers/driverstest"
)

// TestErrorsNameTheImageOnce: whatever fails, and however many layers of
// the driver add context on the way up, an error carries one "qcow2: "
// prefix and names the image once (a backing file's error keeps its own
// name, once); the sentinels still match with errors.Is.
func TestErrorsNameTheImageOnce(t *testing.T) {
	requireQemu(t)
	const cs = 65536
	dir := t.TempDir()
	mk := func(name string, args ...string) string {
		p := filepath.Join(dir, name)
		qemuImg(t, append([]string{"create", "-q", "-f", "qcow2"}, append(args, p, "8M")...)...)
		driverstest.QemuIO(t, p, "write -P 0x11 0 128k")
		return p
	}
	once := func(t *testing.T, err error, sentinel error, names ...string) {
		t.Helper()
		if !errors.Is(err, sentinel) {
			t.Fatalf("error %v does not wrap %v", err, sentinel)
		}
		msg := err.Error()
		if n := strings.Count(" "+msg, " qcow2: "); n != len(names) {
			t.Errorf("%d \"qcow2: \" prefixes, want %d: %s", n, len(names), msg)
		}
		for _, p := range names {
			if n := strings.Count(msg, p); n != 1 {
				t.Errorf("%s named %d times: %s", p, n, msg)
			}
		}
		if !strings.HasPrefix(msg, "qcow2: "+names[0]+": ") {
			t.Errorf("error does not start with the image: %s", msg)
		}
	}
	run := func(fn func(co *coroutine.Co) error) error {
		var err error
		coroutine.Run(func(co *coroutine.Co) { err = fn(co) })
		return err
	}

	t.Run("read-unaligned-l2-entry", func(t *testing.T) {
		p := mk("unaligned.qcow2")
		l2, _ := firstL2(t, p)
		putFileBE64(t, p, l2+8, fileBE64(t, p, l2+8)+512)
		d := openTest(t, p, drivers.OpenOptions{})
		err := run(func(co *coroutine.Co) error { _, err := d.ReadAt(co, make([]byte, 4096), cs); return err })
		once(t, err, drivers.ErrCorrupt, p)
	})
	t.Run("write-read-only", func(t *testing.T) {
		p := mk("ro.qcow2")
		d := openTest(t, p, drivers.OpenOptions{})
		err := run(func(co *coroutine.Co) error { _, err := d.WriteAt(co, make([]byte, 512), 0); return err })
		once(t, err, drivers.ErrReadOnly, p)
	})
	t.Run("write-onto-metadata", func(t *testing.T) {
		// L2 entry 1 maps guest cluster 1 onto the L1 table: an
		// in-place write there is refused by the overlap check, which
		// a flush then reports too (the image is marked corrupt).
		p := mk("overlap.qcow2")
		l2, l1 := firstL2(t, p)
		putFileBE64(t, p, l2+8, uint64(l1)|oflagCopied)
		d := openRW(t, p, drivers.OpenOptions{})
		err := run(func(co *coroutine.Co) error { _, err := d.WriteAt(co, make([]byte, 512), cs); return err })
		once(t, err, drivers.ErrCorrupt, p)
		once(t, run(d.Flush), drivers.ErrCorrupt, p)
	})
	t.Run("open-marked-corrupt", func(t *testing.T) {
		p := mk("marked.qcow2")
		putFileBE64(t, p, 72, fileBE64(t, p, 72)|incompatCorrupt)
		_, err := Format{}.Open(p, drivers.OpenOptions{Formats: testFormats})
		once(t, err, drivers.ErrCorrupt, p)
	})
	t.Run("read-through-damaged-backing-file", func(t *testing.T) {
		base := mk("base.qcow2")
		l2, _ := firstL2(t, base)
		putFileBE64(t, base, l2, fileBE64(t, base, l2)+512)
		top := filepath.Join(dir, "top.qcow2")
		qemuImg(t, "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", top)
		d := openTest(t, top, drivers.OpenOptions{})
		err := run(func(co *coroutine.Co) error { _, err := d.ReadAt(co, make([]byte, 4096), 0); return err })
		once(t, err, drivers.ErrCorrupt, top, base)
	})
}
