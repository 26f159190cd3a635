package tests

import (
	"bytes"
	"errors"
	"math/rand"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"imgfuse/drivers/driverstest"
)

// smallFS mounts a filesystem of a few MiB at a new directory and returns
// it: "tmpfs" (size=8m; imgfuse serves it with pread/pwrite) or "ext4" (a
// 12 MiB loop-mounted image; O_DIRECT and Linux AIO). Unmounted at cleanup.
func smallFS(t *testing.T, kind string) string {
	t.Helper()
	dir := filepath.Join(t.TempDir(), "fs")
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	switch kind {
	case "tmpfs":
		driverstest.Cmd(t, "mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", dir)
	case "ext4":
		fsimg := filepath.Join(t.TempDir(), "fs.ext4")
		driverstest.Cmd(t, "truncate", "-s", "12M", fsimg)
		driverstest.Cmd(t, "mkfs.ext4", "-q", "-F", fsimg)
		driverstest.Cmd(t, "mount", "-o", "loop", fsimg, dir)
	}
	t.Cleanup(func() {
		for range 50 {
			if exec.Command("umount", dir).Run() == nil {
				return
			}
			time.Sleep(100 * time.Millisecond)
		}
		t.Errorf("umount %s failed", dir)
		exec.Command("umount", "-l", dir).Run()
	})
	return dir
}

// TestENOSPC fills a small filesystem under the image through the mount:
// 256 KiB writes each followed by fsync, until one fails. The failure must
// be ENOSPC (not success, not a hang, not EIO); after the unmount
// qemu-img check finds no corruption, and every write fsynced before the
// failure reads back through a new mount.
func TestENOSPC(t *testing.T) {
	t.Parallel()
	requireE2E(t, "mkfs.ext4")
	for _, fs := range []string{"tmpfs", "ext4"} {
		for _, format := range []string{"qcow2", "raw"} {
			t.Run(fs+"-"+format, func(t *testing.T) {
				t.Parallel()
				dir := smallFS(t, fs)
				img := filepath.Join(dir, "img."+format)
				driverstest.Cmd(t, "qemu-img", "create", "-q", "-f", format, img, fmtSize(writeSize))
				mp, disk := mount(t, img, false)
				f, err := os.OpenFile(disk, os.O_RDWR, 0)
				if err != nil {
					t.Fatal(err)
				}
				rng := rand.New(rand.NewSource(writeSeed(t)))
				const chunk = 256 << 10
				var synced [][]byte
				var failure error
				done := make(chan struct{})
				go func() {
					defer close(done)
					for off := int64(0); off < writeSize; off += chunk {
						p := make([]byte, chunk)
						rng.Read(p)
						if _, err := f.WriteAt(p, off); err != nil {
							failure = err
							return
						}
						if err := f.Sync(); err != nil {
							failure = err
							return
						}
						synced = append(synced, p)
					}
				}()
				select {
				case <-done:
				case <-time.After(60 * time.Second):
					t.Fatal("writes did not fail or finish in 60 s")
				}
				f.Close()
				switch {
				case failure == nil:
					t.Fatalf("wrote %d MiB onto a filesystem of a few MiB without an error", writeSize>>20)
				case !errors.Is(failure, syscall.ENOSPC):
					t.Errorf("the write that filled the filesystem failed with %v, want ENOSPC", failure)
				}
				t.Logf("%d MiB fsynced, then: %v", len(synced)*chunk>>20, failure)
				if len(synced) == 0 {
					t.Error("nothing could be written before the filesystem filled")
				}
				// The final flush may fail too (the filesystem is full);
				// the mount must go away either way.
				r := imgfuse(t, nil, "unmount", mp)
				if mounted(t, mp) {
					t.Fatalf("still mounted after imgfuse unmount: %v", r)
				}
				if r.code != 0 {
					t.Logf("unmount on a full filesystem: %v", r)
				}
				if format == "qcow2" {
					if code, out := qemuCheck(t, img); code != 0 {
						t.Fatalf("qemu-img check after ENOSPC: exit %d\n%s", code, out)
					}
				}
				mp, disk = mount(t, img, false, "--read-only")
				for i, want := range synced {
					errno, got := readErrno(t, disk, int64(i)*chunk, chunk)
					if errno != 0 || !bytes.Equal(got, want) {
						t.Fatalf("fsynced chunk %d (at %d) does not read back (errno %v)", i, int64(i)*chunk, errno)
					}
				}
				unmount(t, mp)
			})
		}
	}
}

