package main

import (
	"bytes"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"imgfuse/drivers"
	"imgfuse/drivers/driverstest"
	"imgfuse/imgtool"
)

// TestOpenErrorMessages provokes every way an image can fail to open with
// each command that opens one, and checks the message: one line, one
// "imgfuse: " prefix, the image named exactly once, the reason, and the
// exit code.
func TestOpenErrorMessages(t *testing.T) {
	requireQemuImg(t)
	dir := t.TempDir()
	path := func(name string) string { return filepath.Join(dir, name) }
	qemuImg(t, dir, "create", "-q", "-f", "qcow2", "ok.qcow2", "32M")
	qemuImg(t, dir, "snapshot", "-c", "first", "ok.qcow2")
	qemuImg(t, dir, "create", "-q", "-f", "raw", "disk.raw", "1M")
	qemuImg(t, dir, "create", "-q", "-f", "qcow2", "-u", "-b", "gone.qcow2", "-F", "qcow2", "orphan.qcow2", "32M")
	qemuImg(t, dir, "create", "-q", "-f", "qcow2", "loop1.qcow2", "32M")
	qemuImg(t, dir, "create", "-q", "-f", "qcow2", "-b", "loop1.qcow2", "-F", "qcow2", "loop2.qcow2")
	qemuImg(t, dir, "rebase", "-q", "-u", "-b", "loop2.qcow2", "-F", "qcow2", "loop1.qcow2")
	qemuImg(t, dir, "create", "-q", "-f", "qcow2", "--object", "secret,id=s0,data=pw",
		"-o", "encrypt.format=aes,encrypt.key-secret=s0", "aes.qcow2", "1M")
	copyFile(t, path("ok.qcow2"), path("unsupported.qcow2"))
	driverstest.OrByte(t, path("unsupported.qcow2"), 72+5, 0x10) // incompatible feature bit 20
	// LUKS containers by hand: qemu-img needs seconds of key stretching
	// for one, and only the header matters here. crypt_method 2 is what
	// qemu-img writes for encrypt.format=luks.
	copyFile(t, path("ok.qcow2"), path("marked.qcow2"))
	driverstest.OrByte(t, path("marked.qcow2"), 72+7, 2) // incompatible feature bit 1: corrupt
	copyFile(t, path("ok.qcow2"), path("luks.qcow2"))
	driverstest.OrByte(t, path("luks.qcow2"), 32+3, 2)
	if err := os.WriteFile(path("disk.luks"), append([]byte("LUKS\xba\xbe\x00\x01"), make([]byte, 1<<20)...), 0o644); err != nil {
		t.Fatal(err)
	}
	qemuImg(t, dir, "create", "-q", "-f", "parallels", "disk.hds", "4M")
	qemuImg(t, dir, "create", "-q", "-f", "qed", "disk.qed", "4M")
	qemuImg(t, dir, "create", "-q", "-f", "qcow2", "-b", "disk.qed", "-F", "qed", "over-qed.qcow2")
	if err := os.WriteFile(path("corrupt.qcow2"), append([]byte("QFI\xfb\x00\x00\x00\x03"), make([]byte, 4088)...), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Mkdir(path("dir.qcow2"), 0o755); err != nil {
		t.Fatal(err)
	}
	mnt := path("mnt")
	if err := os.Mkdir(mnt, 0o755); err != nil {
		t.Fatal(err)
	}

	// code gives the exit code per command; a command left out does not
	// fail on that image (info and check open no backing file, check
	// exits 1 for every open failure, as qemu-img check does).
	type codes map[string]int
	tests := []struct {
		name  string
		image string
		flags []string
		want  string
		code  codes
	}{
		{"missing file", "nope.qcow2", nil, ": no such file or directory",
			codes{"mount": imgtool.ExitOpen, "info": imgtool.ExitOpen, "check": imgtool.CheckFailed, "map": imgtool.ExitOpen}},
		{"directory", "dir.qcow2", nil, ": is a directory, not a regular file or block device",
			codes{"mount": imgtool.ExitOpen, "info": imgtool.ExitOpen, "check": imgtool.CheckFailed, "map": imgtool.ExitOpen}},
		{"wrong format", "disk.raw", []string{"-f", "qcow2"}, ": not a qcow2 image (its contents look like raw)",
			codes{"mount": imgtool.ExitOpen, "info": imgtool.ExitOpen, "check": imgtool.CheckFailed, "map": imgtool.ExitOpen}},
		{"corrupt header", "corrupt.qcow2", nil, ": cluster_bits 0 below the minimum 9: image is corrupt",
			codes{"mount": imgtool.ExitCorrupt, "info": imgtool.ExitCorrupt, "check": imgtool.CheckFailed, "map": imgtool.ExitCorrupt}},
		{"missing backing file", "orphan.qcow2", nil, `: backing file "gone.qcow2": no such file or directory`,
			codes{"mount": imgtool.ExitOpen, "map": imgtool.ExitOpen}},
		{"missing backing file, info --backing-chain", "orphan.qcow2", []string{"--backing-chain"}, "gone.qcow2: no such file or directory",
			codes{"info": imgtool.ExitOpen}},
		{"backing loop", "loop1.qcow2", nil, `: backing file "loop2.qcow2": backing file "loop1.qcow2": backing chain loop: the file appears twice in the chain`,
			codes{"mount": imgtool.ExitCorrupt, "map": imgtool.ExitCorrupt}},
		{"backing loop, info --backing-chain", "loop1.qcow2", []string{"--backing-chain"}, "backing chain loop: the file appears twice in the chain",
			codes{"info": imgtool.ExitCorrupt}},
		{"unsupported feature", "unsupported.qcow2", nil, ": unsupported qcow2 feature(s): unknown incompatible feature bit 20",
			codes{"mount": imgtool.ExitUnsupported, "info": imgtool.ExitUnsupported, "check": imgtool.CheckFailed, "map": imgtool.ExitUnsupported}},
		{"LUKS container", "disk.luks", nil, ": is a LUKS-encrypted image: not supported (--format raw exposes its encrypted bytes)",
			codes{"mount": imgtool.ExitUnsupported, "info": imgtool.ExitUnsupported, "check": imgtool.ExitUnsupported, "map": imgtool.ExitUnsupported}},
		// Formats imgfuse recognises and cannot read: refused by name,
		// exit 5 from every command (check too: nothing was checked).
		{"Parallels image", "disk.hds", nil, " is a Parallels image; imgfuse reads qcow2, raw, vdi, vhdx, vmdk and vpc (-f raw exposes the file's own bytes)\n",
			codes{"mount": imgtool.ExitUnsupported, "info": imgtool.ExitUnsupported, "check": imgtool.ExitUnsupported, "map": imgtool.ExitUnsupported}},
		{"QED image", "disk.qed", nil, " is a QED image; imgfuse reads qcow2, raw, vdi, vhdx, vmdk and vpc (-f raw exposes the file's own bytes)\n",
			codes{"mount": imgtool.ExitUnsupported, "info": imgtool.ExitUnsupported, "check": imgtool.ExitUnsupported, "map": imgtool.ExitUnsupported}},
		{"QED image as qcow2", "disk.qed", []string{"-f", "qcow2"}, ": not a qcow2 image (it is a QED image)",
			codes{"mount": imgtool.ExitOpen, "info": imgtool.ExitOpen, "check": imgtool.CheckFailed, "map": imgtool.ExitOpen}},
		{"QED backing file, named", "over-qed.qcow2", nil, `: backing file "disk.qed": is a QED image: not supported`,
			codes{"mount": imgtool.ExitUnsupported, "map": imgtool.ExitUnsupported}},
		{"QED backing file, info --backing-chain", "over-qed.qcow2", []string{"--backing-chain"}, " is a QED image; imgfuse reads qcow2, raw, vdi, vhdx, vmdk and vpc",
			codes{"info": imgtool.ExitUnsupported}},
		{"LUKS container as qcow2", "disk.luks", []string{"-f", "qcow2"}, ": not a qcow2 image (it is a LUKS-encrypted image)",
			codes{"mount": imgtool.ExitOpen, "info": imgtool.ExitOpen, "check": imgtool.CheckFailed, "map": imgtool.ExitOpen}},
		{"LUKS-encrypted qcow2", "luks.qcow2", nil, ": LUKS-encrypted qcow2 images are not supported",
			codes{"mount": imgtool.ExitUnsupported, "info": imgtool.ExitUnsupported, "check": imgtool.CheckFailed, "map": imgtool.ExitUnsupported}},
		{"AES-encrypted qcow2", "aes.qcow2", nil, ": AES-encrypted qcow2 images are not supported",
			codes{"mount": imgtool.ExitUnsupported, "info": imgtool.ExitUnsupported, "check": imgtool.CheckFailed, "map": imgtool.ExitUnsupported}},
		// The reason and the way out once: no second read-only hint.
		{"marked corrupt", "marked.qcow2", nil, ": the image is marked corrupt; it can only be opened read-only (repair it with imgfuse check -r all): image is corrupt\n",
			codes{"mount": imgtool.ExitCorrupt}},
		{"no such snapshot", "ok.qcow2", []string{"--snapshot", "nope"}, `: no such snapshot "nope" (the image has: first (id 1))`,
			codes{"mount": imgtool.ExitOpen}},
	}
	for _, tt := range tests {
		for _, cmd := range []string{"mount", "info", "check", "map"} {
			code, ok := tt.code[cmd]
			if !ok {
				continue
			}
			t.Run(tt.name+"/"+cmd, func(t *testing.T) {
				image := path(tt.image)
				args := append(append([]string{cmd}, tt.flags...), image)
				if cmd == "mount" {
					args = append(args, mnt)
				}
				got, _, stderr := runCLI(t, args...)
				checkOneLine(t, stderr, image, tt.want)
				if got != code {
					t.Errorf("exit %d, want %d", got, code)
				}
				assertNotMounted(t, mnt)
			})
		}
	}

	// A lock held by another open of the image (QEMU's locks are open
	// file description locks, so this process's own conflicts too).
	t.Run("locked", func(t *testing.T) {
		image := path("ok.qcow2")
		d, _, err := drivers.Open(image, "qcow2", drivers.OpenOptions{Formats: imgtool.Formats()})
		if err != nil {
			t.Fatal(err)
		}
		defer d.Close()
		code, _, stderr := runCLI(t, "mount", image, mnt)
		// The daemon names the holder: this process.
		comm, err := os.ReadFile("/proc/self/comm")
		if err != nil {
			t.Fatal(err)
		}
		checkOneLine(t, stderr, image, fmt.Sprintf(`: failed to get "write" lock: is another process using the image %s? (held by pid %d (%s); to read it while another process writes it, use --force-share / -U)`,
			image, os.Getpid(), strings.TrimSpace(string(comm))))
		if code != imgtool.ExitLocked {
			t.Errorf("exit %d, want %d", code, imgtool.ExitLocked)
		}
		assertNotMounted(t, mnt)
	})

	// Permission denied needs a user the file's mode applies to.
	t.Run("permission denied", func(t *testing.T) {
		image := path("ok.qcow2")
		if err := os.Chmod(image, 0); err != nil {
			t.Fatal(err)
		}
		for _, cmd := range []string{"mount", "info", "check", "map"} {
			args := []string{cmd, image}
			if cmd == "mount" {
				args = append(args, mnt)
			}
			code, stderr := runUnprivileged(t, args...)
			checkOneLine(t, stderr, image, ": permission denied")
			want := imgtool.ExitOpen
			if cmd == "check" {
				want = imgtool.CheckFailed
			}
			if code != want {
				t.Errorf("%s: exit %d, want %d", cmd, code, want)
			}
		}
	})
}

// checkOneLine checks an error message: one line, one "imgfuse: " prefix,
// image named exactly once, at most one driver prefix (the driver that
// names the image: "qcow2: IMAGE: ..."), and the reason want.
func checkOneLine(t *testing.T, stderr, image, want string) {
	t.Helper()
	prefixes := strings.Count(stderr, " qcow2: ") + strings.Count(stderr, " raw: ") + strings.Count(stderr, " luks: ")
	switch {
	case strings.Count(stderr, "\n") != 1 || !strings.HasSuffix(stderr, "\n"):
		t.Errorf("not one line: %q", stderr)
	case !strings.HasPrefix(stderr, "imgfuse: ") || strings.Count(stderr, "imgfuse: ") != 1:
		t.Errorf("not one 'imgfuse: ' prefix: %q", stderr)
	case strings.Count(stderr, image) != 1:
		t.Errorf("names %s %d times: %q", image, strings.Count(stderr, image), stderr)
	case prefixes > 1:
		t.Errorf("%d driver prefixes: %q", prefixes, stderr)
	case !strings.Contains(stderr, want):
		t.Errorf("%q does not say %q", stderr, want)
	}
}

// runUnprivileged runs the command line as user nobody, with a copy of
// this test binary (standing in for imgfuse) where nobody may run it. As a
// user other than root it runs it as is.
func runUnprivileged(t *testing.T, args ...string) (code int, stderr string) {
	t.Helper()
	if os.Geteuid() != 0 {
		code, _, stderr := runCLI(t, args...)
		return code, stderr
	}
	dir, err := os.MkdirTemp("", "imgfuse-unpriv-")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(dir, "imgfuse")
	copyFile(t, os.Args[0], bin)
	if err := os.Chmod(bin, 0o755); err != nil {
		t.Fatal(err)
	}
	// The images' directory must be searchable for the error to be the
	// file's own.
	for d := filepath.Dir(args[1]); d != "/"; d = filepath.Dir(d) {
		if fi, err := os.Stat(d); err == nil && fi.Mode().Perm()&0o001 == 0 {
			if err := os.Chmod(d, fi.Mode().Perm()|0o011); err != nil {
				t.Fatal(err)
			}
		}
	}
	var errb bytes.Buffer
	c := exec.Command(bin, args...)
	c.Env = append(os.Environ(), asCLIEnv+"=1") // act as imgfuse, not as a test or a daemon
	c.Stderr = &errb
	c.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: 65534, Gid: 65534}}
	err = c.Run()
	if ee, ok := err.(*exec.ExitError); ok {
		return ee.ExitCode(), errb.String()
	} else if err != nil {
		t.Fatal(err)
	}
	return 0, errb.String()
}

func copyFile(t *testing.T, from, to string) {
	t.Helper()
	in, err := os.Open(from)
	if err != nil {
		t.Fatal(err)
	}
	defer in.Close()
	out, err := os.Create(to)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := io.Copy(out, in); err != nil {
		t.Fatal(err)
	}
	if err := out.Close(); err != nil {
		t.Fatal(err)
	}
}
