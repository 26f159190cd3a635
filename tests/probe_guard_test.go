package tests

import (
	"bytes"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
)

// qcow2HeaderFile writes the first 64 KiB of a fresh qemu-img-made qcow2
// image (header, backing name /etc/shadow) to a file in dir: what a guest
// would write into sector 0 of its raw disk to read a host file through
// the next probing open (CVE-2008-2004).
func qcow2HeaderFile(t *testing.T, dir string) string {
	t.Helper()
	img := filepath.Join(dir, "evil.qcow2")
	if out, err := exec.Command("qemu-img", "create", "-q", "-f", "qcow2", "-u",
		"-b", "/etc/shadow", "-F", "raw", img, "4M").CombinedOutput(); err != nil {
		t.Fatalf("qemu-img create: %v\n%s", err, out)
	}
	b, err := os.ReadFile(img)
	if err != nil {
		t.Fatal(err)
	}
	hdr := filepath.Join(dir, "header.bin")
	if err := os.WriteFile(hdr, b[:65536], 0o644); err != nil {
		t.Fatal(err)
	}
	return hdr
}

func imageFormat(t *testing.T, img string) string {
	t.Helper()
	r := imgfuse(t, nil, "info", "--json", img)
	for _, f := range []string{"qcow2", "raw"} {
		if strings.Contains(r.stdout, `"format": "`+f+`"`) {
			return f
		}
	}
	t.Fatalf("imgfuse info %s: no format: %v", img, r)
	return ""
}

// TestProbedRawHeadGuard: through a writable mount of a raw image whose
// format was probed, writing a qcow2 header into the first sector fails
// (EPERM, said once in the daemon log) with dd aligned, unaligned and
// O_DIRECT, and the image still probes as raw afterwards; the same header
// elsewhere is written. With --format raw the write goes through, and the
// next probing open sees qcow2, as the user asked.
func TestProbedRawHeadGuard(t *testing.T) {
	requireE2E(t)
	t.Parallel()
	dir := t.TempDir()
	hdr := qcow2HeaderFile(t, dir)
	img := filepath.Join(dir, "disk.raw")
	if err := os.WriteFile(img, bytes.Repeat([]byte("raw disk"), 4<<20/8), 0o644); err != nil {
		t.Fatal(err)
	}
	before, _ := os.ReadFile(img)
	logFile := filepath.Join(dir, "daemon.log")
	mp, disk := mount(t, img, false, "--log", logFile)
	for _, args := range [][]string{
		{"bs=64k", "count=1", "oflag=direct"},
		{"bs=512", "count=1"},
		{"bs=4", "count=1"},
		{"bs=1k", "count=2", "oflag=direct"},
	} {
		cmd := exec.Command("dd", append([]string{"if=" + hdr, "of=" + disk, "conv=notrunc,fsync", "status=none"}, args...)...)
		out, err := cmd.CombinedOutput()
		if err == nil {
			t.Errorf("dd %v of a qcow2 header onto sector 0 of a probed raw image succeeded", args)
		} else if !strings.Contains(string(out), "not permitted") {
			t.Errorf("dd %v: want EPERM, got %v: %s", args, err, out)
		}
	}
	if out, err := exec.Command("dd", "if="+hdr, "of="+disk, "bs=64k", "seek=1", "conv=notrunc,fsync",
		"oflag=direct", "status=none").CombinedOutput(); err != nil {
		t.Errorf("dd of the header to 64 KiB: %v: %s", err, out)
	}
	if out, err := exec.Command("dd", "if=/dev/urandom", "of="+disk, "bs=4k", "count=1", "conv=notrunc,fsync",
		"oflag=direct", "status=none").CombinedOutput(); err != nil {
		t.Errorf("dd of random data to sector 0: %v: %s", err, out)
	}
	unmount(t, mp)
	after, _ := os.ReadFile(img)
	if bytes.Equal(after[4096:65536], before[4096:65536]) == false || !bytes.Equal(after[131072:], before[131072:]) {
		t.Error("refused writes changed the image")
	}
	if f := imageFormat(t, img); f != "raw" {
		t.Fatalf("after refused writes the image probes as %s", f)
	}
	log, _ := os.ReadFile(logFile)
	if n := strings.Count(string(log), "refusing writes to the first and last sectors"); n != 1 {
		t.Errorf("daemon log mentions the refusal %d times, want once:\n%s", n, log)
	}

	mp, disk = mount(t, img, false, "--format", "raw")
	if out, err := exec.Command("dd", "if="+hdr, "of="+disk, "bs=64k", "count=1", "conv=notrunc,fsync",
		"oflag=direct", "status=none").CombinedOutput(); err != nil {
		t.Errorf("--format raw: dd of a qcow2 header onto sector 0: %v: %s", err, out)
	}
	unmount(t, mp)
	if f := imageFormat(t, img); f != "qcow2" {
		t.Errorf("after writing a qcow2 header with --format raw the image probes as %s", f)
	}
}
