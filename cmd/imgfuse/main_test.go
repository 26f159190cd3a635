package main

import (
	"bytes"
	"imgfuse/internal/testenv"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// TestMain lets the test binary stand in for imgfuse when `mount` re-execs
// /proc/self/exe as its daemon, so mount tests need no separate build.
func TestMain(m *testing.M) {
	if _, ok := os.LookupEnv(daemonEnv); ok {
		if os.Getenv("IMGFUSE_TEST_DAEMON_CRASH") != "" {
			os.Exit(3) // a daemon that dies before reporting
		}
		os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
	}
	os.Exit(m.Run())
}

// runCLI runs the command line in-process.
func runCLI(t *testing.T, args ...string) (code int, stdout, stderr string) {
	t.Helper()
	var out, errb bytes.Buffer
	code = run(args, &out, &errb)
	return code, out.String(), errb.String()
}

func TestUsageErrors(t *testing.T) {
	tests := []struct {
		name string
		args []string
		code int
		want string // in stderr
	}{
		{"no command", nil, exitUsage, "imgfuse: missing command"},
		{"unknown command", []string{"frobnicate"}, exitUsage, `imgfuse: unknown command "frobnicate"`},
		{"unknown flag", []string{"mount", "--bogus", "a", "b"}, exitUsage, "imgfuse: unknown flag: --bogus"},
		{"mount one arg", []string{"mount", "a"}, exitUsage, "imgfuse: mount needs 2 argument(s): IMAGE MOUNTPOINT (got 1)"},
		{"mount three args", []string{"mount", "a", "b", "c"}, exitUsage, "got 3"},
		{"bad format", []string{"mount", "--format", "vmdk", "a", "b"}, exitUsage, `imgfuse: invalid --format "vmdk"`},
		{"info no arg", []string{"info"}, exitUsage, "imgfuse: info needs 1 argument(s): IMAGE"},
		{"info bad format", []string{"info", "--format", "qed", "x"}, exitUsage, "invalid --format"},
		{"format known only to refuse", []string{"map", "-f", "vhdx", "x"}, exitUsage,
			`invalid --format "vhdx": imgfuse recognises a VHDX image but cannot read it (want one of: auto, qcow2, raw, vdi, vpc)`},
		{"unmount two args", []string{"unmount", "a", "b"}, exitUsage, "unmount needs 1 argument(s)"},
		{"unmount bad timeout", []string{"unmount", "--timeout", "soon", "a"}, exitUsage, `invalid argument "soon"`},
		{"unmount zero timeout", []string{"unmount", "--timeout", "0s", "a"}, exitUsage, "--timeout must be positive"},
		{"demo extra arg", []string{"demo", "x"}, exitUsage, "demo takes no arguments"},
		{"help hint", []string{"mount"}, exitUsage, "Run 'imgfuse mount --help' for usage."},
		{"growable read-only", []string{"mount", "--growable", "--read-only", "a", "b"}, exitUsage, "--growable needs a writable mount, not --read-only"},
		{"growable snapshot", []string{"mount", "--growable", "--snapshot", "s", "a", "b"}, exitUsage, "--snapshot is read-only"},
		{"lazy refcounts force-share", []string{"mount", "--lazy-refcounts", "-U", "a", "b"}, exitUsage, "--lazy-refcounts needs a writable mount; --force-share"},
		{"completion without shell", []string{"completion"}, exitUsage, "imgfuse: completion needs a shell: bash, fish, powershell, zsh"},
		{"completion unknown shell", []string{"completion", "tcsh"}, exitUsage, `imgfuse: unknown shell "tcsh"`},
		{"completion extra arg", []string{"completion", "bash", "x"}, exitUsage, "bash takes no arguments"},
		{"help unknown topic", []string{"help", "frobnicate"}, exitUsage, `imgfuse: unknown help topic "frobnicate"`},
		{"log in a missing directory", []string{"mount", "--log", "/nonexistent-imgfuse-dir/x.log", "a", "b"}, exitUsage, "imgfuse: --log /nonexistent-imgfuse-dir/x.log: no such directory /nonexistent-imgfuse-dir"},
		{"debug detached without log", []string{"mount", "--debug", "a", "b"}, exitUsage, "--debug needs --log FILE (or --foreground"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			code, _, stderr := runCLI(t, tt.args...)
			if code != tt.code {
				t.Errorf("exit %d, want %d; stderr:\n%s", code, tt.code, stderr)
			}
			if !strings.Contains(stderr, tt.want) {
				t.Errorf("stderr %q does not contain %q", stderr, tt.want)
			}
		})
	}
}

