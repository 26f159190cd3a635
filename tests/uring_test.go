package tests

import (
	"bytes"
	"encoding/json"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"imgfuse/drivers/driverstest"
	"imgfuse/internal/testenv"
)

// TestIOURingMount: README, mount --io-uring: where the kernel offers
// FUSE-over-io_uring, `imgfuse status` says io_uring, fio's verified random
// writes and reads of a qcow2 image pass through it, and the image is
// clean and equal to what was written after the unmount.
func TestIOURingMount(t *testing.T) {
	requireE2E(t, "fio")
	t.Parallel()
	testenv.EnableFUSEURing(t)
	dir := t.TempDir()
	img := filepath.Join(dir, "img.qcow2")
	driverstest.Cmd(t, "qemu-img", "create", "-q", "-f", "qcow2", img, "64M")
	mp, disk := mount(t, img, false, "--io-uring")

	r := imgfuse(t, nil, "status", "--output=json")
	var st []struct {
		Mountpoint  string `json:"mountpoint"`
		ServingMode string `json:"serving-mode"`
	}
	if err := json.Unmarshal([]byte(r.stdout), &st); err != nil {
		t.Fatalf("status --output=json: %v\n%s", err, r.stdout)
	}
	found := false
	for _, e := range st {
		if e.Mountpoint == mp {
			found = true
			if !strings.Contains(e.ServingMode, "io_uring") {
				t.Errorf("serving mode %q, want io_uring", e.ServingMode)
			}
		}
	}
	if !found {
		t.Fatalf("status does not list %s:\n%s", mp, r.stdout)
	}

	cmd := exec.Command("fio", "--name=verify", "--filename="+disk, "--size=32M",
		"--direct=1", "--ioengine=libaio", "--iodepth=32", "--rw=randwrite",
		"--bs=4k", "--verify=crc32c", "--do_verify=1", "--verify_fatal=1")
	cmd.Dir = t.TempDir()
	if out, err := cmd.CombinedOutput(); err != nil || bytes.Contains(out, []byte("verify:")) && bytes.Contains(out, []byte("bad")) {
		t.Fatalf("fio: %v\n%s", err, out)
	}
	raw := filepath.Join(dir, "model.raw")
	driverstest.Cmd(t, "dd", "if="+disk, "of="+raw, "bs=1M", "status=none")
	unmount(t, mp)
	if code, out := qemuCheck(t, img); code != 0 {
		t.Fatalf("qemu-img check: exit %d\n%s", code, out)
	}
	driverstest.Cmd(t, "qemu-img", "compare", "-q", "-f", "raw", "-F", "qcow2", raw, img)
}
