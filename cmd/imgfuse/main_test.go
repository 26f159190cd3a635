package main

import (
	"bytes"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/spf13/pflag"

	"imgfuse/imgtool"
	"imgfuse/internal/testenv"
	"imgfuse/session"
)

// TestMain lets the test binary stand in for imgfuse when `mount` re-execs
// /proc/self/exe as its daemon, so mount tests need no separate build.
func TestMain(m *testing.M) {
	if o, ok := session.DaemonChild(); ok {
		if os.Getenv("IMGFUSE_TEST_DAEMON_CRASH") != "" {
			os.Exit(3) // a daemon that dies before reporting
		}
		os.Exit(imgtool.Code(session.RunDaemon(o)))
	}
	if os.Getenv(asCLIEnv) == "1" {
		os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
	}
	os.Exit(m.Run())
}

// asCLIEnv makes the test binary act as imgfuse itself, for tests that
// need a separate process.
const asCLIEnv = "IMGFUSE_TEST_AS_CLI"

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
		{"no command", nil, imgtool.ExitUsage, "imgfuse: missing command"},
		{"unknown command", []string{"frobnicate"}, imgtool.ExitUsage, `imgfuse: unknown command "frobnicate"`},
		{"unknown flag", []string{"mount", "--bogus", "a", "b"}, imgtool.ExitUsage, "imgfuse: unknown flag: --bogus"},
		{"mount one arg", []string{"mount", "a"}, imgtool.ExitUsage, "imgfuse: mount needs 2 argument(s): IMAGE MOUNTPOINT (got 1)"},
		{"mount three args", []string{"mount", "a", "b", "c"}, imgtool.ExitUsage, "got 3"},
		{"bad format", []string{"mount", "--format", "qed", "a", "b"}, imgtool.ExitUsage, `imgfuse: invalid --format "qed"`},
		{"info no arg", []string{"info"}, imgtool.ExitUsage, "imgfuse: info needs 1 argument(s): IMAGE"},
		{"info bad format", []string{"info", "--format", "qed", "x"}, imgtool.ExitUsage, "invalid --format"},
		{"format known only to refuse", []string{"map", "-f", "qed", "x"}, imgtool.ExitUsage,
			`invalid --format "qed": imgfuse recognises a QED image but cannot read it (want one of: auto, qcow2, raw, vdi, vhdx, vmdk, vpc)`},
		{"unmount two args", []string{"unmount", "a", "b"}, imgtool.ExitUsage, "unmount needs 1 argument(s)"},
		{"unmount bad timeout", []string{"unmount", "--timeout", "soon", "a"}, imgtool.ExitUsage, `invalid argument "soon"`},
		{"unmount zero timeout", []string{"unmount", "--timeout", "0s", "a"}, imgtool.ExitUsage, "--timeout must be positive"},
		{"demo extra arg", []string{"demo", "x"}, imgtool.ExitUsage, "demo takes no arguments"},
		{"help hint", []string{"mount"}, imgtool.ExitUsage, "Run 'imgfuse mount --help' for usage."},
		{"overlay and overlay-keep", []string{"mount", "--overlay", "--overlay-keep", "k.qcow2", "a", "b"}, imgtool.ExitUsage, "--overlay and --overlay-keep exclude each other"},
		{"growable read-only", []string{"mount", "--growable", "--read-only", "a", "b"}, imgtool.ExitUsage, "--growable needs a writable mount, not --read-only"},
		{"growable snapshot", []string{"mount", "--growable", "--snapshot", "s", "a", "b"}, imgtool.ExitUsage, "--snapshot is read-only"},
		{"lazy refcounts force-share", []string{"mount", "--lazy-refcounts", "-U", "a", "b"}, imgtool.ExitUsage, "--lazy-refcounts needs a writable mount; --force-share"},
		{"completion without shell", []string{"completion"}, imgtool.ExitUsage, "imgfuse: completion needs a shell: bash, fish, powershell, zsh"},
		{"completion unknown shell", []string{"completion", "tcsh"}, imgtool.ExitUsage, `imgfuse: unknown shell "tcsh"`},
		{"completion extra arg", []string{"completion", "bash", "x"}, imgtool.ExitUsage, "bash takes no arguments"},
		{"help unknown topic", []string{"help", "frobnicate"}, imgtool.ExitUsage, `imgfuse: unknown help topic "frobnicate"`},
		{"log in a missing directory", []string{"mount", "--log", "/nonexistent-imgfuse-dir/x.log", "a", "b"}, imgtool.ExitUsage, "imgfuse: --log /nonexistent-imgfuse-dir/x.log: no such directory /nonexistent-imgfuse-dir"},
		{"debug detached without log", []string{"mount", "--debug", "a", "b"}, imgtool.ExitUsage, "--debug needs --log FILE (or --foreground"},
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
	if code != imgtool.ExitOK || out != "imgfuse "+version+"\n" {
		t.Errorf("--version: exit %d, output %q", code, out)
	}
	code, out, _ = runCLI(t, "mount", "--help")
	if code != imgtool.ExitOK {
		t.Errorf("mount --help: exit %d", code)
	}
	for _, flag := range []string{"--read-only", "--foreground", "--format", "--snapshot", "--name",
		"--allow-other", "--no-direct-io", "--debug", "--log"} {
		if !strings.Contains(out, flag) {
			t.Errorf("mount --help does not mention %s", flag)
		}
	}
	code, out, _ = runCLI(t, "--help")
	if code != imgtool.ExitOK || !strings.Contains(out, "Exit codes:") {
		t.Errorf("--help: exit %d, no exit codes documented:\n%s", code, out)
	}
}

func TestFormatChoices(t *testing.T) {
	got := strings.Join(imgtool.FormatChoices(), ",")
	if got != "auto,qcow2,raw,vdi,vhdx,vmdk,vpc" {
		t.Errorf("formatChoices = %s", got)
	}
}

// TestDaemonOptionsCarryEveryFlag: every flag of mount reaches the daemon
// child, which receives its session.Options as JSON: each flag, set alone,
// changes what the child decodes.
func TestDaemonOptionsCarryEveryFlag(t *testing.T) {
	zero, err := json.Marshal(&session.Options{})
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	newMountCmd(&session.Options{}).Flags().VisitAll(func(f *pflag.Flag) {
		n++
		o := &session.Options{}
		cmd := newMountCmd(o)
		value := "x"
		if f.Value.Type() == "bool" {
			value = "true"
		}
		if err := cmd.Flags().Set(f.Name, value); err != nil {
			t.Fatalf("--%s: %v", f.Name, err)
		}
		js, err := json.Marshal(o)
		if err != nil {
			t.Fatal(err)
		}
		t.Setenv(session.DaemonEnv, string(js))
		child, ok := session.DaemonChild()
		if !ok {
			t.Fatalf("--%s: the child cannot decode %s", f.Name, js)
		}
		got, _ := json.Marshal(child)
		if string(got) == string(zero) && f.Name != "help" {
			t.Errorf("--%s does not reach the daemon child", f.Name)
		}
	})
	if n < 15 {
		t.Errorf("only %d flags seen", n)
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
		o := &session.Options{ReadOnly: tt.flag, Snapshot: tt.snapshot, ForceShare: tt.forceShare}
		if got := o.ReadOnlyMount(); got != tt.want {
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
