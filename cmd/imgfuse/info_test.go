package main

import (
	"encoding/json"
	"fmt"
	"path/filepath"
	"strings"
	"testing"

	"imgfuse/imgtool"
)

// infoChain builds raw <- qcow2 (with a snapshot) <- qcow2 with qemu-img.
func infoChain(t *testing.T) (dir, top string) {
	requireQemuImg(t)
	dir = t.TempDir()
	writeFile(t, filepath.Join(dir, "base.raw"), 64<<20)
	qemuImg(t, dir, "create", "-q", "-f", "qcow2", "-o", "cluster_size=65536,lazy_refcounts=on",
		"-b", "base.raw", "-F", "raw", "mid.qcow2")
	qemuImg(t, dir, "snapshot", "-c", "snap1", "mid.qcow2")
	qemuImg(t, dir, "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096,compat=0.10",
		"-b", "mid.qcow2", "-F", "qcow2", "top.qcow2")
	return dir, filepath.Join(dir, "top.qcow2")
}

func TestInfoText(t *testing.T) {
	_, top := infoChain(t)
	code, out, stderr := runCLI(t, "info", top)
	if code != imgtool.ExitOK {
		t.Fatalf("exit %d: %s", code, stderr)
	}
	blocks := strings.Split(out, "\n\n")
	if len(blocks) != 3 {
		t.Fatalf("want 3 blocks (top, mid, base), got %d:\n%s", len(blocks), out)
	}
	want := [][]string{
		{"image: " + top, "file format: qcow2", "virtual size: 64 MiB (67108864 bytes)",
			"backing file: mid.qcow2", "backing file format: qcow2", "Format specific information:",
			"compat: 0.10", "cluster size: 4096"},
		{"file format: qcow2", "cluster size: 65536", "compat: 1.1", "lazy refcounts: true",
			"compatible features: 0x1", "compression type: zlib", "corrupt: false", "dirty: false",
			"Snapshot list:", "snap1", "backing file: base.raw", "backing file format: raw"},
		{"file format: raw", "virtual size: 64 MiB (67108864 bytes)"},
	}
	for i, ws := range want {
		for _, w := range ws {
			if !strings.Contains(blocks[i], w) {
				t.Errorf("block %d does not contain %q:\n%s", i, w, blocks[i])
			}
		}
	}
}

func TestInfoJSON(t *testing.T) {
	_, top := infoChain(t)
	code, out, stderr := runCLI(t, "info", "--json", top)
	if code != imgtool.ExitOK {
		t.Fatalf("exit %d: %s", code, stderr)
	}
	var got map[string]any
	if err := json.Unmarshal([]byte(out), &got); err != nil {
		t.Fatalf("not JSON: %v\n%s", err, out)
	}
	for _, k := range []string{"filename", "format", "virtual-size", "actual-size", "format-specific", "imgfuse"} {
		if _, ok := got[k]; !ok {
			t.Errorf("top level lacks key %q", k)
		}
	}
	// qemu-img info prints the top image alone: the images below are
	// imgfuse's addition, under its own key.
	if _, ok := got["backing-image"]; ok {
		t.Errorf("top level has backing-image, which qemu-img info does not print")
	}
	if got["format"] != "qcow2" || got["virtual-size"] != float64(64<<20) {
		t.Errorf("format %v, virtual-size %v", got["format"], got["virtual-size"])
	}
	got = got["imgfuse"].(map[string]any)
	mid, _ := got["backing-image"].(map[string]any)
	if mid == nil || mid["format"] != "qcow2" {
		t.Fatalf("backing-image: %v", got["backing-image"])
	}
	snaps, _ := mid["snapshots"].([]any)
	if len(snaps) != 1 || snaps[0].(map[string]any)["name"] != "snap1" {
		t.Errorf("mid snapshots: %v", mid["snapshots"])
	}
	base, _ := mid["imgfuse"].(map[string]any)["backing-image"].(map[string]any)
	if base == nil || base["format"] != "raw" || !strings.HasSuffix(base["filename"].(string), "base.raw") {
		t.Errorf("base: %v", mid["imgfuse"])
	}
}

// TestInfoMissingBacking: info describes an image whose backing file is
// missing, as qemu-img info does; --backing-chain then fails.
func TestInfoMissingBacking(t *testing.T) {
	requireQemuImg(t)
	dir := t.TempDir()
	qemuImg(t, dir, "create", "-q", "-u", "-f", "qcow2", "-b", "gone.qcow2", "-F", "qcow2", "top.qcow2", "32M")
	top := filepath.Join(dir, "top.qcow2")
	code, out, stderr := runCLI(t, "info", "--output=json", top)
	if code != imgtool.ExitOK {
		t.Fatalf("exit %d: %s", code, stderr)
	}
	var got map[string]any
	if err := json.Unmarshal([]byte(out), &got); err != nil {
		t.Fatalf("not JSON: %v\n%s", err, out)
	}
	if got["backing-filename"] != "gone.qcow2" || got["full-backing-filename"] != filepath.Join(dir, "gone.qcow2") {
		t.Errorf("backing names: %v, %v", got["backing-filename"], got["full-backing-filename"])
	}
	if extra, _ := got["imgfuse"].(map[string]any); extra == nil || !strings.Contains(fmt.Sprint(extra["backing-error"]), "gone.qcow2") {
		t.Errorf("imgfuse.backing-error missing: %v", got["imgfuse"])
	}
	code, out, _ = runCLI(t, "info", top)
	if code != imgtool.ExitOK || !strings.Contains(out, "cannot open") {
		t.Errorf("human info: exit %d\n%s", code, out)
	}
	if code, _, _ := runCLI(t, "info", "--backing-chain", "--output=json", top); code != imgtool.ExitOpen {
		t.Errorf("--backing-chain with a missing backing file: exit %d, want %d", code, imgtool.ExitOpen)
	}
}

func TestInfoRawAndErrors(t *testing.T) {
	img := tempPath(t, "disk.img")
	writeFile(t, img, 3<<20)
	code, out, stderr := runCLI(t, "info", img)
	if code != imgtool.ExitOK || !strings.Contains(out, "file format: raw") || !strings.Contains(out, "virtual size: 3 MiB (3145728 bytes)") {
		t.Errorf("raw info: exit %d\n%s%s", code, out, stderr)
	}
	code, _, stderr = runCLI(t, "info", img+".missing")
	if code != imgtool.ExitOpen || !strings.Contains(stderr, "imgfuse: open "+img+".missing") {
		t.Errorf("missing image: exit %d, %q", code, stderr)
	}
}

// TestInfoJSONFlagsAgree: --json is --output=json.
func TestInfoJSONFlagsAgree(t *testing.T) {
	_, top := infoChain(t)
	c1, a, _ := runCLI(t, "info", "--json", top)
	c2, b, _ := runCLI(t, "info", "--output=json", top)
	if c1 != imgtool.ExitOK || c2 != imgtool.ExitOK || a != b || a == "" {
		t.Errorf("--json (exit %d) and --output=json (exit %d) differ:\n%s\n%s", c1, c2, a, b)
	}
	if code, _, stderr := runCLI(t, "info", "--output=yaml", top); code != imgtool.ExitUsage || !strings.Contains(stderr, "--output") {
		t.Errorf("--output=yaml: exit %d, %s", code, stderr)
	}
}
