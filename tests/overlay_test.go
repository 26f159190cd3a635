package tests

import (
	"encoding/json"
	"math/rand"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"imgfuse/drivers/driverstest"
)

// overlayBase makes a 32 MiB qcow2 image with scattered data and returns
// it with a raw copy of its contents (the model the tests update).
func overlayBase(t *testing.T) (img, model string) {
	t.Helper()
	dir := t.TempDir()
	img = filepath.Join(dir, "base.qcow2")
	driverstest.Cmd(t, "qemu-img", "create", "-q", "-f", "qcow2", img, "32M")
	driverstest.QemuIO(t, img, driverstest.Scatter(32<<20, 65536, 3)...)
	return img, driverstest.ConvertRef(t, img, "", dir)
}

// writeThrough writes a few random extents to disk (through the mount)
// and to the model file, fsyncs, and checks that the disk reads back as
// the model.
func writeThrough(t *testing.T, disk, model string, seed int64) {
	t.Helper()
	rng := rand.New(rand.NewSource(seed))
	df, err := os.OpenFile(disk, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer df.Close()
	mf, err := os.OpenFile(model, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer mf.Close()
	for i := 0; i < 8; i++ {
		n := int64(rng.Intn(200<<10) + 1)
		off := rng.Int63n(32<<20 - n)
		b := make([]byte, n)
		rng.Read(b)
		if _, err := df.WriteAt(b, off); err != nil {
			t.Fatalf("write %d bytes at %d through the mount: %v", n, off, err)
		}
		if _, err := mf.WriteAt(b, off); err != nil {
			t.Fatal(err)
		}
	}
	if err := df.Sync(); err != nil {
		t.Fatalf("fsync through the mount: %v", err)
	}
	compareFiles(t, disk, model)
}

var overlayLogLine = regexp.MustCompile(`writes go to the overlay (\S+)`)

// overlayPath returns the overlay the daemon serving mp logged.
func overlayPath(t *testing.T, mp string) string {
	t.Helper()
	m := overlayLogLine.FindStringSubmatch(daemonLog(t, mp))
	if m == nil {
		t.Fatalf("the daemon did not log its overlay:\n%s", daemonLog(t, mp))
	}
	return m[1]
}

// TestOverlay: mount --overlay sends writes to a temporary qcow2 overlay
// that goes away on unmount; the image stays byte-identical and readable
// by other read-only users meanwhile; --overlay-keep keeps the overlay.
func TestOverlay(t *testing.T) {
	requireE2E(t)
	t.Parallel()

	t.Run("throw-away", func(t *testing.T) {
		t.Parallel()
		base, model := overlayBase(t)
		frozen := freeze(t, base)
		pidfile := filepath.Join(t.TempDir(), "imgfuse.pid")
		mp, disk := mount(t, base, false, "--overlay", "--pidfile", pidfile)
		ov := overlayPath(t, mp)
		if _, err := os.Stat(ov); err != nil {
			t.Fatalf("overlay: %v", err)
		}
		// --pidfile: written before mount returned, holding the daemon.
		b, err := os.ReadFile(pidfile)
		if err != nil {
			t.Fatalf("--pidfile: %v", err)
		}
		if pid, err := strconv.Atoi(strings.TrimSpace(string(b))); err != nil || pid != daemonPID(t, mp) {
			t.Errorf("--pidfile holds %q, the daemon is pid %d", b, daemonPID(t, mp))
		}

		writeThrough(t, disk, model, 1)

		// The overlay names the image (absolute) and its format.
		var info struct {
			Backing string `json:"full-backing-filename"`
			Format  string `json:"backing-filename-format"`
		}
		if err := json.Unmarshal(driverstest.Cmd(t, "qemu-img", "info", "-U", "--output=json", ov), &info); err != nil {
			t.Fatal(err)
		}
		if info.Backing != base || info.Format != "qcow2" {
			t.Errorf("overlay backing %q format %q, want %q qcow2", info.Backing, info.Format, base)
		}

		// Meanwhile the image is shared read-only: qemu-img without -U,
		// and a read-only imgfuse mount, read it; a writer is refused.
		driverstest.Cmd(t, "qemu-img", "info", base)
		qemuWriteFails(t, "qcow2", base)
		baseRef := driverstest.ConvertRef(t, base, "", t.TempDir())
		rmp, rdisk := mount(t, base, false, "--read-only")
		compareFiles(t, rdisk, baseRef)
		unmount(t, rmp)
		// So does a second overlay, which sees the image, not the first
		// overlay's writes.
		omp, odisk := mount(t, base, false, "--overlay")
		compareFiles(t, odisk, baseRef)
		unmount(t, omp)

		unmount(t, mp)
		frozen.check(t)
		if _, err := os.Stat(ov); !os.IsNotExist(err) {
			t.Errorf("overlay %s still there after unmount: %v", ov, err)
		}
		if _, err := os.Stat(pidfile); !os.IsNotExist(err) {
			t.Errorf("--pidfile %s still there after unmount: %v", pidfile, err)
		}
		requireClean(t, base)
	})

	t.Run("keep", func(t *testing.T) {
		t.Parallel()
		// A raw base: the overlay records format raw.
		base, data := randomRawImage(t, 7)
		data = append(data, make([]byte, 32<<20-len(data))...)
		if err := os.WriteFile(base, data, 0o644); err != nil {
			t.Fatal(err)
		}
		model := filepath.Join(t.TempDir(), "model.raw")
		if err := os.WriteFile(model, data, 0o644); err != nil {
			t.Fatal(err)
		}
		frozen := freeze(t, base)
		kept := filepath.Join(t.TempDir(), "kept.qcow2")
		mp, disk := mount(t, base, false, "--overlay-keep", kept)
		writeThrough(t, disk, model, 2)
		// A second mount may not take the same file.
		if r := imgfuse(t, nil, "mount", "--overlay-keep", kept, base, newMountpoint(t, false)); r.code != 2 ||
			!strings.Contains(r.stderr, "exists") {
			t.Errorf("--overlay-keep onto an existing file: %v, want exit 2 and 'exists'", r)
		}
		unmount(t, mp)
		frozen.check(t)
		qemuCompare(t, kept, model)
		requireClean(t, kept)
		out := string(driverstest.Cmd(t, "qemu-img", "info", kept))
		if !strings.Contains(out, "backing file: "+base) || !strings.Contains(out, "backing file format: raw") {
			t.Errorf("kept overlay does not name its raw base:\n%s", out)
		}
	})

	t.Run("usage", func(t *testing.T) {
		t.Parallel()
		base, _ := smallQcow2(t)
		for _, flags := range [][]string{
			{"--overlay", "--read-only"},
			{"--overlay", "--snapshot", "1"},
			{"--overlay", "-U"},
			{"--overlay-keep", filepath.Join(t.TempDir(), "x.qcow2"), "-r"},
		} {
			r := imgfuse(t, nil, append(append([]string{"mount"}, flags...), base, newMountpoint(t, false))...)
			if r.code != 2 {
				t.Errorf("mount %v: %v, want exit 2", flags, r)
			}
		}
	})

	t.Run("killed", func(t *testing.T) {
		t.Parallel()
		base, _ := overlayBase(t)
		frozen := freeze(t, base)
		mp, _ := mount(t, base, false, "--overlay")
		ov := overlayPath(t, mp)
		pid := daemonPID(t, mp)
		if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
			t.Fatal(err)
		}
		if !waitFor(10*time.Second, func() bool { return !alive(pid) }) {
			t.Fatalf("daemon %d survived SIGKILL", pid)
		}
		if _, err := os.Stat(ov); err != nil {
			t.Fatalf("a killed daemon cannot remove its overlay, yet: %v", err)
		}
		// status names the dead mount and the way out.
		r := imgfuse(t, nil, "status")
		if r.code != 0 || !strings.Contains(r.stdout, "imgfuse unmount "+mp) {
			t.Errorf("status after the daemon died: %v, want a hint 'imgfuse unmount %s'", r, mp)
		}
		r = imgfuse(t, nil, "unmount", mp)
		if r.code != 0 || !strings.Contains(r.stderr, ov) {
			t.Errorf("unmount of the dead overlay mount: %v, want exit 0 and a note naming %s", r, ov)
		}
		if _, err := os.Stat(ov); !os.IsNotExist(err) {
			t.Errorf("overlay %s still there after unmounting the dead mount: %v", ov, err)
		}
		frozen.check(t)
	})

	t.Run("sigterm", func(t *testing.T) {
		t.Parallel()
		base, _ := overlayBase(t)
		mp, disk := mount(t, base, false, "--overlay")
		ov := overlayPath(t, mp)
		model := driverstest.ConvertRef(t, base, "", t.TempDir())
		writeThrough(t, disk, model, 4)
		pid := daemonPID(t, mp)
		if err := syscall.Kill(pid, syscall.SIGTERM); err != nil {
			t.Fatal(err)
		}
		if !waitFor(20*time.Second, func() bool { return !alive(pid) && !mounted(t, mp) }) {
			t.Fatalf("daemon %d still serving %s 20s after SIGTERM", pid, mp)
		}
		if _, err := os.Stat(ov); !os.IsNotExist(err) {
			t.Errorf("overlay %s still there after SIGTERM: %v", ov, err)
		}
	})

	t.Run("refused", func(t *testing.T) {
		t.Parallel()
		// While QEMU writes the image, an overlay over it would read a
		// moving base: the mount is refused for the lock (exit 4) and
		// leaves no overlay behind.
		base, _ := overlayBase(t)
		tmp := t.TempDir()
		defer startQemuWriter(t, base)()
		r := imgfuse(t, []string{"TMPDIR=" + tmp}, "mount", "--overlay", base, newMountpoint(t, false))
		if r.code != 4 || !strings.Contains(r.stderr, base) || strings.Contains(r.stderr, "force-share") {
			t.Errorf("--overlay over an image QEMU writes: %v, want exit 4 naming the image, without suggesting --force-share", r)
		}
		if ents, _ := os.ReadDir(tmp); len(ents) != 0 {
			t.Errorf("the refused mount left %v in $TMPDIR", ents)
		}
	})

	t.Run("fio", func(t *testing.T) {
		if _, err := exec.LookPath("fio"); err != nil {
			driverstest.SkipUnless(t, false, "fio not installed")
		}
		t.Parallel()
		base, _ := overlayBase(t)
		frozen := freeze(t, base)
		mp, disk := mount(t, base, false, "--overlay")
		driverstest.Cmd(t, "fio", "--name=ov", "--filename="+disk, "--rw=randwrite", "--bs=4k",
			"--size=32M", "--io_size=4M", "--direct=1", "--verify=crc32c", "--do_verify=1", "--verify_state_save=0")
		unmount(t, mp)
		frozen.check(t)
	})
}

// TestStatus: `imgfuse status` lists each mount with its image, pid,
// access, passthrough and overlay, as JSON and as a table.
func TestStatus(t *testing.T) {
	requireE2E(t)
	t.Parallel()
	base, _ := smallQcow2(t)
	raw, _ := randomRawImage(t, 3)
	kept := filepath.Join(t.TempDir(), "kept.qcow2")
	ovMP, _ := mount(t, base, false, "--overlay-keep", kept)
	roMP, _ := mount(t, raw, false, "--read-only")

	type entry struct {
		Mountpoint, Image, Format, State string
		PID                              int
		ReadOnly                         bool    `json:"read-only"`
		Passthrough                      *bool   `json:"passthrough"`
		Detail                           string  `json:"passthrough-detail"`
		Overlay                          *string `json:"overlay"`
		OverlayTemporary                 bool    `json:"overlay-temporary"`
		ServingMode                      string  `json:"serving-mode"`
		Hint                             *string `json:"hint"`
	}
	r := imgfuse(t, nil, "status", "--output=json")
	if r.code != 0 {
		t.Fatalf("status: %v", r)
	}
	var list []entry
	if err := json.Unmarshal([]byte(r.stdout), &list); err != nil {
		t.Fatalf("status --output=json: %v\n%s", err, r.stdout)
	}
	byMP := map[string]entry{}
	for _, e := range list {
		byMP[e.Mountpoint] = e
	}
	ov, ok := byMP[ovMP]
	switch {
	case !ok:
		t.Fatalf("status does not list %s:\n%s", ovMP, r.stdout)
	case ov.Image != base || ov.Format != "qcow2" || ov.State != "mounted" || ov.ReadOnly ||
		ov.PID != daemonPID(t, ovMP) || ov.Overlay == nil || *ov.Overlay != kept || ov.OverlayTemporary ||
		ov.Passthrough == nil || *ov.Passthrough || ov.ServingMode == "" || ov.Hint != nil:
		t.Errorf("status of the overlay mount: %+v", ov)
	}
	ro, ok := byMP[roMP]
	switch {
	case !ok:
		t.Fatalf("status does not list %s:\n%s", roMP, r.stdout)
	case ro.Image != raw || ro.Format != "raw" || ro.State != "mounted" || !ro.ReadOnly || ro.Overlay != nil ||
		ro.PID != daemonPID(t, roMP) || ro.Passthrough == nil || *ro.Passthrough != strings.HasPrefix(ro.Detail, "on"):
		t.Errorf("status of the read-only mount: %+v", ro)
	}

	r = imgfuse(t, nil, "status")
	for _, want := range []string{"MOUNTPOINT", ovMP, roMP, kept + " (kept)", " ro ", " rw "} {
		if r.code != 0 || !strings.Contains(r.stdout, want) {
			t.Errorf("status table lacks %q: %v", want, r)
		}
	}
	if r := imgfuse(t, nil, "status", "--output=yaml"); r.code != 2 {
		t.Errorf("status --output=yaml: %v, want exit 2", r)
	}

	unmount(t, ovMP)
	unmount(t, roMP)
	r = imgfuse(t, nil, "status", "--output=json")
	if strings.Contains(r.stdout, ovMP) || strings.Contains(r.stdout, roMP) {
		t.Errorf("status still lists unmounted mounts:\n%s", r.stdout)
	}
}
