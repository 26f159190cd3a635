package main

import (
	"bytes"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"imgfuse/mounts"
)

// TestStatusStale: a state file whose server is gone is listed as dead
// with the unmount hint; files that are not state files are ignored.
func TestStatusStale(t *testing.T) {
	dir := t.TempDir()
	mp := "/no/such/mount point"
	ov := "/var/tmp/" + mounts.OverlayPrefix + "1.qcow2"
	st := mounts.State{PID: 1 << 30, Image: "/img.qcow2", Mountpoint: mp, Format: "qcow2",
		Passthrough: "off: --no-passthrough", Overlay: ov, OverlayTemporary: true, Started: time.Unix(0, 0).UTC()}
	if _, err := mounts.WriteState(dir, st); err != nil {
		t.Fatal(err)
	}
	// Not ours: a file named like a state file for another mountpoint,
	// and garbage.
	if err := os.WriteFile(filepath.Join(dir, "0000.json"), []byte(`{"mountpoint": "/x", "pid": 1}`), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "junk.json"), []byte("{"), 0o600); err != nil {
		t.Fatal(err)
	}
	entries, err := mounts.List(dir)
	if err != nil {
		t.Fatal(err)
	}
	if len(entries) != 1 {
		t.Fatalf("listStatus: %+v, want the one state file", entries)
	}
	e := entries[0]
	if e.State != "dead" || e.Hint == nil || *e.Hint != "imgfuse unmount '/no/such/mount point'" ||
		e.Passthrough || e.Overlay == nil || *e.Overlay != ov || !e.OverlayTemporary || e.PIDFile != nil {
		t.Errorf("stale entry: %+v", e)
	}
	b, err := json.Marshal(entries)
	if err != nil {
		t.Fatal(err)
	}
	for _, key := range []string{"mountpoint", "image", "format", "pid", "state", "read-only", "passthrough",
		"passthrough-detail", "overlay", "overlay-temporary", "serving-mode", "pidfile", "started", "hint"} {
		if !bytes.Contains(b, []byte(`"`+key+`":`)) {
			t.Errorf("JSON lacks %q: %s", key, b)
		}
	}
	var out bytes.Buffer
	if err := mounts.PrintStatus(&out, entries); err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(out.String(), "run 'imgfuse unmount '/no/such/mount point''") {
		t.Errorf("table lacks the hint:\n%s", out.String())
	}
	// No state dir at all: no mounts, not an error.
	if entries, err := mounts.List(filepath.Join(dir, "none")); err != nil || len(entries) != 0 {
		t.Errorf("missing state dir: %v, %v", entries, err)
	}
}
