package driverstest

import (
	"bytes"
	"crypto/sha256"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"imgfuse/internal/testenv"
)

// Required reports whether missing prerequisites (tools, /dev/fuse, root)
// must fail tests instead of skipping them: in CI, or when
// IMGFUSE_REQUIRE_E2E=1 (testenv.Required).
func Required() bool { return testenv.Required() }

// SkipUnless skips t (or fails it when Required) unless ok.
func SkipUnless(t testing.TB, ok bool, format string, args ...any) {
	t.Helper()
	testenv.SkipUnless(t, ok, format, args...)
}

// RequireTools skips t (or fails it when Required) unless every named
// command is on PATH.
func RequireTools(t testing.TB, names ...string) {
	t.Helper()
	for _, n := range names {
		_, err := exec.LookPath(n)
		SkipUnless(t, err == nil, "%s not on PATH", n)
	}
}

// Cmd runs name with args and fails t, showing the output, unless it
// exits 0. It returns stdout.
func Cmd(t testing.TB, name string, args ...string) []byte {
	t.Helper()
	var stdout, stderr bytes.Buffer
	c := exec.Command(name, args...)
	c.Stdout, c.Stderr = &stdout, &stderr
	if err := c.Run(); err != nil {
		t.Fatalf("%s %s: %v\nstdout: %s\nstderr: %s", name, strings.Join(args, " "), err, stdout.Bytes(), stderr.Bytes())
	}
	return stdout.Bytes()
}

// QemuIO runs each of cmds with qemu-io on a qcow2 image and fails t if one
// fails. qemu-io exits 0 for some failed commands and reports them in its
// output, so the output is checked too.
func QemuIO(t testing.TB, img string, cmds ...string) {
	t.Helper()
	QemuIOFormat(t, "qcow2", img, cmds...)
}

// QemuIOFormat is QemuIO on an image of the named format ("vdi", "vpc").
func QemuIOFormat(t testing.TB, format, img string, cmds ...string) {
	t.Helper()
	if len(cmds) == 0 {
		return
	}
	args := []string{"-f", format}
	for _, c := range cmds {
		args = append(args, "-c", c)
	}
	args = append(args, img)
	out := Cmd(t, "qemu-io", args...)
	for _, bad := range []string{"failed", "error", "Error"} {
		if bytes.Contains(out, []byte(bad)) {
			t.Fatalf("qemu-io %v: %s", cmds, out)
		}
	}
}

// DirState returns the sha256 and mtime of every regular file in dir, by
// name: what a read-only use of the images there must leave unchanged.
func DirState(t testing.TB, dir string) map[string]string {
	t.Helper()
	out := map[string]string{}
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range ents {
		if !e.Type().IsRegular() {
			continue
		}
		p := filepath.Join(dir, e.Name())
		b, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		fi, err := os.Stat(p)
		if err != nil {
			t.Fatal(err)
		}
		out[e.Name()] = fmt.Sprintf("sha256 %x, mtime %v", sha256.Sum256(b), fi.ModTime())
	}
	return out
}

// ForeignSource makes in dir the images of formats other than qcow2 and
// raw that tests of probing and refusal share: a 4 MiB raw file src.raw
// full of data and, converted from it, a streamOptimized VMDK
// stream.vmdk (qemu-img creates that subformat only by conversion). It
// returns src.raw's path and a function that runs qemu-img create -f
// format [opts] name 4M in dir and returns the new image's path.
func ForeignSource(t testing.TB, dir string) (src string, create func(name, format string, opts ...string) string) {
	t.Helper()
	create = func(name, format string, opts ...string) string {
		t.Helper()
		path := filepath.Join(dir, name)
		args := append([]string{"create", "-q", "-f", format}, opts...)
		Cmd(t, "qemu-img", append(args, path, "4M")...)
		return path
	}
	src = create("src.raw", "raw")
	if err := os.WriteFile(src, bytes.Repeat([]byte("guest data"), 4<<20/10), 0o644); err != nil {
		t.Fatal(err)
	}
	Cmd(t, "qemu-img", "convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=streamOptimized", src, filepath.Join(dir, "stream.vmdk"))
	return src, create
}
