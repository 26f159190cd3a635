package tests

import (
	"bytes"
	"encoding/binary"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
)

// TestWriteDamagedMetadata (issue 7, defect 1): on images made by qemu-img
// with one metadata field damaged, 16 × 64 KiB of O_DIRECT writes through
// a writable mount fail with EIO instead of landing on metadata; the image
// is marked corrupt, `qemu-img check` finds no error it did not find
// before, reads go on, and the data written before the damage reads back.
func TestWriteDamagedMetadata(t *testing.T) {
	t.Parallel()
	requireE2E(t, "qemu-img", "qemu-io", "dd")
	type layout struct{ cs, l1, reftable, refblock, l2, l2b int64 }
	// refcount0 sets the 16-bit refcount of the cluster at off to 0.
	refcount0 := func(t *testing.T, img string, m layout, off int64) {
		olPutBytes(t, img, m.refblock+2*(off/m.cs), []byte{0, 0})
	}
	const copied = uint64(1) << 63
	cases := []struct {
		name    string
		cluster int
		at      int64 // guest offset of the writes
		damage  func(t *testing.T, img string, m layout)
	}{
		{"refcount-0-for-l1", 0, 8 << 20, func(t *testing.T, img string, m layout) { refcount0(t, img, m, m.l1) }},
		{"refcount-0-for-reftable", 0, 8 << 20, func(t *testing.T, img string, m layout) { refcount0(t, img, m, m.reftable) }},
		{"refcount-0-for-l2", 0, 8 << 20, func(t *testing.T, img string, m layout) { refcount0(t, img, m, m.l2) }},
		{"refblock-at-l1", 0, 8 << 20, func(t *testing.T, img string, m layout) { olPutBE64(t, img, m.reftable, uint64(m.l1)) }},
		{"refblock-at-reftable", 0, 8 << 20, func(t *testing.T, img string, m layout) { olPutBE64(t, img, m.reftable, uint64(m.reftable)) }},
		{"refblock-missing", 0, 8 << 20, func(t *testing.T, img string, m layout) { olPutBE64(t, img, m.reftable, 0) }},
		{"l2-entry-into-refblock", 0, 8 << 20, func(t *testing.T, img string, m layout) {
			olPutBE64(t, img, m.l2+8*((8<<20)/m.cs), uint64(m.refblock)|copied)
		}},
		{"l2-entry-into-other-l2", 4096, 1 << 20, func(t *testing.T, img string, m layout) {
			if m.l2b == 0 {
				t.Fatal("no second L2 table")
			}
			olPutBE64(t, img, m.l2+8*((1<<20)/m.cs), uint64(m.l2b)|copied)
		}},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			dir := t.TempDir()
			img := filepath.Join(dir, "img.qcow2")
			args := []string{"create", "-q", "-f", "qcow2"}
			if c.cluster != 0 {
				args = append(args, "-o", "cluster_size="+strconv.Itoa(c.cluster))
			}
			olRun(t, "qemu-img", append(args, img, "32M")...)
			// qemu-io flushes: this data is on disk before the damage.
			olRun(t, "qemu-io", "-f", "qcow2", "-c", "write -P 0x5a 0 1M", "-c", "write -P 0x5b 4M 64k", img)
			var m layout
			m.cs = 1 << (olGetBE64(t, img, 16) & 0xffffffff)
			m.l1 = int64(olGetBE64(t, img, 40))
			m.l2 = int64(olGetBE64(t, img, m.l1) & 0x00fffffffffffe00)
			m.l2b = int64(olGetBE64(t, img, m.l1+16) & 0x00fffffffffffe00)
			m.reftable = int64(olGetBE64(t, img, 48))
			m.refblock = int64(olGetBE64(t, img, m.reftable))
			c.damage(t, img, m)
			_, before := qemuCheck(t, img)

			mp, disk := mount(t, img, false)
			src := filepath.Join(dir, "src")
			if err := os.WriteFile(src, bytes.Repeat([]byte{0xc3}, 1<<20), 0o644); err != nil {
				t.Fatal(err)
			}
			out, err := exec.Command("dd", "if="+src, "of="+disk, "bs=64k", "count=16",
				"seek="+strconv.FormatInt(c.at>>16, 10), "oflag=direct", "conv=notrunc,fsync").CombinedOutput()
			if err == nil || !strings.Contains(string(out), "Input/output error") {
				t.Fatalf("dd over damaged metadata: %v, want EIO\n%s", err, out)
			}
			got := make([]byte, 1<<20)
			f, err := os.Open(disk)
			if err != nil {
				t.Fatal(err)
			}
			_, err = f.ReadAt(got, 0)
			f.Close()
			if err != nil || !bytes.Equal(got, bytes.Repeat([]byte{0x5a}, 1<<20)) {
				t.Errorf("read through the mount after the refused write: %v (or wrong data)", err)
			}
			// The final flush fails on a corrupt image: only the
			// unmount itself matters here.
			imgfuse(t, nil, "unmount", mp)
			if mounted(t, mp) {
				t.Fatalf("%s still mounted", mp)
			}

			if v := olGetBE64(t, img, 72); v&2 == 0 {
				t.Errorf("corrupt bit not set: incompatible features %#x", v)
			}
			_, after := qemuCheck(t, img)
			if added := olNewLines(olErrorLines(before), olErrorLines(after)); len(added) > 0 {
				t.Errorf("qemu-img check finds new errors:\n%s\nbefore:\n%s\nafter:\n%s",
					strings.Join(added, "\n"), before, after)
			}
			olRun(t, "qemu-io", "-r", "-f", "qcow2", "-c", "read -P 0x5a 0 1M", img)
		})
	}
}

// olErrorLines returns the ERROR lines of qemu-img check output.
func olErrorLines(out string) []string {
	var lines []string
	for _, l := range strings.Split(out, "\n") {
		if strings.HasPrefix(l, "ERROR") {
			lines = append(lines, l)
		}
	}
	return lines
}

// olNewLines returns the lines of after that are not in before.
func olNewLines(before, after []string) []string {
	seen := map[string]bool{}
	for _, l := range before {
		seen[l] = true
	}
	var added []string
	for _, l := range after {
		if !seen[l] {
			added = append(added, l)
		}
	}
	return added
}

// olRun runs a command and fails t unless it succeeds (qemu-io reports some
// failed commands with exit status 0, so its output is checked too).
func olRun(t *testing.T, name string, args ...string) {
	t.Helper()
	out, err := exec.Command(name, args...).CombinedOutput()
	if err != nil || name == "qemu-io" && bytes.Contains(out, []byte("failed")) {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
}

func olGetBE64(t *testing.T, path string, off int64) uint64 {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var b [8]byte
	if _, err := f.ReadAt(b[:], off); err != nil {
		t.Fatal(err)
	}
	return binary.BigEndian.Uint64(b[:])
}

func olPutBE64(t *testing.T, path string, off int64, v uint64) {
	t.Helper()
	var b [8]byte
	binary.BigEndian.PutUint64(b[:], v)
	olPutBytes(t, path, off, b[:])
}

func olPutBytes(t *testing.T, path string, off int64, b []byte) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteAt(b, off); err != nil {
		t.Fatal(err)
	}
}
