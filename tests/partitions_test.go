package tests

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"hash/crc32"
	"maps"
	"math/rand"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"

	"imgfuse/drivers/driverstest"
)

const (
	// Partition 5 is a logical partition in the extended 2.
	mbrLayout = `label: dos
start=2048, size=20M, type=83
start=43008, type=5
size=16M, type=83
type=83
`
	gptLayout = `label: gpt
start=2048, size=20M, name="root"
start=43008, size=8M, name="swap", type=0657FD6D-A4AB-43C4-84E5-0933C84B4F4F
start=59392, name="data"
`
)

// sfdisk partitions the file or mounted disk at path.
func sfdisk(t *testing.T, path, layout string) {
	t.Helper()
	cmd := exec.Command("sfdisk", "-q", "--no-reread", "--no-tell-kernel", path)
	cmd.Stdin = strings.NewReader(layout)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("sfdisk %s: %v\n%s", path, err, out)
	}
}

type sfdiskPart struct {
	Node        string `json:"node"`
	Start, Size int64
	Type        string
}

// sfdiskList is sfdisk's listing of path, by partition number.
func sfdiskList(t *testing.T, path string) map[string]sfdiskPart {
	t.Helper()
	out := driverstest.Cmd(t, "sfdisk", "--json", path)
	var v struct {
		PT struct{ Partitions []sfdiskPart } `json:"partitiontable"`
	}
	if err := json.Unmarshal(out, &v); err != nil {
		t.Fatal(err)
	}
	m := map[string]sfdiskPart{}
	for _, p := range v.PT.Partitions {
		i := len(p.Node)
		for i > 0 && p.Node[i-1] >= '0' && p.Node[i-1] <= '9' {
			i--
		}
		m["part"+p.Node[i:]] = p
	}
	return m
}

func listDir(t *testing.T, dir string) []string {
	t.Helper()
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range ents {
		names = append(names, e.Name())
	}
	return names
}

// loopMount mounts the ext4 file or device src at a new directory and
// returns it and a function that unmounts it.
func loopMount(t *testing.T, src string, opts string) (string, func()) {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "fs")
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("mount", "-t", "ext4", "-o", opts, src, dir).CombinedOutput(); err != nil {
		t.Fatalf("mount -o %s %s: %v\n%s", opts, src, err, out)
	}
	done := false
	umount := func() {
		if done {
			return
		}
		done = true
		if out, err := exec.Command("umount", dir).CombinedOutput(); err != nil {
			t.Errorf("umount %s: %v\n%s", dir, err, out)
			exec.Command("umount", "-l", dir).Run()
		}
	}
	t.Cleanup(umount)
	return dir, umount
}

