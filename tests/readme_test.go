package tests

import (
	"bytes"
	"encoding/json"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"syscall"
	"testing"
	"time"

	"imgfuse/drivers/driverstest"
)

// Tests of README promises about how a mount ends, --name, partitions on a
// growing disk and the states `imgfuse status` shows, each judged from
// outside: the mount table, the daemon's exit status, qemu-img check and
// the bytes read back.

// fgDaemon is `imgfuse mount --foreground`, a child of the test, so that
// its exit status can be seen (a detached daemon's cannot).
type fgDaemon struct {
	cmd    *exec.Cmd
	out    bytes.Buffer
	done   chan struct{}
	err    error
	logDir string
}

// mountForeground mounts img with `imgfuse mount --foreground` on a new
// directory and returns once the mount is in the mount table. The test's
// clean-up kills a daemon still running and unmounts lazily.
func mountForeground(t *testing.T, img string, flags ...string) (mp, disk string, d *fgDaemon) {
	t.Helper()
	mp = newMountpoint(t, false)
	d = &fgDaemon{done: make(chan struct{}), logDir: t.TempDir()}
	args := append(append([]string{"mount", "--foreground"}, flags...), img, mp)
	d.cmd = exec.Command(imgfuseBin, args...)
	d.cmd.Stdout, d.cmd.Stderr = &d.out, &d.out
	d.cmd.Env = append(os.Environ(), "GORACE=log_path="+filepath.Join(d.logDir, "race")+" halt_on_error=0")
	if err := d.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { d.err = d.cmd.Wait(); close(d.done) }()
	t.Cleanup(func() {
		select {
		case <-d.done:
		default:
			d.cmd.Process.Kill()
			<-d.done
		}
		checkRaceLogs(t, d.logDir)
		checkNoPanic(t, d.out.String())
	})
	if !waitFor(30*time.Second, func() bool { return d.exited() || mounted(t, mp) }) || d.exited() {
		t.Fatalf("imgfuse mount --foreground %s: not mounted (exited: %v, %v)\n%s", img, d.exited(), d.err, d.out.String())
	}
	return mp, filepath.Join(mp, "disk"), d
}

func (d *fgDaemon) exited() bool {
	select {
	case <-d.done:
		return true
	default:
		return false
	}
}

// wait waits up to 20 s for the daemon to exit and fails t unless it
// exited with status 0.
func (d *fgDaemon) wait(t *testing.T, why string) {
	t.Helper()
	select {
	case <-d.done:
	case <-time.After(20 * time.Second):
		t.Fatalf("the daemon is still running 20 s after %s\n%s", why, d.out.String())
	}
	if d.err != nil {
		t.Fatalf("the daemon exited after %s with %v, want status 0\n%s", why, d.err, d.out.String())
	}
}

// statusEntry is what `imgfuse status --output=json` says of mp, and
// whether it lists mp at all.
func statusEntry(t *testing.T, mp string) (state string, listed bool) {
	t.Helper()
	r := imgfuse(t, nil, "status", "--output=json")
	if r.code != 0 {
		t.Fatalf("status: %v", r)
	}
	var list []struct {
		Mountpoint, State string
	}
	if err := json.Unmarshal([]byte(r.stdout), &list); err != nil {
		t.Fatalf("status --output=json: %v\n%s", err, r.stdout)
	}
	for _, e := range list {
		if e.Mountpoint == mp {
			return e.State, true
		}
	}
	return "", false
}

