package tests

import (
	"bytes"
	"compress/flate"
	"encoding/binary"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"imgfuse/drivers/driverstest"
)

// hostileImage builds an image in dir from a 4 MiB qcow2 (64 KiB clusters,
// 0x11 in [0, 1M), a compressed cluster of 0x22 at 2M) and returns its
// path. mutate gets the file's bytes and the offsets of the L1 table and
// of the compressed cluster's L2 entry.
func hostileImage(t *testing.T, dir string, mutate func(b []byte, l1, cEntry int64) []byte) string {
	t.Helper()
	img := filepath.Join(dir, "img.qcow2")
	driverstest.Cmd(t, "qemu-img", "create", "-q", "-f", "qcow2", img, "4M")
	driverstest.QemuIO(t, img, "write -P 0x11 0 1M", "write -c -P 0x22 2M 64k")
	b, err := os.ReadFile(img)
	if err != nil {
		t.Fatal(err)
	}
	l1 := int64(binary.BigEndian.Uint64(b[40:]))
	l2 := int64(binary.BigEndian.Uint64(b[l1:]) & 0x00fffffffffffe00)
	if err := os.WriteFile(img, mutate(b, l1, l2+32*8), 0o644); err != nil {
		t.Fatal(err)
	}
	return img
}

// undamaged returns what the 64 KiB at off hold in the image hostileImage
// builds before mutate.
func undamaged(off int64) []byte {
	switch {
	case off < 1<<20:
		return bytes.Repeat([]byte{0x11}, 64<<10)
	case off == 2<<20:
		return bytes.Repeat([]byte{0x22}, 64<<10)
	}
	return make([]byte, 64<<10)
}

// daemonPeakRSS returns the daemon's peak resident memory (VmHWM) in KiB.
func daemonPeakRSS(t *testing.T, pid int) int64 {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		if f := strings.Fields(line); len(f) >= 2 && f[0] == "VmHWM:" {
			v, err := strconv.ParseInt(f[1], 10, 64)
			if err != nil {
				t.Fatal(err)
			}
			return v
		}
	}
	t.Fatal("no VmHWM in /proc/PID/status")
	return 0
}