// TestPartitionsExt4: a disk partitioned by sfdisk (MBR with a logical
// partition, GPT; raw, and qcow2 partitioned through the mount) shows its
// partitions as partN; ext4 made on two of them and loop-mounted holds the
// files written, which qemu-img convert + e2fsck and a read-only mount at
// the partition's offset (sfdisk's numbers) confirm.
func TestPartitionsExt4(t *testing.T) {
	t.Parallel()
	requireE2E(t, "sfdisk", "mkfs.ext4", "e2fsck", "mount", "umount", "losetup")
	_, err := os.Stat("/dev/loop-control")
	driverstest.SkipUnless(t, err == nil, "/dev/loop-control: %v", err)
	for _, c := range []struct {
		name, format, layout string
		want                 []string
		fs                   []string
	}{
		{"raw-mbr", "raw", mbrLayout, []string{"disk", "part1", "part5", "part6"}, []string{"part1", "part5"}},
		{"qcow2-gpt", "qcow2", gptLayout, []string{"disk", "part1", "part2", "part3"}, []string{"part1", "part3"}},
		{"qcow2-mbr", "qcow2", mbrLayout, []string{"disk", "part1", "part5", "part6"}, []string{"part5"}},
		{"raw-gpt", "raw", gptLayout, []string{"disk", "part1", "part2", "part3"}, []string{"part3"}},
	} {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			dir := t.TempDir()
			img := filepath.Join(dir, "disk."+c.format)
			driverstest.Cmd(t, "qemu-img", "create", "-q", "-f", c.format, img, "64M")
			if c.format == "raw" {
				sfdisk(t, img, c.layout)
			} else {
				// Partitioned through the mount: the partN files
				// appear at once, and again at the next mount.
				mp, disk := mount(t, img, false)
				sfdisk(t, disk, c.layout)
				if got := listDir(t, mp); !slices.Equal(got, c.want) {
					t.Errorf("after partitioning through the mount: %v; want %v", got, c.want)
				}
				unmount(t, mp)
			}
			mp, _ := mount(t, img, false)
			if got := listDir(t, mp); !slices.Equal(got, c.want) {
				t.Fatalf("directory %v, want %v", got, c.want)
			}
			rng := rand.New(rand.NewSource(int64(len(c.name))))
			files := map[string][]byte{}
			for _, part := range c.fs {
				driverstest.Cmd(t, "mkfs.ext4", "-q", "-F", filepath.Join(mp, part))
				fsDir, umount := loopMount(t, filepath.Join(mp, part), "loop")
				for i := range 3 {
					b := make([]byte, 200<<10+rng.Intn(300<<10))
					rng.Read(b)
					name := fmt.Sprintf("%s-%d", part, i)
					files[part+"/"+name] = b
					if err := os.WriteFile(filepath.Join(fsDir, name), b, 0o644); err != nil {
						t.Fatal(err)
					}
				}
				umount()
				waitLoopDetached(t, filepath.Join(mp, part))
			}
			unmount(t, mp)

			rawOut := filepath.Join(dir, "out.raw")
			driverstest.Cmd(t, "qemu-img", "convert", "-O", "raw", img, rawOut)
			layout := sfdiskList(t, rawOut)
			for _, part := range c.fs {
				p, ok := layout[part]
				if !ok {
					t.Fatalf("sfdisk lists no %s in %v", part, layout)
				}
				dev := strings.TrimSpace(string(driverstest.Cmd(t, "losetup", "-f", "--show", "-r",
					"-o", fmt.Sprint(p.Start*512), "--sizelimit", fmt.Sprint(p.Size*512), rawOut)))
				t.Cleanup(func() { exec.Command("losetup", "-d", dev).Run() })
				driverstest.Cmd(t, "e2fsck", "-fn", dev)
				fsDir, umount := loopMount(t, dev, "ro")
				for k, want := range files {
					name, ok := strings.CutPrefix(k, part+"/")
					if !ok {
						continue
					}
					got, err := os.ReadFile(filepath.Join(fsDir, name))
					if err != nil || !bytes.Equal(got, want) {
						t.Errorf("%s %s: %d bytes, %v; want the %d written", part, name, len(got), err, len(want))
					}
				}
				umount()
			}
		})
	}
}

// TestPartitionsReadOnly: a read-only mount refuses writes on partN.
func TestPartitionsReadOnly(t *testing.T) {
	requireE2E(t, "sfdisk")
	t.Parallel()
	img := filepath.Join(t.TempDir(), "disk.raw")
	driverstest.Cmd(t, "qemu-img", "create", "-q", "-f", "raw", img, "32M")
	sfdisk(t, img, mbrLayout)
	mp, _ := mount(t, img, false, "--read-only")
	for _, flag := range []int{os.O_RDWR, os.O_WRONLY} {
		f, err := os.OpenFile(filepath.Join(mp, "part5"), flag, 0)
		if err == nil {
			f.Close()
		}
		if !errors.Is(err, syscall.EROFS) {
			t.Errorf("open part5 (%#x): %v; want EROFS", flag, err)
		}
	}
	if b, err := os.ReadFile(filepath.Join(mp, "part1")); err != nil || len(b) != 20<<20 {
		t.Errorf("read part1: %d bytes, %v", len(b), err)
	}
}

