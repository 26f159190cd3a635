package tests

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"imgfuse/drivers/driverstest"
)

// TestExitCodes provokes every exit code README.md documents, at least
// once each, with the one-line message that goes with it.
func TestExitCodes(t *testing.T) {
	t.Parallel()
	requireE2E(t, "chattr")
	dir := t.TempDir()
	img := filepath.Join(dir, "img.qcow2")
	driverstest.Cmd(t, "qemu-img", "create", "-q", "-f", "qcow2", img, "32M")
	driverstest.Cmd(t, "qemu-img", "snapshot", "-c", "first", img)
	rawImg := filepath.Join(dir, "disk.raw")
	driverstest.Cmd(t, "qemu-img", "create", "-q", "-f", "raw", rawImg, "8M")

	unsupported := filepath.Join(dir, "unsupported.qcow2")
	driverstest.Cmd(t, "cp", img, unsupported)
	driverstest.OrByte(t, unsupported, 72+5, 0x10) // incompatible feature bit 20
	corrupt := filepath.Join(dir, "corrupt.qcow2")
	if err := os.WriteFile(corrupt, append([]byte("QFI\xfb\x00\x00\x00\x03"), make([]byte, 4088)...), 0o644); err != nil {
		t.Fatal(err)
	}
	luks := filepath.Join(dir, "disk.luks")
	if err := os.WriteFile(luks, append([]byte("LUKS\xba\xbe\x00\x01"), make([]byte, 1<<20)...), 0o644); err != nil {
		t.Fatal(err)
	}
	full := filepath.Join(dir, "full")
	if err := os.MkdirAll(filepath.Join(full, "lost+found"), 0o755); err != nil {
		t.Fatal(err)
	}
	mp := newMountpoint(t, false)

	cases := []struct {
		name string
		args []string
		code int
		want string // in stderr
	}{
		{"success", []string{"info", img}, 0, ""},
		{"runtime error", []string{"unmount", mp}, 1, "is not mounted"},
		{"usage: unknown flag", []string{"info", "--bogus", img}, 2, "unknown flag"},
		{"usage: --name with a slash", []string{"mount", "--name", "a/b", img, mp}, 2, "--name"},
		{"usage: --debug of a detached server without --log", []string{"mount", "--debug", img, mp}, 2, "--debug needs --log"},
		{"cannot open: missing", []string{"info", img + ".nope"}, 3, "no such file"},
		{"cannot open: wrong format", []string{"info", "-f", "qcow2", rawImg}, 3, "not a qcow2 image"},
		{"cannot open: no such snapshot", []string{"mount", "--snapshot", "nope", img, mp}, 3, "first (id 1)"},
		{"unsupported feature", []string{"info", unsupported}, 5, "unknown incompatible feature"},
		{"unsupported: LUKS", []string{"mount", luks, mp}, 5, "is a LUKS-encrypted image: not supported"},
		{"corrupt", []string{"info", corrupt}, 6, "corrupt"},
		{"mount failure", []string{"mount", img, filepath.Join(dir, "no-such-dir")}, 7, "does not exist"},
		{"mount failure: not empty", []string{"mount", img, full}, 7, "is not empty (it holds lost+found)"},
	}
	for _, c := range cases {
		r := imgfuse(t, nil, c.args...)
		if r.code != c.code || !strings.Contains(r.stderr, c.want) {
			t.Errorf("%s: imgfuse %s: want exit %d and %q\n%v", c.name, strings.Join(c.args, " "), c.code, c.want, r)
		}
		if lines := strings.Count(strings.TrimSpace(r.stderr), "\n"); c.code > 2 && lines > 0 {
			t.Errorf("%s: the error takes %d lines:\n%s", c.name, lines+1, r.stderr)
		}
		if c.code != 0 && mounted(t, mp) {
			t.Fatalf("%s: left a mount behind", c.name)
		}
	}

	// 4: a lock conflict, with the way out for readers.
	mp2, _ := mount(t, img, false)
	r := imgfuse(t, nil, "mount", img, mp)
	if r.code != 4 || !strings.Contains(r.stderr, "--force-share") {
		t.Errorf("lock conflict: want exit 4 and a --force-share hint\n%v", r)
	}
	unmount(t, mp2)

	// 8: the final flush fails. A lazy-refcounts mount keeps refcount
	// blocks and the dirty bit for the clean close; the image turning
	// immutable in between makes that write fail.
	lazy := filepath.Join(dir, "lazy.qcow2")
	driverstest.Cmd(t, "qemu-img", "create", "-q", "-f", "qcow2", lazy, "32M")
	mp3, disk := mount(t, lazy, false, "--lazy-refcounts")
	f, err := os.OpenFile(disk, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt(make([]byte, 256<<10), 1<<20); err != nil {
		t.Fatal(err)
	}
	if err := f.Close(); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("chattr", "+i", lazy).CombinedOutput(); err != nil {
		t.Fatalf("chattr +i: %v %s", err, out)
	}
	t.Cleanup(func() { exec.Command("chattr", "-i", lazy).Run() })
	r = imgfuse(t, nil, "unmount", mp3)
	exec.Command("chattr", "-i", lazy).Run()
	if r.code != 8 || !strings.Contains(r.stderr, "failed to write the image back") {
		t.Errorf("failed final flush: want exit 8\n%v", r)
	}
	// What was not written is recoverable: the image is dirty, and a
	// repair (or the next writable mount) rebuilds its refcounts.
	if r := imgfuse(t, nil, "check", "-r", "all", lazy); r.code != 0 {
		t.Errorf("check -r all after the failed flush: %v", r)
	}
	requireClean(t, lazy)
}
