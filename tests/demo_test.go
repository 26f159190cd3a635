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
// must leave nothing behind in the temporary directory (the loop mount's
// directory included).
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

	// The printed commands, run as printed from the same directory, in
	// one shell: loop-mount the filesystem, read it, info, unmount both.
	lines := regexp.MustCompile(`(?m)^  (\S.*?)(?:    # .*)?$`).FindAllStringSubmatch(string(out), -1)
	var script []string
	for _, l := range lines {
		script = append(script, l[1])
	}
	if len(script) != 4 || !strings.HasPrefix(script[0], "mount -o loop,ro ") ||
		!strings.Contains(script[2], " info ") || !strings.Contains(script[3], " unmount ") {
		t.Fatalf("demo output lacks the mount, cat, info and unmount commands:\n%s", out)
	}
	for _, line := range script[2:] {
		if !strings.Contains(line, "go run ./cmd/imgfuse ") {
			t.Errorf("after go run, the demo prints %q", line)
		}
	}
	fs := filepath.Join(filepath.Dir(mnt), "fs")
	t.Cleanup(func() {
		if mounted(t, fs) {
			_ = exec.Command("umount", fs).Run()
		}
	})
	sh := exec.Command("sh", "-ec", strings.Join(script, "\n"))
	sh.Dir, sh.Env = root, env
	if b, err := sh.CombinedOutput(); err != nil || !strings.Contains(string(b), "Hello from inside a qcow2 image!") {
		t.Fatalf("%s: %v\n%s", strings.Join(script, "\n"), err, b)
	}
	if mounted(t, mnt) {
		t.Fatalf("%s still mounted after %s", mnt, script[3])
	}
	if ents, err := os.ReadDir(runtime); err != nil || len(ents) != 0 {
		t.Errorf("the demo left %v in %s after unmounting (%v)", ents, runtime, err)
	}
}