// TestMountEnds: README, Usage (mount: "SIGINT/SIGTERM to the daemon
// unmount cleanly") and Writing through the mount ("Unmounting —
// `imgfuse unmount`, SIGTERM/SIGINT to the daemon, or an external
// `umount` of the mountpoint — flushes everything and closes the image
// cleanly"): after SIGINT, `umount MNT` or `fusermount3 -u MNT` the daemon
// exits 0, the mount is gone, the unsynced write made just before is in
// the image, qemu-img check finds it clean and status no longer lists it.
// (TestSIGTERM covers SIGTERM.)
func TestMountEnds(t *testing.T) {
	requireE2E(t, "umount", "fusermount3")
	t.Parallel()
	for _, end := range []struct {
		name string
		do   func(t *testing.T, mp string, d *fgDaemon)
	}{
		{"SIGINT", func(t *testing.T, mp string, d *fgDaemon) {
			if err := d.cmd.Process.Signal(syscall.SIGINT); err != nil {
				t.Fatal(err)
			}
		}},
		{"umount", func(t *testing.T, mp string, d *fgDaemon) { driverstest.Cmd(t, "umount", mp) }},
		{"fusermount3", func(t *testing.T, mp string, d *fgDaemon) { driverstest.Cmd(t, "fusermount3", "-u", mp) }},
	} {
		t.Run(end.name, func(t *testing.T) {
			t.Parallel()
			// An empty image: the write below allocates.
			img := filepath.Join(t.TempDir(), "img.qcow2")
			driverstest.Cmd(t, "qemu-img", "create", "-q", "-f", "qcow2", img, "8M")
			mp, disk, d := mountForeground(t, img)
			if state, listed := statusEntry(t, mp); state != "mounted" {
				t.Fatalf("status before the end: %q (listed %v), want mounted", state, listed)
			}
			f, err := os.OpenFile(disk, os.O_RDWR, 0)
			if err != nil {
				t.Fatal(err)
			}
			// An allocating write, not synced: the clean end must
			// flush it (L2 table and refcounts included).
			p := bytes.Repeat([]byte{0x5e}, 64<<10)
			if _, err := f.WriteAt(p, 3<<20); err != nil {
				t.Fatal(err)
			}
			f.Close()

			end.do(t, mp, d)
			d.wait(t, end.name)
			if mounted(t, mp) {
				t.Fatalf("%s is still mounted after the daemon exited", mp)
			}
			requireClean(t, img)
			if dirtyBit(t, img) {
				t.Error("the image's dirty bit is set after a clean end")
			}
			driverstest.QemuIO(t, img, "read -P 0x5e 3M 64k")
			if state, listed := statusEntry(t, mp); listed {
				t.Errorf("status still lists %s (state %q) after the daemon exited", mp, state)
			}
		})
	}
}

// TestNameWinsOverPartition: README, Partitions: "`--name part1` wins over
// partition 1": on a partitioned disk, MNT/part1 is then the whole disk,
// not the first partition, and there is one part1.
func TestNameWinsOverPartition(t *testing.T) {
	requireE2E(t, "sfdisk")
	t.Parallel()
	img := filepath.Join(t.TempDir(), "disk.raw")
	model := patternAt(0, 48<<20, 0x3c)
	if err := os.WriteFile(img, model, 0o644); err != nil {
		t.Fatal(err)
	}
	sfdisk(t, img, mbrLayout)
	model, err := os.ReadFile(img)
	if err != nil {
		t.Fatal(err)
	}
	mp, disk := mount(t, img, false, "--read-only", "--name", "part1")
	if filepath.Base(disk) != "part1" {
		t.Fatalf("disk is %s", disk)
	}
	names := listDir(t, mp)
	if n := strings.Count(strings.Join(names, " ")+" ", "part1 "); n != 1 {
		t.Errorf("%s holds %v: %d entries named part1, want 1", mp, names, n)
	}
	if slices.Contains(names, "disk") {
		t.Errorf("%s holds %v: a disk entry besides the renamed one", mp, names)
	}
	if !slices.Contains(names, "part5") { // part2 is the extended partition
		t.Errorf("%s holds %v: the other partitions should still be there", mp, names)
	}
	got, err := os.ReadFile(disk)
	if err != nil {
		t.Fatal(err)
	}
	if len(got) != len(model) || !bytes.Equal(got, model) {
		t.Errorf("%s: %d bytes (first difference at %d), want the whole %d-byte disk", disk, len(got), firstDiff(got, model), len(model))
	}
}

