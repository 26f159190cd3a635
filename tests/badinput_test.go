package tests

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"imgfuse/drivers/driverstest"
)

// TestBadInput: damaged images either fail to mount, with a clear message,
// a non-zero exit and no mount left behind, or mount and fail reads of the
// damaged range with EIO. Never a panic, never wrong data.
func TestBadInput(t *testing.T) {
	t.Parallel()
	requireE2E(t)
	for _, c := range driverstest.Damaged() {
		t.Run(c.Name, func(t *testing.T) {
			t.Parallel()
			img := driverstest.BuildDamaged(t, c)
			mp := newMountpoint(t, false)
			args := []string{"mount"}
			if c.Format != "" {
				args = append(args, "--format", c.Format)
			}
			r := imgfuse(t, nil, append(args, img, mp)...)
			if r.code != 0 {
				if mounted(t, mp) {
					t.Fatalf("mount failed (%v) but left a mount behind", r)
				}
				if !c.Msg.MatchString(r.stderr) {
					t.Errorf("stderr does not explain the failure (want %v):\n%s", c.Msg, r.stderr)
				}
				t.Logf("mount refused: %s", r.stderr)
				return
			}
			if c.MustFail {
				unmount(t, mp)
				t.Fatalf("mount of a damaged image succeeded, want a failure: %v", r)
			}
			defer guard(t, mp)()
			// Mounted: reads of the damaged range must fail with EIO.
			errno, b := readErrno(t, filepath.Join(mp, "disk"), c.ReadOff, 64<<10)
			if errno != syscall.EIO {
				head := b[:min(len(b), 16)]
				t.Errorf("read of the damaged range [%d, +64k): errno %d (%v), read %d bytes starting % x; want EIO (the image holds 0x5c there, so anything else is wrong data)",
					c.ReadOff, int(errno), errno, len(b), head)
			}
			// 12 MiB holds 0x5d: a read there fails or returns that.
			if errno, b := readErrno(t, filepath.Join(mp, "disk"), 12<<20, 4096); errno == 0 && b[0] != 0x5d {
				t.Errorf("read at 12 MiB returned %#x, want 0x5d or an error", b[0])
			}
			unmount(t, mp)
		})
	}
}

// TestMountErrors: bad command lines and missing files fail with a message,
// a non-zero exit, and no mount.
func TestMountErrors(t *testing.T) {
	requireE2E(t)
	t.Parallel()
	img, _ := smallQcow2(t)
	dir := t.TempDir()
	mp := newMountpoint(t, false)
	cases := []struct {
		name string
		args []string
	}{
		{"missing image", []string{"mount", filepath.Join(dir, "nope.qcow2"), mp}},
		{"missing mountpoint", []string{"mount", img, filepath.Join(dir, "nope")}},
		{"unknown format", []string{"mount", "--format", "qed", img, mp}},
		{"format qcow2 on a non-qcow2 file", []string{"mount", "--format", "qcow2", "/dev/null", mp}},
		{"missing snapshot", []string{"mount", "--snapshot", "nope", img, mp}},
		{"no arguments", []string{"mount"}},
		{"unmount of a directory that is not mounted", []string{"unmount", mp}},
		{"info of a missing file", []string{"info", filepath.Join(dir, "nope.qcow2")}},
		{"unknown command", []string{"frobnicate"}},
	}
	for _, c := range cases {
		r := imgfuse(t, nil, c.args...)
		if r.code == 0 {
			t.Errorf("%s: exit 0, want non-zero", c.name)
			if mounted(t, mp) {
				unmount(t, mp)
			}
			continue
		}
		if r.stderr == "" {
			t.Errorf("%s: no message on stderr", c.name)
		}
		if mounted(t, mp) {
			forceUnmount(t, mp)
			t.Errorf("%s: a failed mount left a mount behind", c.name)
		}
	}
}

// TestDoubleMount: mounting over a live mount fails and leaves the first
// one serving.
func TestDoubleMount(t *testing.T) {
	requireE2E(t)
	t.Parallel()
	img, ref := smallQcow2(t)
	mp, disk := mount(t, img, false)
	if r := imgfuse(t, nil, "mount", img, mp); r.code == 0 {
		t.Errorf("a second mount on %s succeeded", mp)
	} else if r.stderr == "" {
		t.Errorf("a second mount failed without a message")
	}
	compareFiles(t, disk, ref)
}

// TestLUKSAsRaw: a LUKS container is refused unless --format raw is
// named; then its bytes are the disk, as asked.
func TestLUKSAsRaw(t *testing.T) {
	requireE2E(t)
	t.Parallel()
	img := filepath.Join(t.TempDir(), "disk.luks")
	data := append([]byte("LUKS\xba\xbe\x00\x02"), bytes.Repeat([]byte{0x5c}, 1<<20-8)...)
	if err := os.WriteFile(img, data, 0o644); err != nil {
		t.Fatal(err)
	}
	if r := imgfuse(t, nil, "map", img); r.code != 5 || !strings.Contains(r.stderr, "is a LUKS-encrypted image: not supported") {
		t.Errorf("map of a LUKS container: want exit 5\n%v", r)
	}
	_, disk := mount(t, img, false, "--format", "raw", "--read-only")
	got, err := os.ReadFile(disk)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, data) {
		t.Error("the disk of a LUKS container mounted --format raw differs from the file")
	}
}