// TestPartitionsMalformed: a GPT whose both headers fail their CRC and an
// MBR whose extended chain loops mount fine, with only the disk and one
// log line.
func TestPartitionsMalformed(t *testing.T) {
	t.Parallel()
	requireE2E(t, "sfdisk")
	for _, c := range []struct {
		name, layout string
		corrupt      func(t *testing.T, f *os.File, size int64)
	}{
		{"gpt-crc", gptLayout, func(t *testing.T, f *os.File, size int64) {
			for _, off := range []int64{512 + 60, size - 512 + 60} { // disk GUIDs
				if _, err := f.WriteAt([]byte{0xAB, 0xCD}, off); err != nil {
					t.Fatal(err)
				}
			}
		}},
		{"mbr-loop", mbrLayout, func(t *testing.T, f *os.File, size int64) {
			// The first EBR (at the extended start, 43008) links to
			// itself: entry 2 of it, type 5, offset 0.
			entry := make([]byte, 16)
			entry[4] = 0x05
			entry[12] = 8
			if _, err := f.WriteAt(entry, 43008*512+0x1BE+16); err != nil {
				t.Fatal(err)
			}
		}},
	} {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			img := filepath.Join(t.TempDir(), "disk.raw")
			driverstest.Cmd(t, "qemu-img", "create", "-q", "-f", "raw", img, "32M")
			sfdisk(t, img, c.layout)
			f, err := os.OpenFile(img, os.O_RDWR, 0)
			if err != nil {
				t.Fatal(err)
			}
			c.corrupt(t, f, 32<<20)
			f.Close()
			mp, _ := mount(t, img, false)
			if got := listDir(t, mp); !slices.Equal(got, []string{"disk"}) {
				t.Errorf("directory %v, want only disk", got)
			}
			if logSupported {
				if n := strings.Count(daemonLog(t, mp), "ignoring the partition table"); n != 1 {
					t.Errorf("%d log lines about the table, want 1:\n%s", n, daemonLog(t, mp))
				}
			}
		})
	}
}

// TestPartitionsSeekDataHole: SEEK_DATA/SEEK_HOLE on a partition of a
// qcow2 disk are relative to the partition and end at its end.
func TestPartitionsSeekDataHole(t *testing.T) {
	requireE2E(t, "sfdisk")
	t.Parallel()
	dir := t.TempDir()
	rawImg := filepath.Join(dir, "disk.raw")
	driverstest.Cmd(t, "qemu-img", "create", "-q", "-f", "raw", rawImg, "32M")
	sfdisk(t, rawImg, gptLayout)
	img := filepath.Join(dir, "disk.qcow2")
	driverstest.Cmd(t, "qemu-img", "convert", "-O", "qcow2", rawImg, img)
	// Partition 1 starts at 1 MiB; 64 KiB of data 2 MiB into it.
	driverstest.Cmd(t, "qemu-io", "-f", "qcow2", "-c", "write -P 0xab 3M 64k", img)
	mp, _ := mount(t, img, false)
	f, err := os.Open(filepath.Join(mp, "part1"))
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	const m = 1 << 20
	driverstest.CheckSeeks(t, f, []driverstest.Seek{
		{Off: 0, Whence: unix.SEEK_DATA, Want: 2 * m},
		{Off: 0, Whence: unix.SEEK_HOLE, Want: 0},
		{Off: 2 * m, Whence: unix.SEEK_HOLE, Want: 2*m + 64<<10},
		{Off: 2*m + 64<<10, Whence: unix.SEEK_DATA, Err: syscall.ENXIO},
		{Off: 2*m + 64<<10, Whence: unix.SEEK_HOLE, Want: 2*m + 64<<10},
		{Off: 20*m - 1, Whence: unix.SEEK_HOLE, Want: 20*m - 1},
		{Off: 20 * m, Whence: unix.SEEK_HOLE, Err: syscall.ENXIO},
	})
	b := make([]byte, 64<<10)
	if n, err := f.ReadAt(b, 2*m); err != nil || n != len(b) || !bytes.Equal(b, bytes.Repeat([]byte{0xab}, len(b))) {
		t.Errorf("pread at the data: %d, %v", n, err)
	}
}

