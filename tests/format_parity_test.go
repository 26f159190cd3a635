package tests

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"

	"imgfuse/drivers/driverstest"
)

// parityImage is one writable VDI, VHD, VHDX or VMDK variant of
// TestFormatParity.
type parityImage struct {
	name, format string
	opts         []string
	// sparse: a fresh image stores no data (not fixed, static or flat).
	sparse bool
	// records: whole blocks of zeros are recorded as such (VHDX block
	// states, VMDK zeroed grains), not written.
	records bool
	// check: qemu-img check checks the format (not VHD's).
	check bool
	// child: a delta link (qemu-img create -b) on a base image of the
	// same format (made with baseOpts) filled with data, which discards
	// and zeros must hide.
	child    bool
	baseOpts []string
}

var parityImages = []parityImage{
	{"dynamic.vdi", "vdi", nil, true, false, true, false, nil},
	{"static.vdi", "vdi", []string{"-o", "static=on"}, false, false, true, false, nil},
	{"dynamic.vhd", "vpc", nil, true, false, false, false, nil},
	{"fixed.vhd", "vpc", []string{"-o", "subformat=fixed"}, false, false, false, false, nil},
	{"forced.vhd", "vpc", []string{"-o", "force_size=on"}, true, false, false, false, nil},
	{"nozero.vhdx", "vhdx", []string{"-o", "block_size=1M,block_state_zero=off"}, true, true, true, false, nil},
	{"dynamic.vhdx", "vhdx", []string{"-o", "block_size=1M"}, true, true, true, false, nil},
	{"fixed.vhdx", "vhdx", []string{"-o", "subformat=fixed"}, false, false, true, false, nil},
	{"sparse.vmdk", "vmdk", nil, true, false, true, false, nil},
	{"zeroed.vmdk", "vmdk", []string{"-o", "zeroed_grain=on"}, true, true, true, false, nil},
	{"flat.vmdk", "vmdk", []string{"-o", "subformat=monolithicFlat"}, false, false, true, false, nil},
	{"split.vmdk", "vmdk", []string{"-o", "subformat=twoGbMaxExtentSparse"}, true, false, true, false, nil},
	{"split-flat.vmdk", "vmdk", []string{"-o", "subformat=twoGbMaxExtentFlat"}, false, false, true, false, nil},
	{"child.vmdk", "vmdk", nil, false, false, true, true, nil},
	{"zeroed-child.vmdk", "vmdk", []string{"-o", "zeroed_grain=on"}, false, true, true, true, nil},
	{"flat-child.vmdk", "vmdk", nil, false, false, true, true, []string{"-o", "subformat=monolithicFlat"}},
}

const (
	paritySize = 24 << 20
	// Two GPT partitions: part1 [1M, 9M), part2 from 9M to the backup
	// table.
	parityLayout = `label: gpt
start=2048, size=8M, name="one"
start=18432, name="two"
`
	part1Start = 1 << 20
	part2Start = 9 << 20
)

