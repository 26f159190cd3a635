package tests

import (
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"
)

// TestDemoGoRun follows the README's first command as a new user would:
// `go run ./cmd/imgfuse demo` from the checkout, then the commands the demo
// prints, exactly as printed (go run's binary is gone by then). Unmounting
// must leave nothing behind in the temporary directory.
func TestDemoGoRun(t *testing.T) {
	requireE2E(t)
	t.Parallel()
	root, err := filepath.Abs("..")
	if err != nil {
		t.Fatal(err)
	}
	runtime := t.TempDir() // stands in for $XDG_RUNTIME_DIR
	env := append(os.Environ(), "XDG_RUNTIME_DIR="+runtime)
	cmd := exec.Command("go", "run", "./cmd/imgfuse", "demo")
	cmd.Dir, cmd.Env = root, env
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("go run ./cmd/imgfuse demo: %v\n%s", err, out)
	}
	mnts, _ := filepath.Glob(filepath.Join(runtime, "imgfuse-demo-*", "mnt"))
	if len(mnts) != 1 {
		t.Fatalf("demo made %v under %s, want one imgfuse-demo-*/mnt", mnts, runtime)
	}
	mnt := mnts[0]
	mountpoints.Lock()
	mountpoints.list = append(mountpoints.list, mnt)
	mountpoints.Unlock()
	t.Cleanup(func() { forceUnmount(t, mnt) })
	if !mounted(t, mnt) {
		t.Fatalf("demo printed\n%s\nbut %s is not mounted", out, mnt)
	}

	// The printed commands, run as printed from the same directory.
	info := regexp.MustCompile(`(?m)^  (\S.* info .*)$`).FindStringSubmatch(string(out))
	unmountCmd := regexp.MustCompile(`(?m)^  umount /mnt/x && (.* unmount .*)$`).FindStringSubmatch(string(out))
	if info == nil || unmountCmd == nil {
		t.Fatalf("demo output lacks the info and unmount commands:\n%s", out)
	}
	for _, line := range []string{info[1], unmountCmd[1]} {
		if !strings.HasPrefix(line, "go run ./cmd/imgfuse ") {
			t.Errorf("after go run, the demo prints %q", line)
		}
		sh := exec.Command("sh", "-c", line)
		sh.Dir, sh.Env = root, env
		if b, err := sh.CombinedOutput(); err != nil {
			t.Fatalf("%s: %v\n%s", line, err, b)
		}
	}
	if mounted(t, mnt) {
		t.Fatalf("%s still mounted after %s", mnt, unmountCmd[1])
	}
	if ents, err := os.ReadDir(runtime); err != nil || len(ents) != 0 {
		t.Errorf("the demo left %v in %s after unmounting (%v)", ents, runtime, err)
	}
}