// TestGrowablePartitionsKeepSize: README, Partitions: "Partitions keep
// their size when a `--growable` disk grows". The last partition of the
// MBR layout runs to the end of the disk; after a write past the end of
// MNT/disk it must still end where it did, as must the others, and each
// still reads as its range of the disk.
func TestGrowablePartitionsKeepSize(t *testing.T) {
	requireE2E(t, "sfdisk")
	t.Parallel()
	img := filepath.Join(t.TempDir(), "disk.raw")
	if err := os.WriteFile(img, patternAt(0, 32<<20, 0x2b), 0o644); err != nil {
		t.Fatal(err)
	}
	sfdisk(t, img, `label: dos
start=2048, size=8M, type=83
start=20480, type=83
`)
	mp, disk := mount(t, img, false, "--growable")

	parts := map[string]int64{}
	for _, n := range listDir(t, mp) {
		if strings.HasPrefix(n, "part") {
			fi, err := os.Stat(filepath.Join(mp, n))
			if err != nil {
				t.Fatal(err)
			}
			parts[n] = fi.Size()
		}
	}
	if parts["part1"] != 8<<20 || parts["part2"] != 32<<20-20480*512 || len(parts) != 2 {
		t.Fatalf("partitions before growing: %v", parts)
	}

	f, err := os.OpenFile(disk, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	tail := bytes.Repeat([]byte{0x7d}, 4096)
	if _, err := f.WriteAt(tail, 33<<20); err != nil {
		t.Fatalf("write past the end of a --growable disk: %v", err)
	}
	if fi, err := os.Stat(disk); err != nil || fi.Size() != 33<<20+4096 {
		t.Fatalf("disk after growing: %v, %v; want %d bytes", fi, err, 33<<20+4096)
	}
	whole, err := os.ReadFile(disk)
	if err != nil {
		t.Fatal(err)
	}
	for name, size := range parts {
		p := filepath.Join(mp, name)
		fi, err := os.Stat(p)
		if err != nil || fi.Size() != size {
			t.Errorf("%s after the disk grew: %v, %v; want %d bytes", name, fi, err, size)
			continue
		}
		start := int64(2048 * 512)
		if name == "part2" {
			start = 20480 * 512
		}
		got, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		if d := firstDiff(got, whole[start:start+size]); d >= 0 || int64(len(got)) != size {
			t.Errorf("%s after the disk grew: %d bytes, first difference from the disk's range at %d", name, len(got), d)
		}
	}
	// A write at the partition's (unchanged) end still fails: it does not
	// grow with the disk.
	pf, err := os.OpenFile(filepath.Join(mp, "part2"), os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer pf.Close()
	if _, err := pf.WriteAt([]byte{1}, parts["part2"]); !errors.Is(err, syscall.ENOSPC) {
		t.Errorf("write at the end of part2 after the disk grew: %v, want ENOSPC", err)
	}
}

// TestStatusUnmounting: README, status: "`unmounting` — the daemon is
// flushing": the mount is gone from the mount table while the daemon still
// runs. A lazy unmount with the disk held open makes that state last as
// long as the file is open (the kernel keeps the FUSE connection until the
// last file closes); then the daemon finishes, exits and leaves the image
// clean, and status no longer lists it.
func TestStatusUnmounting(t *testing.T) {
	requireE2E(t, "umount")
	t.Parallel()
	img, _ := smallQcow2(t)
	mp, disk := mount(t, img, false)
	pid := daemonPID(t, mp)
	f, err := os.OpenFile(disk, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteAt(bytes.Repeat([]byte{0x6a}, 8192), 1<<20); err != nil {
		t.Fatal(err)
	}
	driverstest.Cmd(t, "umount", "-l", mp)
	if mounted(t, mp) {
		t.Fatalf("%s still mounted after umount -l", mp)
	}
	if !alive(pid) {
		t.Fatal("the daemon exited while the disk is still open")
	}
	if state, listed := statusEntry(t, mp); state != "unmounting" {
		t.Errorf("status --output=json while the disk is still open: %q (listed %v), want unmounting", state, listed)
	}
	if r := imgfuse(t, nil, "status"); r.code != 0 || !strings.Contains(r.stdout, mp) || !strings.Contains(r.stdout, "unmounting") {
		t.Errorf("status table while the disk is still open, want %s unmounting: %v", mp, r)
	}
	// The open file still reaches the daemon.
	got := make([]byte, 8192)
	if _, err := f.ReadAt(got, 1<<20); err != nil || !bytes.Equal(got, bytes.Repeat([]byte{0x6a}, 8192)) {
		t.Errorf("read through the detached mount: %v", err)
	}
	f.Close()
	if !waitFor(20*time.Second, func() bool { return !alive(pid) }) {
		t.Fatal("the daemon is still running 20 s after the last file closed")
	}
	if state, listed := statusEntry(t, mp); listed {
		t.Errorf("status still lists %s (state %q) after the daemon exited", mp, state)
	}
	requireClean(t, img)
	driverstest.QemuIO(t, img, "read -P 0x6a 1M 8k")
}
