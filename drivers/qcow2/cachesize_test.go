package qcow2

import (
	"bytes"
	"fmt"
	"path/filepath"
	"strings"
	"testing"

	"imgfuse/drivers"
	"imgfuse/drivers/driverstest"
)

// TestCacheSize: OpenOptions.CacheSize (the mount's --cache-size) bounds
// the L2 cache, at least two tables, and the default maps the whole disk
// up to 32 MiB. Counted as the cache is sized, then as it fills: a read
// through 64 L2 tables leaves at most the bound's worth of table memory
// (and with the default, all 64), and reads stay right while tables are
// evicted; a bound given is logged as it is in force.
//
// No allocation is counted, so it runs under -race too (it once shared
// alloc_test.go's !race tag, and no CI run selected it).
func TestCacheSize(t *testing.T) {
	requireQemu(t)
	dir := t.TempDir()
	big := filepath.Join(dir, "big.qcow2")
	qemuImg(t, "create", "-q", "-f", "qcow2", big, "1T") // 2048 L2 tables of 64 KiB
	for _, tc := range []struct {
		limit int64
		want  int
	}{{0, 32 << 20 / 65536}, {1 << 20, 16}, {1, 2}, {1 << 40, 2048}} {
		d := openTest(t, big, drivers.OpenOptions{CacheSize: tc.limit})
		if got := d.l2.Tables(); got != tc.want {
			t.Errorf("CacheSize %d: %d L2 tables, want %d", tc.limit, got, tc.want)
		}
		d.Close()
	}

	// 4 KiB clusters: an L2 table maps 2 MiB, so 128 MiB with its
	// metadata preallocated has 64 of them.
	const cs, tables = 4096, 64
	img := filepath.Join(dir, "tables.qcow2")
	qemuImg(t, "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096,preallocation=metadata", img, fmt.Sprint(tables<<21))
	var cmds []string
	for i := range tables {
		cmds = append(cmds, fmt.Sprintf("write -P %d %d 512", i+1, i<<21))
	}
	driverstest.QemuIO(t, img, cmds...)
	for _, tc := range []struct {
		limit     int64
		maxTables int64
	}{{0, tables}, {4 * cs, 4}, {1, 2}} {
		var log logCount
		d := openTest(t, img, drivers.OpenOptions{CacheSize: tc.limit, Logf: log.logf})
		p := make([]byte, 512)
		for pass := range 2 {
			for i := range int64(tables) {
				if _, err := readAt(d, p, i<<21); err != nil || !bytes.Equal(p, bytes.Repeat([]byte{byte(i + 1)}, 512)) {
					t.Fatalf("CacheSize %d, pass %d: read in L2 table %d: %v (or wrong bytes)", tc.limit, pass, i, err)
				}
			}
		}
		if got := d.l2.Allocated(); got > tc.maxTables*cs || (tc.limit == 0 && got != tables*cs) {
			t.Errorf("CacheSize %d: %d bytes of L2 tables after reading %d tables, want at most %d tables' worth",
				tc.limit, got, tables, tc.maxTables)
		}
		wantLog := fmt.Sprintf("at most %d tables of %d bytes (%d bytes asked for)", tc.maxTables, cs, tc.limit)
		if tc.limit > 0 && (len(log.lines) != 1 || !strings.Contains(log.lines[0], wantLog)) {
			t.Errorf("CacheSize %d: logged %q, want one line saying %q", tc.limit, log.lines, wantLog)
		}
		if tc.limit == 0 && len(log.lines) != 0 {
			t.Errorf("default cache size: logged %q", log.lines)
		}
		d.Close()
	}
}
