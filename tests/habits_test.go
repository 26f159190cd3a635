package tests

import (
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"strings"
	"testing"

	"imgfuse/drivers/driverstest"
)

// Tests of the command line's habits (issue 14): version, the man pages
// and the README line that installs them, URLs given as images.

// TestRemoteImagesRefused: an image given as a URL is refused by mount,
// info, check, map and create with "remote images are not supported yet"
// and exit 5, never "no such file"; nothing is created.
func TestRemoteImagesRefused(t *testing.T) {
	requireE2E(t)
	t.Parallel()
	mp := newMountpoint(t, false)
	dir := t.TempDir()
	for _, url := range []string{
		"https://example.com/disk.qcow2", "http://example.com/disk.img", "s3://bucket/disk.qcow2",
		"ftp://example.com/disk.raw", "nbd://localhost:10809/export", "nbd+unix:///export?socket=/tmp/s",
	} {
		for _, args := range [][]string{
			{"mount", url, mp}, {"mount", "--read-only", "-f", "qcow2", url, mp}, {"info", url},
			{"info", "--output=json", "--backing-chain", url}, {"check", url}, {"check", "-r", "all", url},
			{"map", "--output=json", url}, {"create", url, "1M"},
		} {
			cmd := exec.Command(imgfuseBin, args...)
			cmd.Dir = dir
			r := runResult(t, cmd)
			if r.code != 5 || !strings.Contains(r.stderr, url+": remote images are not supported yet") ||
				strings.Contains(r.stderr, "no such file") || strings.Count(r.stderr, "\n") != 1 || r.stdout != "" {
				t.Errorf("imgfuse %s: %v\nwant exit 5 and one line: remote images are not supported yet", strings.Join(args, " "), r)
			}
		}
	}
	if mounted(t, mp) {
		t.Error("a URL got mounted")
	}
	if ents, _ := os.ReadDir(dir); len(ents) != 0 {
		t.Errorf("create of a URL made %v", ents)
	}
}

// runResult runs cmd and returns its outcome.
func runResult(t *testing.T, cmd *exec.Cmd) result {
	t.Helper()
	var stdout, stderr strings.Builder
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	r := result{stdout: stdout.String(), stderr: stderr.String()}
	if ee, ok := err.(*exec.ExitError); ok {
		r.code = ee.ExitCode()
	} else if err != nil {
		t.Fatalf("%s: %v", cmd, err)
	}
	checkNoPanic(t, r.stderr)
	return r
}

// TestVersionBuildInfo: `imgfuse version` says the version, the commit the
// binary was built from and whether the tree had changes, and the Go
// version; --output=json the same as an object. The binary is built in a
// clone of this checkout (Go stamps no VCS information in a git worktree,
// nor with the machine's GOFLAGS=-buildvcs=false), as committed and then
// with a change.
func TestVersionBuildInfo(t *testing.T) {
	requireE2E(t, "git")
	t.Parallel()
	top, err := exec.Command("git", "rev-parse", "--show-toplevel").Output()
	driverstest.SkipUnless(t, err == nil, "not in a git checkout: %v", err)
	clone := filepath.Join(t.TempDir(), "src")
	driverstest.Cmd(t, "git", "clone", "-q", strings.TrimSpace(string(top)), clone)
	head := strings.TrimSpace(string(driverstest.Cmd(t, "git", "-C", clone, "rev-parse", "HEAD")))
	bin := filepath.Join(t.TempDir(), "imgfuse")
	for _, modified := range []bool{false, true} {
		if modified {
			if err := os.WriteFile(filepath.Join(clone, "README.md"), []byte("changed\n"), 0o644); err != nil {
				t.Fatal(err)
			}
		}
		build := exec.Command("go", "build", "-buildvcs=true", "-ldflags", "-X main.version=9.8.7-test", "-o", bin, "./cmd/imgfuse")
		build.Dir = clone
		if out, err := build.CombinedOutput(); err != nil {
			t.Fatalf("go build -buildvcs=true: %v\n%s", err, out)
		}
		r := runResult(t, exec.Command(bin, "version", "--output=json"))
		var v map[string]any
		if err := json.Unmarshal([]byte(r.stdout), &v); r.code != 0 || err != nil {
			t.Fatalf("version --output=json: %v (%v)", r, err)
		}
		if v["version"] != "9.8.7-test" || v["commit"] != head || v["modified"] != modified || v["go"] != runtime.Version() || len(v) != 4 {
			t.Errorf("version --output=json: %v; want version 9.8.7-test, commit %s, modified %v, go %s", v, head, modified, runtime.Version())
		}
		r = runResult(t, exec.Command(bin, "version"))
		want := "imgfuse 9.8.7-test\ncommit: " + head
		if modified {
			want += " (with uncommitted changes)"
		}
		if want += "\ngo: " + runtime.Version() + "\n"; r.code != 0 || r.stdout != want {
			t.Errorf("version: %v\nwant:\n%s", r, want)
		}
	}
}

// TestManPages: the README's install line, run with /usr/local moved to
// a temporary directory, installs the binary and a man page for imgfuse
// and each of its commands, which man(1) renders with the command's
// flags; `imgfuse man` alone prints imgfuse.1.
func TestManPages(t *testing.T) {
	requireE2E(t, "man")
	t.Parallel()
	readme, err := os.ReadFile("../README.md")
	if err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile("Install the binary and its manual pages with `([^`]+)`").FindSubmatch(readme)
	if m == nil {
		t.Fatal("README.md has no install line (\"Install the binary and its manual pages with `...`\")")
	}
	prefix := t.TempDir()
	line := strings.ReplaceAll(string(m[1]), "/usr/local", prefix)
	if !strings.Contains(line, prefix+"/share/man/man1") {
		t.Fatalf("the install line does not install man pages under /usr/local/share/man/man1: %s", m[1])
	}
	sh := exec.Command("sh", "-ec", line)
	sh.Dir = ".."
	if out, err := sh.CombinedOutput(); err != nil {
		t.Fatalf("%s: %v\n%s", line, err, out)
	}
	man1 := filepath.Join(prefix, "share/man/man1")
	for cmd, flag := range map[string]string{
		"": "Exit codes", "mount": "--overlay-keep", "unmount": "--timeout", "status": "--output", "info": "--backing-chain",
		"check": "--repair", "map": "--start-offset", "create": "--backing-format", "demo": "--dir", "version": "--output", "man": "",
	} {
		page := "imgfuse.1"
		if cmd != "" {
			page = "imgfuse-" + cmd + ".1"
		}
		out, err := exec.Command("man", "-l", filepath.Join(man1, page)).CombinedOutput()
		if err != nil {
			t.Errorf("man -l %s: %v\n%s", page, err, out)
			continue
		}
		if !strings.Contains(string(out), strings.TrimSpace("imgfuse "+cmd)) || !strings.Contains(string(out), flag) {
			t.Errorf("man -l %s does not show %q and %s:\n%s", page, "imgfuse "+cmd, flag, out)
		}
	}
	r := imgfuse(t, nil, "man")
	if r.code != 0 || !strings.HasPrefix(r.stdout, ".nh\n.TH \"IMGFUSE\" \"1\"") || !strings.Contains(r.stdout, "imgfuse-mount(1)") {
		t.Errorf("imgfuse man: %v", r)
	}
}