func TestVersionAndHelp(t *testing.T) {
	code, out, _ := runCLI(t, "--version")
	if code != exitOK || out != "imgfuse "+version+"\n" {
		t.Errorf("--version: exit %d, output %q", code, out)
	}
	code, out, _ = runCLI(t, "mount", "--help")
	if code != exitOK {
		t.Errorf("mount --help: exit %d", code)
	}
	for _, flag := range []string{"--read-only", "--foreground", "--format", "--snapshot", "--name",
		"--allow-other", "--no-direct-io", "--debug", "--log"} {
		if !strings.Contains(out, flag) {
			t.Errorf("mount --help does not mention %s", flag)
		}
	}
	code, out, _ = runCLI(t, "--help")
	if code != exitOK || !strings.Contains(out, "Exit codes:") {
		t.Errorf("--help: exit %d, no exit codes documented:\n%s", code, out)
	}
}

func TestFormatChoices(t *testing.T) {
	got := strings.Join(formatChoices(), ",")
	if got != "auto,qcow2,raw,vdi,vpc" {
		t.Errorf("formatChoices = %s", got)
	}
}

func TestChildArgs(t *testing.T) {
	o := &mountOptions{format: "qcow2", readOnly: true, snapshot: "s 1", name: "d",
		allowOther: true, noDirectIO: true, forceShare: true, growable: true, lazyRefcnt: true, noPassthru: true, debug: true,
		absImage: "/i/x.qcow2", absMountpoint: "/m"}
	got := strings.Join(childArgs(o), "|")
	want := "mount|--foreground|--format|qcow2|--read-only|--snapshot|s 1|--name|d|--allow-other|--no-direct-io|--force-share|--growable|--lazy-refcounts|--no-passthrough|--debug|--|/i/x.qcow2|/m"
	if got != want {
		t.Errorf("childArgs =\n%s\nwant\n%s", got, want)
	}
	// The child must parse what the parent built.
	cmd := newMountCmd()
	if err := cmd.ParseFlags(childArgs(o)[1:]); err != nil {
		t.Fatal(err)
	}
	if a := cmd.Flags().Args(); len(a) != 2 || a[0] != "/i/x.qcow2" || a[1] != "/m" {
		t.Errorf("child parses args %q", a)
	}
	for _, name := range []string{"read-only", "force-share", "growable", "lazy-refcounts", "no-direct-io", "no-passthrough"} {
		if v, err := cmd.Flags().GetBool(name); err != nil || !v {
			t.Errorf("child's --%s = %v, %v", name, v, err)
		}
	}
}

func TestMountReadOnlyDecision(t *testing.T) {
	// Every format, qcow2 included, is writable unless asked otherwise.
	tests := []struct {
		flag       bool
		snapshot   string
		forceShare bool
		want       bool
	}{
		{false, "", false, false},
		{true, "", false, true},
		{false, "snap", false, true},
		{false, "", true, true},
		{true, "snap", true, true},
	}
	for _, tt := range tests {
		if got := mountReadOnly(tt.flag, tt.snapshot, tt.forceShare); got != tt.want {
			t.Errorf("mountReadOnly(%v, %q, %v) = %v, want %v", tt.flag, tt.snapshot, tt.forceShare, got, tt.want)
		}
	}
}

// requireQemuImg skips when qemu-img is missing, unless the environment
// demands end-to-end coverage.
func requireQemuImg(t *testing.T) {
	t.Helper()
	if _, err := exec.LookPath("qemu-img"); err != nil {
		testenv.Skip(t, "qemu-img not found")
	}
}

func qemuImg(t *testing.T, dir string, args ...string) {
	t.Helper()
	c := exec.Command("qemu-img", args...)
	c.Dir = dir
	if out, err := c.CombinedOutput(); err != nil {
		t.Fatalf("qemu-img %s: %v\n%s", strings.Join(args, " "), err, out)
	}
}

func writeFile(t *testing.T, path string, size int64) {
	t.Helper()
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
}

func tempPath(t *testing.T, name string) string {
	return filepath.Join(t.TempDir(), name)
}