// TestHostileMounts mounts hostile images read-only: each is refused at
// mount (and by info) with a one-line message and leaves no mount, or
// serves every 64 KiB cluster of the disk as driverstest.Qcow2Oracle
// decodes the damaged image: outside the damaged range the undamaged
// image's bytes; inside it what the damaged mapping says, or EIO, and EIO
// without fail where it names metadata (the L1 table as guest data), the
// cause said once in the daemon log. A compressed cluster reads what its
// stream decodes to, or EIO. The daemon's peak RSS stays under 64 MiB
// (96 MiB for a -race build; measured: 35-37 MiB with -race), and no
// file in the image's directory changes, by content or mtime.
// drivers/qcow2's TestHostileImages covers many more images at the driver
// level; these are the ones where the whole stack matters.
func TestHostileMounts(t *testing.T) {
	t.Parallel()
	requireE2E(t)
	limit := int64(64 << 10)
	if raceEnabled {
		limit = 96 << 10
	}
	var deflateBomb []byte
	{
		var buf bytes.Buffer
		w, _ := flate.NewWriter(&buf, flate.BestCompression)
		w.Write(make([]byte, 4<<20))
		w.Close()
		deflateBomb = buf.Bytes()
	}
	put64 := func(b []byte, off int64, v uint64) { binary.BigEndian.PutUint64(b[off:], v) }
	none, all := [2]int64{}, [2]int64{0, 4 << 20}
	for _, c := range []struct {
		name   string
		mutate func(b []byte, l1, cEntry int64) []byte
		msg    string   // a refused mount's message; "" if it must mount
		bad    [2]int64 // the guest range the damage may reach
		// stream is what the compressed cluster at 2M decodes to.
		stream byte
	}{
		{"L2 entry past EOF", func(b []byte, l1, _ int64) []byte {
			l2 := int64(binary.BigEndian.Uint64(b[l1:]) & 0x00fffffffffffe00)
			put64(b, l2+16*8, 1<<63|1<<40)
			return b
		}, "", [2]int64{1 << 20, 1<<20 + 64<<10}, 0x22},
		// Cluster 0 maps to the L1 table (EIO), the others to the
		// zeros after its one entry.
		{"L2 table is the L1 table", func(b []byte, l1, _ int64) []byte {
			put64(b, l1, 1<<63|uint64(l1))
			return b
		}, "", all, 0x22},
		{"data cluster is the L1 table", func(b []byte, l1, _ int64) []byte {
			l2 := int64(binary.BigEndian.Uint64(b[l1:]) & 0x00fffffffffffe00)
			put64(b, l2+3*8, 1<<63|uint64(l1))
			return b
		}, "", [2]int64{3 << 16, 4 << 16}, 0x22},
		{"refcount table overlaps L1", func(b []byte, l1, _ int64) []byte { put64(b, 48, uint64(l1)); return b }, "", none, 0x22},
		{"L1 size absurd", func(b []byte, _, _ int64) []byte {
			binary.BigEndian.PutUint32(b[36:], 0x7fffffff)
			return b
		}, "too large", none, 0},
		{"snapshot count absurd", func(b []byte, _, _ int64) []byte {
			binary.BigEndian.PutUint32(b[60:], 0xffffffff)
			put64(b, 64, 65536)
			return b
		}, "snapshots", none, 0},
		{"deflate bomb", func(b []byte, _, cEntry int64) []byte {
			off := (int64(len(b)) + 65535) &^ 65535
			b = append(b, make([]byte, off-int64(len(b)))...)
			b = append(b, deflateBomb...)
			sectors := uint64(len(deflateBomb)+511) / 512
			put64(b, cEntry, 1<<62|(sectors-1)<<54|uint64(off))
			return b
		}, "", [2]int64{2 << 20, 2<<20 + 64<<10}, 0},
		{"backing loop", func(b []byte, _, _ int64) []byte {
			copy(b[0x1000:], "img.qcow2")
			put64(b, 8, 0x1000)
			binary.BigEndian.PutUint32(b[16:], uint32(len("img.qcow2")))
			return b
		}, "loop", none, 0},
	} {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			dir := t.TempDir()
			img := hostileImage(t, dir, c.mutate)
			before := driverstest.DirState(t, dir)
			time.Sleep(20 * time.Millisecond) // so that a write would change the mtime

			r := imgfuse(t, nil, "info", img)
			checkNoPanic(t, r.stderr)
			if c.msg != "" {
				mp := newMountpoint(t, false)
				m := imgfuse(t, nil, "mount", "--read-only", img, mp)
				checkNoPanic(t, m.stderr)
				results := []result{r, m}
				if r.code == 0 && strings.Contains(r.stdout, c.msg) {
					// info describes what it could, as qemu-img info
					// does for a backing loop (it opens no backing
					// file), and names the problem.
					results = results[1:]
				}
				for _, res := range results {
					msg := strings.TrimSpace(res.stderr)
					if res.code == 0 || !strings.Contains(msg, c.msg) || strings.Contains(msg, "\n") {
						t.Errorf("want a failure with one line containing %q, got %v", c.msg, res)
					}
				}
				if mounted(t, mp) {
					t.Error("a refused mount left a mount behind")
				}
			} else {
				damaged, err := os.ReadFile(img)
				if err != nil {
					t.Fatal(err)
				}
				oracle, err := driverstest.Qcow2Oracle(damaged)
				if err != nil {
					t.Fatal(err)
				}
				mp, disk := mount(t, img, false, "--read-only")
				pid := daemonPID(t, mp)
				metaHits := 0
				// Twice: a failed read leaves nothing in the page
				// cache, so the second pass asks the daemon again,
				// which must not log the cause again.
				for pass := range 2 {
					for off := int64(0); off < 4<<20; off += 64 << 10 {
						errno, got := readErrno(t, disk, off, 64<<10)
						w := oracle[off>>16]
						if pass == 0 && w.Fail && strings.Contains(w.Why, "overlaps") {
							metaHits++
						}
						if errno != 0 && errno != syscall.EIO {
							t.Errorf("read at %#x: %v, want EIO or data", off, errno)
						}
						inBad := off >= c.bad[0] && off < c.bad[1]
						if msg := driverstest.CheckHostileRead(w, errno != 0, got, inBad,
							bytes.Repeat([]byte{c.stream}, 64<<10)); msg != "" {
							t.Errorf("read at %#x: %s", off, msg)
						}
						if errno == 0 && !inBad && !bytes.Equal(got, undamaged(off)) {
							t.Errorf("read at %#x outside the damaged range: wrong bytes", off)
						}
					}
				}
				// The driver's notice (the partition table probe may
				// quote the same error on its own line).
				if n := strings.Count(daemonLog(t, mp), "not guest data: image is corrupt (reads of such ranges fail with EIO"); (metaHits > 0) != (n == 1) || n > 1 {
					t.Errorf("%d reads into metadata; the daemon log names one %d times, want once if any:\n%s",
						metaHits, n, daemonLog(t, mp))
				}
				if rss := daemonPeakRSS(t, pid); rss > limit {
					t.Errorf("daemon peak RSS %d MiB, limit %d MiB", rss>>10, limit>>10)
				} else {
					t.Logf("daemon peak RSS %d MiB", rss>>10)
				}
				unmount(t, mp)
			}
			after := driverstest.DirState(t, dir)
			for name, s := range before {
				if after[name] != s {
					t.Errorf("%s changed (content or mtime) through a read-only use", name)
				}
			}
		})
	}
}