// TestFormatParity: what qcow2 and raw disks do through a writable mount,
// each writable VDI, VHD, VHDX and VMDK variant does too.
//   - A fresh sparse image's disk occupies (st_blocks) next to nothing.
//   - Locks: while it is mounted qemu-io cannot write the image (nor a
//     delta link's base), qemu-img info reads it only with -U (as when
//     QEMU writes it), and a second mount, even read-only, exits 4.
//   - Partitions: sfdisk makes a GPT with two partitions through the
//     mount, the partN files appear (and again at the next mount), and
//     writes to them land at the partition's offset.
//   - st_blocks grows with the writes; SEEK_DATA/SEEK_HOLE on the disk
//     find the data qemu-img map finds.
//   - fallocate PUNCH_HOLE and ZERO_RANGE read back as zeros; on blocks
//     never written they do not grow the image file; where the format
//     records zeros (VHDX block states, VMDK zeroed grains) whole blocks of
//     data become zeros in the map, not data.
//   - ext4 made on part2 and loop-mounted takes files and an fstrim, and
//     e2fsck finds it clean.
//   - After the unmount qemu-img compare finds the image equal to a raw
//     model, qemu-img check (where it checks the format) finds it clean,
//     a delta link's base is unchanged, and imgfuse info, map and check
//     print qemu-img's JSON and exit codes, info also its text.
//   - Mounted again, a seeded workload of buffered and O_DIRECT I/O,
//     fallocate and fsync reads back as its model does, and qemu-img
//     compare and check agree.
func TestFormatParity(t *testing.T) {
	requireE2E(t, "sfdisk", "du", "mkfs.ext4", "e2fsck", "fstrim", "mount", "umount", "losetup")
	_, err := os.Stat("/dev/loop-control")
	driverstest.SkipUnless(t, err == nil, "/dev/loop-control: %v", err)
	t.Parallel()
	for _, c := range parityImages {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			c.run(t)
		})
	}
}