// TestEIOUnderImage: an image whose own file returns EIO for one range
// (it lives on a FUSE mount of a damaged qcow2 image, whose L2 entry for
// that cluster points past the end of its file) fails reads of that range
// with EIO, and only that range, while the daemon keeps serving: as a raw
// image, and as the raw backing file of a qcow2 overlay.
// (device-mapper's error target would be the obvious tool; containers
// rarely have it.)
func TestEIOUnderImage(t *testing.T) {
	requireE2E(t)
	t.Parallel()
	dir := t.TempDir()
	lower := filepath.Join(dir, "lower.qcow2")
	driverstest.Cmd(t, "qemu-img", "create", "-q", "-f", "qcow2", lower, "4M")
	driverstest.QemuIO(t, lower, "write -P 0x33 0 4M")
	b, err := os.ReadFile(lower)
	if err != nil {
		t.Fatal(err)
	}
	// Break the L2 entry of the cluster at 1 MiB (index 16).
	l1 := int64(be64(b[40:]))
	l2 := int64(be64(b[l1:]) & 0x00fffffffffffe00)
	copy(b[l2+16*8:], []byte{0x80, 0, 0, 1, 0, 0, 0, 0}) // COPIED | 1 TiB
	if err := os.WriteFile(lower, b, 0o644); err != nil {
		t.Fatal(err)
	}
	_, failing := mount(t, lower, false, "--read-only")
	badOff, badLen := int64(1<<20), int64(64<<10)
	if errno, _ := readErrno(t, failing, badOff, badLen); errno != syscall.EIO {
		t.Fatalf("the lower mount reads the broken cluster with errno %v, want EIO", errno)
	}
	overlay := filepath.Join(dir, "overlay.qcow2")
	driverstest.Cmd(t, "qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", failing, "-F", "raw", overlay, "4M")

	for _, c := range []struct{ name, img string }{{"raw", failing}, {"overlay", overlay}} {
		t.Run(c.name, func(t *testing.T) {
			flags := []string{"--read-only"}
			if c.name == "raw" {
				flags = append(flags, "--format", "raw")
			}
			mp, disk := mount(t, c.img, false, flags...)
			pid := daemonPID(t, mp)
			for round := range 3 {
				for off := int64(0); off < 4<<20; off += 64 << 10 {
					errno, got := readErrno(t, disk, off, 64<<10)
					switch {
					case off == badOff && errno != syscall.EIO:
						t.Errorf("round %d: read of the failing range: errno %v, want EIO", round, errno)
					case off != badOff && errno != 0:
						t.Errorf("round %d: read at %d: %v (only [%d, +%d) fails below)", round, off, errno, badOff, badLen)
					case off != badOff && !bytes.Equal(got, bytes.Repeat([]byte{0x33}, 64<<10)):
						t.Errorf("round %d: wrong bytes at %d", round, off)
					}
				}
			}
			if !alive(pid) {
				t.Fatal("the daemon died")
			}
			if r := imgfuse(t, nil, "unmount", mp); r.code != 0 || strings.Contains(r.stderr, "panic") {
				t.Errorf("unmount: %v", r)
			}
		})
	}
}

func be64(b []byte) uint64 {
	var v uint64
	for _, c := range b[:8] {
		v = v<<8 | uint64(c)
	}
	return v
}
