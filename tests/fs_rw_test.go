package tests

import (
	"fmt"
	"math/rand"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"imgfuse/drivers/driverstest"
)

// TestExt4Qcow2 is the user story on a fresh qcow2 image: mkfs.ext4
// on the exposed disk, loop-mount it read-write, copy a tree in, delete
// some of it and fstrim (discards through the loop device free clusters),
// unmount everything; qemu-img check is clean; after a remount every file
// has the source's content.
func TestExt4Qcow2(t *testing.T) {
	t.Parallel()
	requireE2E(t, "mkfs.ext4", "e2fsck", "fstrim", "mount", "umount")
	_, err := os.Stat("/dev/loop-control")
	driverstest.SkipUnless(t, err == nil, "/dev/loop-control: %v", err)
	for _, opts := range []string{"", "cluster_size=4096,lazy_refcounts=on"} {
		name := opts
		if name == "" {
			name = "default"
		}
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			dir := t.TempDir()
			src := filepath.Join(dir, "src")
			buildTree(t, src)
			want := treeSummary(t, src)
			img := filepath.Join(dir, "img.qcow2")
			args := []string{"create", "-q", "-f", "qcow2"}
			if opts != "" {
				args = append(args, "-o", opts)
			}
			driverstest.Cmd(t, "qemu-img", append(args, img, "64M")...)

			mp, disk := mount(t, img, false)
			driverstest.Cmd(t, "mkfs.ext4", "-q", "-F", "-b", "4096", disk)
			loopMP := filepath.Join(dir, "fs")
			if err := os.Mkdir(loopMP, 0o755); err != nil {
				t.Fatal(err)
			}
			loopMounted := false
			t.Cleanup(func() {
				if loopMounted {
					exec.Command("umount", "-l", loopMP).Run()
				}
			})
			loopMount := func(opts string) {
				t.Helper()
				if out, err := exec.Command("mount", "-t", "ext4", "-o", opts, disk, loopMP).CombinedOutput(); err != nil {
					t.Fatalf("mount -o %s: %v\n%s", opts, err, out)
				}
				loopMounted = true
			}
			loopUmount := func() {
				t.Helper()
				if out, err := exec.Command("umount", loopMP).CombinedOutput(); err != nil {
					t.Fatalf("umount %s: %v\n%s", loopMP, err, out)
				}
				loopMounted = false
				waitLoopDetached(t, disk)
			}
			loopMount("loop")
			if mountOptions(t, loopMP)["ro"] {
				t.Fatal("the loop mount of a writable qcow2 disk came up read-only")
			}
			driverstest.Cmd(t, "cp", "-a", src+"/.", loopMP)
			// Scratch files, written to the disk and then deleted, so
			// fstrim has allocated clusters to discard.
			rng := rand.New(rand.NewSource(13))
			for i := 0; i < 8; i++ {
				b := make([]byte, 1<<20+rng.Intn(100000))
				rng.Read(b)
				if err := os.WriteFile(filepath.Join(loopMP, fmt.Sprintf("scratch%d", i)), b, 0o644); err != nil {
					t.Fatal(err)
				}
			}
			driverstest.Cmd(t, "sync", "-f", loopMP)
			before := mappedBytes(t, img)
			for i := 0; i < 8; i++ {
				if err := os.Remove(filepath.Join(loopMP, fmt.Sprintf("scratch%d", i))); err != nil {
					t.Fatal(err)
				}
			}
			// Commit the deletions, so the blocks are free when
			// fstrim looks.
			driverstest.Cmd(t, "sync", "-f", loopMP)
			out := driverstest.Cmd(t, "fstrim", "-v", loopMP)
			t.Logf("fstrim: %s", strings.TrimSpace(string(out)))
			driverstest.Cmd(t, "sync", "-f", loopMP)
			// The discards freed the deleted scratch files' clusters
			// (8 files of more than 1 MiB each).
			after := mappedBytes(t, img)
			t.Logf("the image maps %d bytes before deleting and trimming, %d after", before, after)
			if before-after < 7<<20 {
				t.Errorf("fstrim freed only %d bytes of the image; the deleted files held over 8 MiB", before-after)
			}
			compareTrees(t, treeSummary(t, loopMP), want)
			loopUmount()
			unmountBusyRetry(t, mp)
			if code, out := qemuCheck(t, img); code != 0 {
				t.Fatalf("qemu-img check after the ext4 session: exit %d\n%s", code, out)
			}

			mp, disk = mount(t, img, false)
			driverstest.Cmd(t, "e2fsck", "-fn", disk)
			loopMount("loop,ro")
			compareTrees(t, treeSummary(t, loopMP), want)
			loopUmount()
			unmountBusyRetry(t, mp)
			requireClean(t, img)
		})
	}
}
