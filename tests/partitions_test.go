package tests

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
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
				// Partitioned through the mount: the partN files come
				// with the next mount.
				mp, disk := mount(t, img, false)
				sfdisk(t, disk, c.layout)
				if got := listDir(t, mp); !slices.Equal(got, []string{"disk"}) {
					t.Errorf("after repartitioning through the mount: %v; want only disk until the next mount", got)
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