// TestPartitionsInfo: imgfuse info lists the partition table (of the disk
// through its backing chain) as sfdisk lists it, in both outputs.
func TestPartitionsInfo(t *testing.T) {
	requireE2E(t, "sfdisk")
	t.Parallel()
	for _, layout := range []string{mbrLayout, gptLayout} {
		dir := t.TempDir()
		base := filepath.Join(dir, "base.raw")
		driverstest.Cmd(t, "qemu-img", "create", "-q", "-f", "raw", base, "64M")
		sfdisk(t, base, layout)
		top := filepath.Join(dir, "top.qcow2")
		driverstest.Cmd(t, "qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "raw", top)
		want := sfdiskList(t, base)
		r := imgfuse(t, nil, "info", "--output=json", top)
		if r.code != 0 {
			t.Fatalf("info: %v", r)
		}
		var v struct {
			Imgfuse struct {
				PT struct {
					Table      string
					Partitions []struct {
						Number      int
						File        string
						Start, Size int64
						Type        string
					}
				} `json:"partition-table"`
			}
		}
		if err := json.Unmarshal([]byte(r.stdout), &v); err != nil {
			t.Fatal(err)
		}
		n := 0
		for _, p := range v.Imgfuse.PT.Partitions {
			w, ok := want[p.File]
			if !ok || w.Start*512 != p.Start || w.Size*512 != p.Size || p.File != fmt.Sprintf("part%d", p.Number) ||
				!sameType(p.Type, w.Type) {
				t.Errorf("info lists %+v; sfdisk %+v", p, w)
			}
			n++
		}
		if ext := strings.Contains(layout, "type=5"); n != len(want)-map[bool]int{true: 1, false: 0}[ext] {
			t.Errorf("info lists %d partitions, sfdisk %d (extended not counted)", n, len(want))
		}
		r = imgfuse(t, nil, "info", top)
		if r.code != 0 || !strings.Contains(r.stdout, "Partition table: "+v.Imgfuse.PT.Table) || !strings.Contains(r.stdout, "part1 ") {
			t.Errorf("human info: %v", r)
		}
	}
}

// sameType compares info's partition type ("0x83", a GUID) with sfdisk's
// ("83", a GUID).
func sameType(info, sfdisk string) bool {
	if hex, ok := strings.CutPrefix(info, "0x"); ok {
		a, err1 := strconv.ParseUint(hex, 16, 8)
		b, err2 := strconv.ParseUint(sfdisk, 16, 8)
		return err1 == nil && err2 == nil && a == b
	}
	return strings.EqualFold(info, sfdisk)
}

// mountedParts is what `ls -l MNT` shows: each partN file and its size.
func mountedParts(t *testing.T, mp string) map[string]int64 {
	t.Helper()
	m := map[string]int64{}
	for _, name := range listDir(t, mp) {
		if !strings.HasPrefix(name, "part") {
			continue
		}
		fi, err := os.Stat(filepath.Join(mp, name))
		if err != nil {
			t.Fatalf("stat %s: %v", name, err)
		}
		m[name] = fi.Size()
	}
	return m
}

// infoParts is `imgfuse info --output=json`'s partition table: each file
// and its start and size in bytes.
func infoParts(t *testing.T, img string) map[string][2]int64 {
	t.Helper()
	r := imgfuse(t, nil, "info", "--output=json", img)
	if r.code != 0 {
		t.Fatalf("info: %v", r)
	}
	var v struct {
		Imgfuse struct {
			PT struct {
				Partitions []struct {
					File        string
					Start, Size int64
				}
			} `json:"partition-table"`
		}
	}
	if err := json.Unmarshal([]byte(r.stdout), &v); err != nil {
		t.Fatal(err)
	}
	m := map[string][2]int64{}
	for _, p := range v.Imgfuse.PT.Partitions {
		m[p.File] = [2]int64{p.Start, p.Size}
	}
	return m
}

// checkTable fails t unless the mount (names and sizes) and `imgfuse info`
// (names, starts and sizes) both show want, file → {start, size}.
func checkTable(t *testing.T, mp, img string, want map[string][2]int64) {
	t.Helper()
	sizes := map[string]int64{}
	for name, w := range want {
		sizes[name] = w[1]
	}
	if got := mountedParts(t, mp); !maps.Equal(got, sizes) {
		t.Errorf("the mount shows %v, want %v", got, sizes)
	}
	if got := infoParts(t, img); !maps.Equal(got, want) {
		t.Errorf("imgfuse info shows %v, want %v", got, want)
	}
}

// staleErr reports whether err is how I/O on a handle of a partition whose
// range changed must fail.
func staleErr(err error) bool {
	return errors.Is(err, syscall.ESTALE) || errors.Is(err, syscall.EIO)
}

const mib = 1 << 20

// TestPartitionsRepartition: a qcow2 disk partitioned through the mount
// shows its partitions at once; repartitioned by sfdisk while a handle of
// part2 is open, `ls -l` at once shows the new table (part2 gone, part1
// grown over part2's old range), imgfuse info agrees, and the stale handle
// fails reads, writes and a mkfs through it (ESTALE or EIO) without
// writing a byte: the image afterwards is the disk as it was after sfdisk,
// byte for byte, and qemu-img check is clean.
func TestPartitionsRepartition(t *testing.T) {
	t.Parallel()
	requireE2E(t, "sfdisk", "mkfs.ext4")
	dir := t.TempDir()
	img := filepath.Join(dir, "disk.qcow2")
	driverstest.Cmd(t, "qemu-img", "create", "-q", "-f", "qcow2", img, "32M")
	mp, disk := mount(t, img, false)
	sfdisk(t, disk, "label: dos\nstart=2048, size=8M, type=83\nstart=18432, size=8M, type=83\n")
	checkTable(t, mp, img, map[string][2]int64{"part1": {mib, 8 * mib}, "part2": {9 * mib, 8 * mib}})

	p2, err := os.OpenFile(filepath.Join(mp, "part2"), os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer p2.Close()
	if _, err := p2.WriteAt(bytes.Repeat([]byte{0x5A}, 64<<10), 0); err != nil {
		t.Fatal(err)
	}

	sfdisk(t, disk, "label: dos\nstart=2048, size=20M, type=83\n")
	// At once: no remount, no wait.
	checkTable(t, mp, img, map[string][2]int64{"part1": {mib, 20 * mib}})
	want, err := os.ReadFile(disk)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(want[9*mib:9*mib+64<<10], bytes.Repeat([]byte{0x5A}, 64<<10)) {
		t.Fatal("part2's old data is not where it was")
	}

	if _, err := p2.ReadAt(make([]byte, 4096), 0); !staleErr(err) {
		t.Errorf("read through the stale part2: %v; want ESTALE or EIO", err)
	}
	if _, err := p2.WriteAt(bytes.Repeat([]byte{0xC3}, 4096), 4096); !staleErr(err) {
		t.Errorf("write through the stale part2: %v; want ESTALE or EIO", err)
	}
	// The case: mkfs on the stale part2 (reached through the
	// descriptor: the name is gone).
	stalePath := fmt.Sprintf("/proc/%d/fd/%d", os.Getpid(), p2.Fd())
	if out, err := exec.Command("mkfs.ext4", "-q", "-F", stalePath).CombinedOutput(); err == nil {
		t.Errorf("mkfs.ext4 on the stale part2 succeeded:\n%s", out)
	} else if strings.Contains(string(out), "does not exist") {
		t.Errorf("mkfs.ext4 did not find the stale part2 at %s:\n%s", stalePath, out)
	}
	if err := p2.Close(); err != nil {
		t.Errorf("close of the stale part2: %v", err)
	}

	unmount(t, mp)
	requireClean(t, img)
	out := filepath.Join(dir, "out.raw")
	driverstest.Cmd(t, "qemu-img", "convert", "-O", "raw", img, out)
	model := filepath.Join(dir, "model.raw")
	if err := os.WriteFile(model, want, 0o644); err != nil {
		t.Fatal(err)
	}
	compareFiles(t, out, model)
}

// TestPartitionsRepartitionLoop: sfdisk on a loop device over MNT/disk
// (direct I/O, and the buffered default) repartitions the disk, and
// `ls -l MNT` shows the new table as soon as sfdisk is done; imgfuse info
// agrees.
func TestPartitionsRepartitionLoop(t *testing.T) {
	t.Parallel()
	requireE2E(t, "sfdisk", "losetup")
	_, err := os.Stat("/dev/loop-control")
	driverstest.SkipUnless(t, err == nil, "/dev/loop-control: %v", err)
	for _, dio := range []string{"on", "off"} {
		t.Run("direct-io="+dio, func(t *testing.T) {
			t.Parallel()
			img := filepath.Join(t.TempDir(), "disk.raw")
			driverstest.Cmd(t, "qemu-img", "create", "-q", "-f", "raw", img, "32M")
			sfdisk(t, img, "label: dos\nstart=2048, size=8M, type=83\nstart=18432, size=8M, type=83\n")
			mp, disk := mount(t, img, false)
			checkTable(t, mp, img, map[string][2]int64{"part1": {mib, 8 * mib}, "part2": {9 * mib, 8 * mib}})
			dev := strings.TrimSpace(string(driverstest.Cmd(t, "losetup", "--direct-io="+dio, "-f", "--show", disk)))
			t.Cleanup(func() { // before the unmount, which it keeps busy
				if out, err := exec.Command("losetup", "-d", dev).CombinedOutput(); err != nil {
					t.Errorf("losetup -d %s: %v\n%s", dev, err, out)
				}
				waitLoopDetached(t, disk)
			})
			// part1 shrinks, part2 moves and grows, a logical 5 appears.
			sfdisk(t, dev, "label: dos\nstart=2048, size=4M, type=83\nstart=10240, size=12M, type=83\nstart=34816, type=5\nsize=4M, type=83\n")
			checkTable(t, mp, img, map[string][2]int64{
				"part1": {mib, 4 * mib}, "part2": {5 * mib, 12 * mib}, "part5": {17*mib + 1*mib, 4 * mib}})
		})
	}
}

// TestPartitionsAddKeepsHandle: a repartition that only adds a partition
// leaves part1 alone: same inode, and a handle opened before reads and
// writes its range as before.
func TestPartitionsAddKeepsHandle(t *testing.T) {
	t.Parallel()
	requireE2E(t, "sfdisk")
	img := filepath.Join(t.TempDir(), "disk.raw")
	driverstest.Cmd(t, "qemu-img", "create", "-q", "-f", "raw", img, "32M")
	sfdisk(t, img, "label: gpt\nstart=2048, size=8M, name=a\n")
	mp, disk := mount(t, img, false)
	p1Path := filepath.Join(mp, "part1")
	var st1 syscall.Stat_t
	if err := syscall.Stat(p1Path, &st1); err != nil {
		t.Fatal(err)
	}
	p1, err := os.OpenFile(p1Path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer p1.Close()

	sfdisk(t, disk, "label: gpt\nstart=2048, size=8M, name=a\nstart=18432, size=4M, name=b\n")
	checkTable(t, mp, img, map[string][2]int64{"part1": {mib, 8 * mib}, "part2": {9 * mib, 4 * mib}})
	var st2 syscall.Stat_t
	if err := syscall.Stat(p1Path, &st2); err != nil {
		t.Fatal(err)
	}
	if st1.Ino != st2.Ino {
		t.Errorf("part1's inode changed (%d → %d) though its range did not", st1.Ino, st2.Ino)
	}
	w := bytes.Repeat([]byte{0x3C}, 8192)
	if _, err := p1.WriteAt(w, mib); err != nil {
		t.Fatalf("write through part1 opened before: %v", err)
	}
	if err := p1.Sync(); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, len(w))
	if _, err := p1.ReadAt(got, mib); err != nil || !bytes.Equal(got, w) {
		t.Errorf("read through part1 opened before: %v", err)
	}
	f, err := os.Open(disk)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.ReadAt(got, 2*mib); err != nil || !bytes.Equal(got, w) {
		t.Errorf("the disk at part1's offset: %v, or other bytes", err)
	}
}

// gptBackup is the backup GPT of a disk of size bytes, as read through
// disk: the header (last LBA), the offset of its entry array and the
// array.
func gptBackup(t *testing.T, disk *os.File, size int64) (hdr []byte, arrOff int64, arr []byte) {
	t.Helper()
	hdr = make([]byte, 512)
	if _, err := disk.ReadAt(hdr, size-512); err != nil {
		t.Fatal(err)
	}
	if string(hdr[:8]) != "EFI PART" {
		t.Fatalf("no backup GPT header at %d", size-512)
	}
	arrOff = int64(binary.LittleEndian.Uint64(hdr[72:])) * 512
	arr = make([]byte, binary.LittleEndian.Uint32(hdr[80:])*binary.LittleEndian.Uint32(hdr[84:]))
	if _, err := disk.ReadAt(arr, arrOff); err != nil {
		t.Fatal(err)
	}
	return hdr, arrOff, arr
}

// sealGPTHeader sets the header's entry array CRC32 for arr and its own.
func sealGPTHeader(hdr, arr []byte) {
	binary.LittleEndian.PutUint32(hdr[88:], crc32.ChecksumIEEE(arr))
	clear(hdr[16:20])
	n := binary.LittleEndian.Uint32(hdr[12:])
	binary.LittleEndian.PutUint32(hdr[16:], crc32.ChecksumIEEE(hdr[:n]))
}

// TestPartitionsBackupGPT: with the primary GPT damaged through the mount,
// the partitions come from the backup; a write of only the backup header
// and entry array (as a tool repairing or editing the backup does) then
// changes the partN files at once: part2 removed, part3 shrunk. imgfuse
// info agrees after each step.
func TestPartitionsBackupGPT(t *testing.T) {
	t.Parallel()
	requireE2E(t, "sfdisk")
	const size = 32 * mib
	img := filepath.Join(t.TempDir(), "disk.raw")
	driverstest.Cmd(t, "qemu-img", "create", "-q", "-f", "raw", img, "32M")
	sfdisk(t, img, "label: gpt\nstart=2048, size=8M, name=a\nstart=18432, size=8M, name=b\nstart=34816, size=8M, name=c\n")
	mp, diskPath := mount(t, img, false)
	orig := map[string][2]int64{"part1": {mib, 8 * mib}, "part2": {9 * mib, 8 * mib}, "part3": {17 * mib, 8 * mib}}
	checkTable(t, mp, img, orig)
	disk, err := os.OpenFile(diskPath, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer disk.Close()

	// Damage the primary header (its disk GUID, so its CRC fails).
	if _, err := disk.WriteAt([]byte{0xAB, 0xCD}, 512+56); err != nil {
		t.Fatal(err)
	}
	if err := disk.Sync(); err != nil {
		t.Fatal(err)
	}
	checkTable(t, mp, img, orig)
	if logSupported && !strings.Contains(daemonLog(t, mp), "using the backup") {
		t.Errorf("the daemon log does not say the backup GPT is used:\n%s", daemonLog(t, mp))
	}

	hdr, arrOff, arr := gptBackup(t, disk, size)
	clear(arr[128 : 2*128]) // entry 2: unused
	// Entry 3 ends 4 MiB earlier (its last LBA, inclusive).
	last := binary.LittleEndian.Uint64(arr[2*128+40:])
	binary.LittleEndian.PutUint64(arr[2*128+40:], last-4*mib/512)
	sealGPTHeader(hdr, arr)
	if arrOff < size-33*512 || arrOff >= size-512 {
		t.Fatalf("backup entry array at %d: not just before the backup header", arrOff)
	}
	if _, err := disk.WriteAt(arr, arrOff); err != nil {
		t.Fatal(err)
	}
	if _, err := disk.WriteAt(hdr, size-512); err != nil {
		t.Fatal(err)
	}
	if err := disk.Sync(); err != nil {
		t.Fatal(err)
	}
	checkTable(t, mp, img, map[string][2]int64{"part1": {mib, 8 * mib}, "part3": {17 * mib, 4 * mib}})
}
