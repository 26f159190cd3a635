package tests

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"testing"

	"golang.org/x/sys/unix"

	"imgfuse/drivers/driverstest"
)

// e2eSize is the virtual size of the catalogue images mounted here.
const e2eSize = 32 << 20

// TestCatalogue mounts every catalogue image (see driverstest.Catalogue)
// with the default options and compares the exposed disk with
// `qemu-img convert -O raw`.
func TestCatalogue(t *testing.T) {
	t.Parallel()
	requireE2E(t)
	for _, img := range driverstest.Catalogue(e2eSize) {
		t.Run(img.Name, func(t *testing.T) {
			t.Parallel()
			dir := t.TempDir()
			path := img.Build(t, dir, e2eSize)
			ref := driverstest.ConvertRef(t, path, img.Snapshot, dir)
			var flags []string
			if img.Snapshot != "" {
				flags = append(flags, "--snapshot", img.Snapshot)
			}
			_, disk := mount(t, path, false, flags...)
			compareFiles(t, disk, ref)
			for _, z := range img.Zeros {
				errno, b := readErrno(t, disk, z[0], z[1])
				if errno != 0 {
					t.Fatalf("read [%d, +%d): %v", z[0], z[1], errno)
				}
				for i, c := range b {
					if c != 0 {
						t.Fatalf("zeroed range [%d, +%d) reads %#x at %d", z[0], z[1], c, z[0]+int64(i))
					}
				}
			}
			if img.Name == "odd-size" {
				st, err := os.Stat(disk)
				if err != nil {
					t.Fatal(err)
				}
				// qemu rounds 4194704 up to a whole sector.
				if st.Size() != 4194816 {
					t.Errorf("odd-size disk is %d bytes, want 4194816", st.Size())
				}
			}
		})
	}
}

// TestSnapshotByID opens the internal snapshot by its id and checks that
// the active disk is different from it.
func TestSnapshotByID(t *testing.T) {
	requireE2E(t)
	t.Parallel()
	dir := t.TempDir()
	var snap driverstest.Image
	for _, img := range driverstest.Catalogue(e2eSize) {
		if img.Snapshot != "" {
			snap = img
		}
	}
	path := snap.Build(t, dir, e2eSize)
	refSnap := driverstest.ConvertRef(t, path, snap.Snapshot, t.TempDir())
	refActive := driverstest.ConvertRef(t, path, "", t.TempDir())

	var info struct {
		Snapshots []struct {
			ID   string `json:"id"`
			Name string `json:"name"`
		} `json:"snapshots"`
	}
	if err := json.Unmarshal(driverstest.Cmd(t, "qemu-img", "info", "--output=json", path), &info); err != nil {
		t.Fatal(err)
	}
	if len(info.Snapshots) != 1 || info.Snapshots[0].Name != snap.Snapshot {
		t.Fatalf("qemu-img info lists snapshots %+v", info.Snapshots)
	}
	_, disk := mount(t, path, false, "--snapshot", info.Snapshots[0].ID)
	compareFiles(t, disk, refSnap)

	// Read-only: a writable mount would need the write permission the
	// snapshot mount, like any QEMU reader, refuses to share.
	_, active := mount(t, path, false, "--read-only")
	compareFiles(t, active, refActive)
	a, _ := os.ReadFile(refActive)
	s, _ := os.ReadFile(refSnap)
	if string(a) == string(s) {
		t.Fatal("recipe error: the active disk equals the snapshot")
	}

	// An unknown snapshot is an error, not the active disk.
	mp := newMountpoint(t, false)
	if r := imgfuse(t, nil, "mount", "--snapshot", "no-such-snapshot", path, mp); r.code == 0 {
		unmount(t, mp)
		t.Fatalf("mount --snapshot no-such-snapshot succeeded: %v", r)
	} else if r.stderr == "" {
		t.Errorf("mount --snapshot no-such-snapshot failed without a message")
	}
	if mounted(t, mp) {
		forceUnmount(t, mp)
		t.Fatal("a failed mount left a mount behind")
	}
}

// mapEntry is one element of `qemu-img map --output=json`.
type mapEntry struct {
	Start  int64 `json:"start"`
	Length int64 `json:"length"`
	Data   bool  `json:"data"`
}

// merge sorts and merges adjacent or overlapping ranges.
func merge(rs [][2]int64) [][2]int64 {
	sort.Slice(rs, func(i, j int) bool { return rs[i][0] < rs[j][0] })
	var out [][2]int64
	for _, r := range rs {
		if n := len(out); n > 0 && out[n-1][1] >= r[0] {
			out[n-1][1] = max(out[n-1][1], r[1])
			continue
		}
		out = append(out, r)
	}
	return out
}

