package tests

import (
	"bytes"
	"fmt"
	"path/filepath"
	"strings"
	"testing"

	"imgfuse/drivers/driverstest"
)

// TestMountCacheSize: `mount --cache-size` reaches the daemon's qcow2
// driver, which caps the L2 cache (the daemon logs the bound in force: 16K
// of 4 KiB tables is 4), and the disk reads right through its 16 L2
// tables, twice, with the cache evicting all along. drivers/qcow2's TestCacheSize
// measures the cap itself; this one fails if the flag is dropped on the
// way (the parent's parsing, the daemon's command line, the open).
func TestMountCacheSize(t *testing.T) {
	t.Parallel()
	requireE2E(t)
	const tables = 16 // 4 KiB clusters: an L2 table maps 2 MiB; 32 MiB
	img := filepath.Join(t.TempDir(), "img.qcow2")
	driverstest.Cmd(t, "qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096,preallocation=metadata",
		img, fmt.Sprint(tables<<21))
	var cmds []string
	for i := range tables {
		cmds = append(cmds, fmt.Sprintf("write -P %d %d 4k", i+1, i<<21))
	}
	driverstest.QemuIO(t, img, cmds...)
	mp, disk := mount(t, img, false, "--read-only", "--cache-size", "16K")
	for pass := range 2 {
		for i := range int64(tables) {
			errno, got := readErrno(t, disk, i<<21, 4096)
			if errno != 0 || !bytes.Equal(got, bytes.Repeat([]byte{byte(i + 1)}, 4096)) {
				t.Fatalf("pass %d: read in L2 table %d: errno %v (or wrong bytes)", pass, i, errno)
			}
		}
	}
	want := "the L2 cache holds at most 4 tables of 4096 bytes (16384 bytes asked for)"
	if log := daemonLog(t, mp); strings.Count(log, want) != 1 {
		t.Errorf("the daemon log does not say %q once:\n%s", want, log)
	}
}