func (c parityImage) run(t *testing.T) {
	dir := t.TempDir()
	img := filepath.Join(dir, c.name)
	create := append([]string{"create", "-q", "-f", c.format}, c.opts...)
	var base frozen
	basePath := ""
	if c.child {
		basePath = filepath.Join(dir, "base-"+c.name)
		driverstest.Cmd(t, "qemu-img", append(append([]string{"create", "-q", "-f", c.format}, c.baseOpts...), basePath, fmt.Sprint(paritySize))...)
		driverstest.QemuIOFormat(t, c.format, basePath, "write -P 0x5a 0 24M")
		create = append(create, "-b", basePath, "-F", c.format)
		files, _ := filepath.Glob(strings.TrimSuffix(basePath, filepath.Ext(basePath)) + "*") // a flat base's extent too
		base = freeze(t, files...)
	}
	driverstest.Cmd(t, "qemu-img", append(create, img, fmt.Sprint(paritySize))...)
	mp, disk := mount(t, img, false, "--format", c.format)

	if c.sparse {
		between(t, "du of a fresh disk", duBytes(t, disk), 0, 64<<10)
	}

	// Locks, as for a writable qcow2 mount.
	qemuWriteFails(t, c.format, img)
	if c.child {
		qemuWriteFails(t, c.format, basePath) // read by the mount, as QEMU reads a backing file
	}
	if out, err := exec.Command("qemu-img", "info", "-f", c.format, img).CombinedOutput(); err == nil || !lockMsg.Match(out) {
		t.Errorf("qemu-img info on a writable mount: %v\n%s", err, out)
	}
	driverstest.Cmd(t, "qemu-img", "info", "-U", "-f", c.format, img)
	for _, ro := range [][]string{nil, {"--read-only"}} {
		args := append(append([]string{"mount"}, ro...), img, newMountpoint(t, false))
		if r := imgfuse(t, nil, args...); r.code != 4 || !lockMsg.MatchString(r.stderr) { // exit 4: locked
			t.Errorf("second mount %v: %v", ro, r)
		}
	}

	// Partitions, made through the mount.
	sfdisk(t, disk, parityLayout)
	if got, want := listDir(t, mp), []string{"disk", "part1", "part2"}; !slices.Equal(got, want) {
		t.Fatalf("after partitioning through the mount: %v; want %v", got, want)
	}
	model, err := os.ReadFile(disk) // the partition tables sfdisk wrote
	if err != nil {
		t.Fatal(err)
	}
	duBefore := duBytes(t, disk)
	part1 := filepath.Join(mp, "part1")
	part2 := filepath.Join(mp, "part2")
	put := func(path string, base, off int64, p []byte) {
		t.Helper()
		f, err := os.OpenFile(path, os.O_RDWR, 0)
		if err != nil {
			t.Fatal(err)
		}
		defer f.Close()
		if _, err := f.WriteAt(p, off); err != nil {
			t.Fatalf("write %s at %d: %v", path, off, err)
		}
		if err := f.Sync(); err != nil {
			t.Fatal(err)
		}
		copy(model[base+off:], p)
	}
	put(part1, part1Start, 100<<10, patternAt(part1Start+100<<10, 300<<10, 0x11))
	put(part2, part2Start, 2<<20+12345, patternAt(part2Start+2<<20+12345, 700<<10, 0x22))
	// [4M, 6M) of data, zeroed below; [7M, 7M+256k) ragged.
	put(disk, 0, 4<<20, patternAt(4<<20, 2<<20, 0x33))
	put(disk, 0, 7<<20, patternAt(7<<20, 256<<10, 0x44))
	if !c.child { // a child's disk counts its full base already
		between(t, "du growth after writing 3.2 MiB", duBytes(t, disk)-duBefore, 3<<20, 8<<20)
	}
	c.seekMatchesMap(t, disk, img, model)

	// Discard and write zeroes: on data (whole 1 MiB and ragged), then
	// on blocks never written, which must not grow the file.
	f, err := os.OpenFile(disk, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	zero := func(mode uint32, off, n int64) {
		t.Helper()
		err := unix.Fallocate(int(f.Fd()), mode|unix.FALLOC_FL_KEEP_SIZE, off, n)
		if errors.Is(err, unix.EOPNOTSUPP) && mode == unix.FALLOC_FL_ZERO_RANGE {
			zeroRangeRefused(t, err)
		}
		if err != nil {
			t.Fatalf("fallocate(%#x, %d, %d): %v", mode, off, n, err)
		}
		clear(model[off : off+n])
		got := make([]byte, n)
		if _, err := f.ReadAt(got, off); err != nil {
			t.Fatal(err)
		}
		if d := firstDiff(got, model[off:off+n]); d >= 0 {
			t.Errorf("fallocate(%#x, %d, %d): byte %d reads %#x, want 0", mode, off, n, off+int64(d), got[d])
		}
	}
	zero(unix.FALLOC_FL_PUNCH_HOLE, 4<<20, 1<<20)
	zero(unix.FALLOC_FL_ZERO_RANGE, 5<<20, 1<<20)
	zero(unix.FALLOC_FL_PUNCH_HOLE, 7<<20+1000, 70000)
	zero(unix.FALLOC_FL_ZERO_RANGE, 7<<20+100000, 5000)
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
	size := fileSize(t, img)
	zero(unix.FALLOC_FL_PUNCH_HOLE, 8<<20, 512<<10)
	zero(unix.FALLOC_FL_ZERO_RANGE, 8<<20+512<<10, 512<<10)
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
	if got := fileSize(t, img); got != size && (!c.child || c.records) {
		t.Errorf("zeroing blocks never written grew the image file from %d to %d bytes", size, got)
	}
	if c.records {
		if n := mappedIn(t, img, c.format, 4<<20, 2<<20); n != 0 {
			t.Errorf("qemu-img map: %d bytes of data left in the 2 MiB discarded and zeroed; want them recorded as zeros", n)
		}
	}
	c.seekMatchesMap(t, disk, img, model)
	f.Close()

	// A small ext4 workload on part2 through a loop device.
	driverstest.Cmd(t, "mkfs.ext4", "-q", "-F", part2)
	fsDir, umount := loopMount(t, part2, "loop")
	for i := range 3 {
		if err := os.WriteFile(filepath.Join(fsDir, fmt.Sprint(i)), patternAt(int64(i), 300<<10, byte(i)), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Remove(filepath.Join(fsDir, "1")); err != nil {
		t.Fatal(err)
	}
	driverstest.Cmd(t, "fstrim", fsDir)
	umount()
	waitLoopDetached(t, part2)
	driverstest.Cmd(t, "e2fsck", "-fn", part2)
	p2, err := os.ReadFile(part2)
	if err != nil {
		t.Fatal(err)
	}
	copy(model[part2Start:], p2)
	unmountBusyRetry(t, mp)

	raw := filepath.Join(dir, "model.raw")
	writeModel(t, raw, model)
	if code, out := exitCode(t, "qemu-img", "compare", "-f", c.format, "-F", "raw", img, raw); code != 0 {
		t.Errorf("qemu-img compare: exit %d\n%s", code, out)
	}
	layout := sfdiskList(t, raw)
	if layout["part1"].Start*512 != part1Start || layout["part2"].Start*512 != part2Start {
		t.Errorf("sfdisk lists %+v; want part1 at %d, part2 at %d", layout, part1Start, part2Start)
	}
	if c.check {
		if code, out := exitCode(t, "qemu-img", "check", "-f", c.format, img); code != 0 || !strings.Contains(out, "No errors") {
			t.Errorf("qemu-img check: exit %d\n%s", code, out)
		}
	}
	c.sameJSON(t, img)
	c.sameHumanInfo(t, img)

	// Mounted again: the seeded mix of buffered and O_DIRECT writes and
	// reads, PUNCH_HOLE, ZERO_RANGE and fsync that qcow2 and raw take.
	mp, disk = mount(t, img, false, "--format", c.format)
	if got, want := listDir(t, mp), []string{"disk", "part1", "part2"}; !slices.Equal(got, want) {
		t.Errorf("mounted again: %v; want %v", got, want)
	}
	t.Run("workload", func(t *testing.T) { // its cleanup closes the disk
		newWorkload(t, disk, model, writeSeed(t)).run(400)
	})
	unmountBusyRetry(t, mp)
	writeModel(t, raw, model)
	if code, out := exitCode(t, "qemu-img", "compare", "-f", c.format, "-F", "raw", img, raw); code != 0 {
		t.Errorf("qemu-img compare after the workload: exit %d\n%s", code, out)
	}
	if c.check {
		if code, out := exitCode(t, "qemu-img", "check", "-f", c.format, img); code != 0 || !strings.Contains(out, "No errors") {
			t.Errorf("qemu-img check after the workload: exit %d\n%s", code, out)
		}
	}
	base.check(t)
}

// seekMatchesMap fails t unless SEEK_DATA/SEEK_HOLE on the mounted disk
// find the ranges qemu-img map -U reports as data (after an fsync), and
// the holes between them are zeros in model (which holds for VHDX too,
// where the map is imgfuse's own).
func (c parityImage) seekMatchesMap(t *testing.T, disk, img string, model []byte) {
	t.Helper()
	f, err := os.Open(disk)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
	var got [][2]int64
	size := int64(len(model))
	off := int64(0)
	for off < size {
		data, err := unix.Seek(int(f.Fd()), off, unix.SEEK_DATA)
		if errors.Is(err, syscall.ENXIO) {
			break
		}
		if err != nil {
			t.Fatalf("SEEK_DATA %d: %v", off, err)
		}
		hole, err := unix.Seek(int(f.Fd()), data, unix.SEEK_HOLE)
		if err != nil {
			t.Fatalf("SEEK_HOLE %d: %v", data, err)
		}
		if d := firstDiff(model[off:data], make([]byte, data-off)); d >= 0 {
			t.Errorf("SEEK_DATA from %d skips to %d over data at %d", off, data, off+int64(d))
		}
		got = append(got, [2]int64{data, hole})
		off = hole
	}
	if off < size {
		if d := firstDiff(model[off:], make([]byte, size-off)); d >= 0 {
			t.Errorf("SEEK_DATA from %d finds no data, but there is at %d", off, off+int64(d))
		}
	}
	var want [][2]int64
	for _, e := range qemuMap(t, img, c.format) {
		if e.Data {
			want = append(want, [2]int64{e.Start, e.Start + e.Length})
		}
	}
	if want = merge(want); !slices.Equal(got, want) {
		t.Errorf("SEEK_DATA/SEEK_HOLE find data at %v; qemu-img map at %v", got, want)
	}
}

// qemuMap is qemu-img map -U --output=json of img. QEMU's vhdx driver
// has no block status (qemu-img map calls the whole disk data): for VHDX
// it is imgfuse map's, which reads the block states.
func qemuMap(t *testing.T, img, format string) []mapEntry {
	t.Helper()
	out := driverstest.Cmd(t, "qemu-img", "map", "-U", "-f", format, "--output=json", img)
	if format == "vhdx" {
		r := imgfuse(t, nil, "map", "--output=json", img)
		if r.code != 0 {
			t.Fatalf("imgfuse map: %v", r)
		}
		out = []byte(r.stdout)
	}
	var m []mapEntry
	if err := json.Unmarshal(out, &m); err != nil {
		t.Fatal(err)
	}
	return m
}

// mappedIn sums the bytes qemu-img map reports as data in [off, off+n).
func mappedIn(t *testing.T, img, format string, off, n int64) int64 {
	t.Helper()
	var sum int64
	for _, e := range qemuMap(t, img, format) {
		if lo, hi := max(e.Start, off), min(e.Start+e.Length, off+n); e.Data && lo < hi {
			sum += hi - lo
		}
	}
	return sum
}

// sameJSON fails t unless imgfuse info, map and check print what qemu-img
// prints for img, with qemu-img's exit codes.
func (c parityImage) sameJSON(t *testing.T, img string) {
	t.Helper()
	for _, cmd := range []string{"info", "map", "check"} {
		r := imgfuse(t, nil, cmd, "--output=json", img)
		out, err := exec.Command("qemu-img", cmd, "--output=json", "-f", c.format, img).Output()
		code := 0
		var ee *exec.ExitError
		if errors.As(err, &ee) {
			code = ee.ExitCode()
		} else if err != nil {
			t.Fatal(err)
		}
		if r.code != code {
			t.Errorf("%s: exit %d, qemu-img %s exit %d\n%v", cmd, r.code, cmd, code, r)
			continue
		}
		if code != 0 || len(out) == 0 {
			continue
		}
		if cmd == "map" {
			if c.format == "vhdx" {
				continue // qemu-img has no map of VHDX blocks (qemuMap)
			}
			var g, w []map[string]any
			if json.Unmarshal([]byte(r.stdout), &g) != nil || json.Unmarshal(out, &w) != nil || !jsonEqual(g, w) {
				t.Errorf("map differs from qemu-img's:\n%s\nwant\n%s", r.stdout, out)
			}
			continue
		}
		sameShared(t, cmd, decodeJSON(t, "imgfuse "+cmd, []byte(r.stdout)), decodeJSON(t, "qemu-img "+cmd, out))
	}
}

// sameHumanInfo fails t unless imgfuse info prints what qemu-img info
// prints for img, less imgfuse's own "file size:" line and partition
// table after it.
func (c parityImage) sameHumanInfo(t *testing.T, img string) {
	t.Helper()
	r := imgfuse(t, nil, "info", "-f", c.format, img)
	var got []string
	for _, l := range strings.SplitAfter(r.stdout, "\n") {
		if !strings.HasPrefix(l, "file size: ") {
			got = append(got, l)
		}
	}
	want := string(driverstest.Cmd(t, "qemu-img", "info", "-f", c.format, img))
	if r.code != 0 || !strings.HasPrefix(strings.Join(got, ""), want) {
		t.Errorf("imgfuse info:\n%v\nqemu-img info:\n%s", r, want)
	}
}

// fileSize is the size of the file at path.
func fileSize(t *testing.T, path string) int64 {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	n, err := f.Seek(0, io.SeekEnd)
	if err != nil {
		t.Fatal(err)
	}
	return n
}