// seekDataRanges walks a file with SEEK_DATA/SEEK_HOLE and returns its data
// ranges as [start, end).
func seekDataRanges(t *testing.T, path string, size int64) [][2]int64 {
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	fd := int(f.Fd())
	var rs [][2]int64
	for off := int64(0); off < size; {
		if len(rs) > 100000 {
			t.Fatalf("more than 100000 data ranges")
		}
		data, err := unix.Seek(fd, off, unix.SEEK_DATA)
		if err == unix.ENXIO {
			break
		}
		if err != nil {
			t.Fatalf("lseek(%d, SEEK_DATA): %v", off, err)
		}
		if data < off {
			t.Fatalf("lseek(%d, SEEK_DATA) = %d, went backwards", off, data)
		}
		hole, err := unix.Seek(fd, data, unix.SEEK_HOLE)
		if err != nil {
			t.Fatalf("lseek(%d, SEEK_HOLE): %v", data, err)
		}
		if hole <= data || hole > size {
			t.Fatalf("lseek(%d, SEEK_HOLE) = %d (size %d)", data, hole, size)
		}
		rs = append(rs, [2]int64{data, hole})
		off = hole
	}
	return merge(rs)
}

// TestSparse1TiB mounts a 1 TiB image holding a few 64 KiB writes: the size
// is right, the writes read back, and SEEK_DATA/SEEK_HOLE agree with
// `qemu-img map`.
func TestSparse1TiB(t *testing.T) {
	requireE2E(t)
	t.Parallel()
	const size = 1 << 40
	img := filepath.Join(t.TempDir(), "big.qcow2")
	driverstest.Cmd(t, "qemu-img", "create", "-q", "-f", "qcow2", img, fmt.Sprint(size))
	offs := []int64{0, 1<<30 + 65536, 100 << 30, 512<<30 + 7*65536, 513 << 30, size - 65536}
	var cmds []string
	for i, o := range offs {
		cmds = append(cmds, fmt.Sprintf("write -P %#x %d 65536", 0x21+i, o))
	}
	// An adjacent pair, which SEEK_HOLE must see as one range.
	cmds = append(cmds, fmt.Sprintf("write -P 0x99 %d 65536", 513<<30+65536))
	driverstest.QemuIO(t, img, cmds...)

	_, disk := mount(t, img, false)
	st, err := os.Stat(disk)
	if err != nil {
		t.Fatal(err)
	}
	if st.Size() != size {
		t.Fatalf("disk is %d bytes, want %d", st.Size(), size)
	}
	for i, o := range offs {
		errno, b := readErrno(t, disk, o, 65536)
		if errno != 0 {
			t.Fatalf("read 64k at %d: %v", o, errno)
		}
		for j, c := range b {
			if c != byte(0x21+i) {
				t.Fatalf("byte at %d is %#x, want %#x", o+int64(j), c, 0x21+i)
			}
		}
	}
	// Unwritten space reads zeros.
	if errno, b := readErrno(t, disk, 200<<30, 1<<20); errno != 0 || string(b) != string(make([]byte, 1<<20)) {
		t.Fatalf("read at 200 GiB: errno %v or non-zero bytes", errno)
	}

	var m []mapEntry
	if err := json.Unmarshal(driverstest.Cmd(t, "qemu-img", "map", "-U", "--output=json", img), &m); err != nil {
		t.Fatal(err)
	}
	var want [][2]int64
	for _, e := range m {
		if e.Data {
			want = append(want, [2]int64{e.Start, e.Start + e.Length})
		}
	}
	want = merge(want)
	got := seekDataRanges(t, disk, size)
	if fmt.Sprint(got) != fmt.Sprint(want) {
		t.Fatalf("SEEK_DATA/SEEK_HOLE data ranges\n got %v\nwant %v (qemu-img map)", got, want)
	}
}

// TestSeekDataCatalogue checks SEEK_DATA/SEEK_HOLE against qemu-img map on
// images with zero clusters, discards and backing files.
func TestSeekDataCatalogue(t *testing.T) {
	t.Parallel()
	requireE2E(t)
	for _, img := range driverstest.Catalogue(e2eSize) {
		switch img.Name {
		case "v3", "zero-discard-over-backing", "chain-raw-qcow2-qcow2", "overlay-larger-than-backing", "zstd":
		default:
			continue
		}
		t.Run(img.Name, func(t *testing.T) {
			t.Parallel()
			path := img.Build(t, t.TempDir(), e2eSize)
			var m []mapEntry
			if err := json.Unmarshal(driverstest.Cmd(t, "qemu-img", "map", "-U", "--output=json", path), &m); err != nil {
				t.Fatal(err)
			}
			var want [][2]int64
			for _, e := range m {
				if e.Data {
					want = append(want, [2]int64{e.Start, e.Start + e.Length})
				}
			}
			want = merge(want)
			_, disk := mount(t, path, false)
			got := seekDataRanges(t, disk, e2eSize)
			if fmt.Sprint(got) != fmt.Sprint(want) {
				t.Fatalf("SEEK_DATA/SEEK_HOLE data ranges\n got %v\nwant %v (qemu-img map)", got, want)
			}
		})
	}
}
