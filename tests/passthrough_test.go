package tests

import (
	"bytes"
	"errors"
	"fmt"
	"math/rand"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"imgfuse/drivers/driverstest"
)

// FUSE passthrough: on a raw image the kernel serves read-only opens of the
// disk from the image file itself; opens for writing still go through the
// daemon (fusefs/doc.go says why).

// rawImage writes n seeded random bytes as a raw image and returns its path
// and contents.
func rawImage(t *testing.T, n int, seed int64) (string, []byte) {
	t.Helper()
	data := make([]byte, n)
	rand.New(rand.NewSource(seed)).Read(data)
	img := filepath.Join(t.TempDir(), "img.raw")
	writeModel(t, img, data)
	return img, data
}

// passthroughState returns what the daemon serving mp logged after
// "passthrough: ": "on", or "off: " and why.
func passthroughState(t *testing.T, mp string) string {
	t.Helper()
	log := daemonLog(t, mp)
	for _, line := range strings.Split(log, "\n") {
		if _, s, ok := strings.Cut(line, "passthrough: "); ok {
			return s
		}
	}
	t.Fatalf("the daemon logged no passthrough line:\n%s", log)
	return ""
}

// requirePassthrough fails t unless the mount on mp is in passthrough
// mode. A kernel or a process that cannot do passthrough skips the test
// instead (a failure under IMGFUSE_REQUIRE_E2E).
func requirePassthrough(t *testing.T, mp string) {
	t.Helper()
	s := passthroughState(t, mp)
	if s == "on" {
		return
	}
	driverstest.SkipUnless(t, !strings.Contains(s, "kernel") && !strings.Contains(s, "CAP_SYS_ADMIN"),
		"passthrough unavailable here: %s", s)
	t.Fatalf("passthrough: %s; want on", s)
}

// stoppedRead stops the daemon serving the disk with SIGSTOP and reads from
// a descriptor opened before. It reports whether the read finished within
// wait while the daemon was stopped; either way it resumes the daemon and
// checks the data against want.
func stoppedRead(t *testing.T, pid int, disk string, want []byte, wait time.Duration) bool {
	t.Helper()
	fd, err := unix.Open(disk, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	if err := syscall.Kill(pid, syscall.SIGSTOP); err != nil {
		t.Fatal(err)
	}
	resume := sync.OnceFunc(func() { syscall.Kill(pid, syscall.SIGCONT) })
	defer resume()
	if !waitFor(5*time.Second, func() bool { return procState(pid) == 'T' }) {
		t.Fatalf("daemon %d not stopped 5s after SIGSTOP", pid)
	}
	const off = 1 << 20
	done := make(chan error, 1)
	go func() {
		p := make([]byte, 64<<10)
		n, err := unix.Pread(fd, p, off)
		switch {
		case err != nil:
		case n != len(p) || !bytes.Equal(p, want[off:off+len(p)]):
			err = fmt.Errorf("read %d bytes differing from the image", n)
		}
		done <- err
	}()
	finished := false
	select {
	case err := <-done:
		finished = true
		if err != nil {
			t.Errorf("read with the daemon stopped: %v", err)
		}
	case <-time.After(wait):
	}
	resume()
	if !finished {
		select {
		case err := <-done:
			if err != nil {
				t.Errorf("read after the daemon resumed: %v", err)
			}
		case <-time.After(30 * time.Second):
			t.Fatal("read still blocked 30s after the daemon resumed")
		}
	}
	return finished
}

// procState is the state letter of /proc/PID/stat ('T' when stopped).
func procState(pid int) byte {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0
	}
	i := bytes.LastIndexByte(b, ')')
	if i < 0 || i+2 >= len(b) {
		return 0
	}
	return b[i+2]
}

// TestPassthroughMode: which mounts are passed through, what the daemon
// logs, and the proof that the kernel really reads the image itself: a
// read on a descriptor opened before the daemon is stopped (SIGSTOP)
// completes in passthrough mode and waits for the daemon otherwise.
func TestPassthroughMode(t *testing.T) {
	requireE2E(t)
	t.Parallel()
	for _, c := range []struct {
		name  string
		qcow2 bool
		flags []string
		want  string // the state logged; "off: " alone matches any reason
	}{
		{"raw", false, nil, "on"},
		{"raw read-only", false, []string{"--read-only"}, "on"},
		{"raw growable", false, []string{"--growable"}, "on"},
		{"raw no-passthrough", false, []string{"--no-passthrough"}, "off: --no-passthrough"},
		{"qcow2", true, nil, "off: "},
	} {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			img, data := rawImage(t, 4<<20, 1)
			if c.qcow2 {
				q := filepath.Join(t.TempDir(), "img.qcow2")
				driverstest.Cmd(t, "qemu-img", "convert", "-f", "raw", "-O", "qcow2", img, q)
				img = q
			}
			mp, disk := mount(t, img, false, c.flags...)
			if c.want == "on" {
				requirePassthrough(t, mp)
			}
			got := passthroughState(t, mp)
			if got != c.want && (c.want != "off: " || !strings.Contains(got, "raw")) {
				t.Fatalf("daemon logged passthrough: %s; want %s", got, c.want)
			}
			if c.qcow2 {
				return
			}
			pid := daemonPID(t, mp)
			if c.want == "on" {
				if !stoppedRead(t, pid, disk, data, 10*time.Second) {
					t.Error("passthrough on, yet a read waited for the stopped daemon")
				}
			} else if stoppedRead(t, pid, disk, data, 500*time.Millisecond) {
				t.Error("passthrough off, yet a read completed while the daemon was stopped")
			}
		})
	}
}

// TestPassthroughWorkload runs the seeded write workload (buffered and
// O_DIRECT writes, punched holes, zeroed ranges, fsyncs, reads, through
// descriptors open for writing: the daemon's path), plus writes through a
// shared writable mapping (passed through to the image file), and after
// every step compares the disk as seen through passthrough descriptors –
// a shared mapping of all of it, buffered and O_DIRECT reads of a random
// range, every 20 steps a buffered read of all of it – with the model.
// At the end the image must equal the model.
func TestPassthroughWorkload(t *testing.T) {
	requireE2E(t)
	t.Parallel()
	const size = 16 << 20
	seed := writeSeed(t)
	img, model := rawImage(t, size, seed)
	mp, disk := mount(t, img, false)
	requirePassthrough(t, mp)

	w := newWorkload(t, disk, model, seed)
	ro, err := os.Open(disk)
	if err != nil {
		t.Fatal(err)
	}
	defer ro.Close()
	rod, err := os.OpenFile(disk, os.O_RDONLY|syscall.O_DIRECT, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer rod.Close()
	m, err := unix.Mmap(int(ro.Fd()), 0, size, unix.PROT_READ, unix.MAP_SHARED)
	if err != nil {
		t.Fatalf("mmap of a read-only descriptor: %v", err)
	}
	defer unix.Munmap(m)
	mw, err := unix.Mmap(int(w.f.Fd()), 0, size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		t.Fatalf("shared writable mmap: %v", err)
	}
	defer unix.Munmap(mw)

	buf := make([]byte, size)
	dbuf := driverstest.AlignedBuffer(1<<20, 4096)
	mmapWrites := 0
	for i := range 100 {
		if w.rng.Intn(8) == 0 {
			n := w.size(256 << 10)
			off := w.offset(n)
			w.rng.Read(mw[off : off+n])
			copy(w.model[off:], mw[off:off+n])
			mmapWrites++
		} else {
			w.step(i)
		}
		if t.Failed() {
			return
		}
		// The whole disk through a buffered descriptor now and then (it
		// is slow on a loaded machine), a random range every time.
		off, n := int64(0), int64(size)
		if i%20 != 19 {
			n = w.size(1 << 20)
			off = w.rng.Int63n(size - n + 1)
		}
		if got, err := unix.Pread(int(ro.Fd()), buf[:n], off); int64(got) != n || err != nil {
			t.Fatalf("op %d: passthrough read(%d, %d): %d, %v", i, off, n, got, err)
		}
		if d := firstDiff(buf[:n], w.model[off:off+n]); d >= 0 {
			t.Fatalf("op %d: a passthrough read differs from the model at %d: got %#x, want %#x", i, off+int64(d), buf[d], w.model[off+int64(d)])
		}
		if d := firstDiff(m, w.model); d >= 0 {
			t.Fatalf("op %d: a shared mapping differs from the model at %d: got %#x, want %#x", i, d, m[d], w.model[d])
		}
		off = w.rng.Int63n(int64(size/len(dbuf))) * int64(len(dbuf))
		if n, err := rod.ReadAt(dbuf, off); n != len(dbuf) || err != nil {
			t.Fatalf("op %d: O_DIRECT passthrough read at %d: %d, %v", i, off, n, err)
		}
		if d := firstDiff(dbuf, w.model[off:off+int64(len(dbuf))]); d >= 0 {
			t.Fatalf("op %d: an O_DIRECT passthrough read differs from the model at %d", i, off+int64(d))
		}
	}
	t.Logf("ops: %v, mmap writes: %d", w.counts, mmapWrites)
	if err := w.f.Sync(); err != nil {
		t.Fatalf("fsync: %v", err)
	}
	unix.Munmap(mw)
	unix.Munmap(m)
	ro.Close()
	rod.Close()
	w.f.Close()
	w.direct.Close()
	unmountBusyRetry(t, mp)
	modelPath := filepath.Join(t.TempDir(), "model.raw")
	writeModel(t, modelPath, w.model)
	compareFiles(t, img, modelPath)
	if code, out := exitCode(t, "qemu-img", "compare", "-f", "raw", "-F", "raw", img, modelPath); code != 0 {
		t.Errorf("qemu-img compare: exit %d\n%s", code, out)
	}
}

// cachestat returns the image file's page-cache state.
func cachestat(t *testing.T, path string) unix.Cachestat_t {
	t.Helper()
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	var cs unix.Cachestat_t
	if err := unix.Cachestat(uint(fd), &unix.CachestatRange{}, &cs, 0); err != nil {
		driverstest.SkipUnless(t, !errors.Is(err, unix.ENOSYS), "cachestat(2): %v", err)
		t.Fatalf("cachestat: %v", err)
	}
	return cs
}

// TestPassthroughFsync: a write through a shared mapping of the disk
// dirties the image file's own pages (passthrough maps the image file);
// fsync and fdatasync on the disk must write them back: afterwards the
// image file has no dirty pages and none under writeback.
func TestPassthroughFsync(t *testing.T) {
	requireE2E(t)
	t.Parallel()
	img, _ := rawImage(t, 4<<20, 2)
	mp, disk := mount(t, img, false)
	requirePassthrough(t, mp)
	f, err := os.OpenFile(disk, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	m, err := unix.Mmap(int(f.Fd()), 0, 1<<20, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Munmap(m)
	// tmpfs keeps no dirty state to write back (and cachestat reports
	// none): there only the success of the calls can be checked.
	var sfs unix.Statfs_t
	if err := unix.Statfs(img, &sfs); err != nil {
		t.Fatal(err)
	}
	tmpfs := sfs.Type == unix.TMPFS_MAGIC
	if tmpfs {
		t.Logf("%s is on tmpfs: checking only that fsync and fdatasync succeed", img)
	}
	for _, c := range []struct {
		name string
		sync func() error
	}{
		{"fsync", f.Sync},
		{"fdatasync", func() error { return unix.Fdatasync(int(f.Fd())) }},
	} {
		// Positive control: the mapping's writes are dirty in the image
		// file's cache. Background writeback may clean them first on a
		// busy machine: dirty them again a few times.
		dirty := false
		for try := 0; try < 5 && !dirty; try++ {
			for i := 0; i < len(m); i += 4096 {
				m[i]++
			}
			dirty = tmpfs || cachestat(t, img).Dirty > 0
		}
		if !dirty {
			t.Fatalf("%s: a write through the mapping left no dirty page in the image file's cache", c.name)
		}
		if err := c.sync(); err != nil {
			t.Fatalf("%s: %v", c.name, err)
		}
		if tmpfs {
			continue
		}
		if cs := cachestat(t, img); cs.Dirty != 0 || cs.Writeback != 0 {
			t.Errorf("%s returned with %d dirty and %d writeback pages of the image file", c.name, cs.Dirty, cs.Writeback)
		}
	}
}

// TestPassthroughGrow: growth through the daemon shows through
// passthrough descriptors opened before it; shrinking is refused; without
// --growable a write crossing the end writes what fits and one past it
// fails with ENOSPC, leaving the image file's size alone; with --growable
// a write past the end grows the disk.
func TestPassthroughGrow(t *testing.T) {
	requireE2E(t)
	t.Parallel()
	const size = 4<<20 + 512
	for _, growable := range []bool{false, true} {
		t.Run(map[bool]string{false: "fixed", true: "growable"}[growable], func(t *testing.T) {
			t.Parallel()
			img, data := rawImage(t, size, 3)
			var flags []string
			if growable {
				flags = append(flags, "--growable")
			}
			mp, disk := mount(t, img, false, flags...)
			requirePassthrough(t, mp)
			ro, err := os.Open(disk)
			if err != nil {
				t.Fatal(err)
			}
			defer ro.Close()
			rw, err := os.OpenFile(disk, os.O_RDWR, 0)
			if err != nil {
				t.Fatal(err)
			}
			defer rw.Close()
			sizes := func(want int64, what string) {
				t.Helper()
				for _, p := range []string{disk, img} {
					if fi, err := os.Stat(p); err != nil || fi.Size() != want {
						t.Errorf("%s: %s: %v, %v; want %d bytes", what, p, fi, err, want)
					}
				}
				if fi, err := ro.Stat(); err != nil || fi.Size() != want {
					t.Errorf("%s: fstat of an older descriptor: %v, %v; want %d", what, fi, err, want)
				}
			}
			cur := int64(size)
			if !growable {
				if n, err := unix.Pwrite(int(rw.Fd()), make([]byte, 1024), cur-512); n != 512 || err != nil {
					t.Errorf("write crossing the end: %d, %v; want 512", n, err)
				}
				if _, err := unix.Pwrite(int(rw.Fd()), []byte("x"), cur); !errors.Is(err, syscall.ENOSPC) {
					t.Errorf("write past the end: %v, want ENOSPC", err)
				}
				clear(data[cur-512:])
				sizes(cur, "after writes at the end")
			} else {
				p := bytes.Repeat([]byte("g"), 5000)
				if n, err := unix.Pwrite(int(rw.Fd()), p, cur+100); n != len(p) || err != nil {
					t.Fatalf("write past the end: %d, %v", n, err)
				}
				data = append(data, make([]byte, 100)...)
				data = append(data, p...)
				cur = int64(len(data))
				sizes(cur, "after a growing write")
			}
			if err := os.Truncate(disk, cur+1<<20); err != nil {
				t.Fatalf("truncate to grow: %v", err)
			}
			data = append(data, make([]byte, 1<<20)...)
			cur += 1 << 20
			sizes(cur, "after truncate")
			if err := os.Truncate(disk, 4096); !errors.Is(err, syscall.EOPNOTSUPP) {
				t.Errorf("shrinking the disk: %v, want EOPNOTSUPP (README)", err)
			}
			sizes(cur, "after a refused shrink")
			got := make([]byte, cur)
			if n, err := ro.ReadAt(got, 0); int64(n) != cur || err != nil || !bytes.Equal(got, data) {
				t.Errorf("passthrough read of the grown disk: %d, %v; equal %v", n, err, bytes.Equal(got[:n], data[:n]))
			}
		})
	}
}

// TestPassthroughReadOnly: a read-only mount is passed through, refuses
// every open for writing with EROFS, serves cmp and dd (buffered 4k and
// O_DIRECT) the image's bytes, and never writes a byte of the image: its
// contents, mtime and ctime are unchanged after the mount is gone.
func TestPassthroughReadOnly(t *testing.T) {
	requireE2E(t, "cmp", "dd")
	t.Parallel()
	img, data := rawImage(t, 8<<20+512, 4)
	var before syscall.Stat_t
	if err := syscall.Stat(img, &before); err != nil {
		t.Fatal(err)
	}
	mp, disk := mount(t, img, false, "--read-only")
	requirePassthrough(t, mp)
	for _, flag := range []int{os.O_RDWR, os.O_WRONLY, os.O_RDWR | os.O_TRUNC} {
		f, err := os.OpenFile(disk, flag, 0)
		if err == nil {
			f.Close()
		}
		if !errors.Is(err, syscall.EROFS) {
			t.Errorf("open(%#x) = %v, want EROFS", flag, err)
		}
	}
	if err := os.Truncate(disk, 1<<20); !errors.Is(err, syscall.EROFS) {
		t.Errorf("truncate: %v, want EROFS", err)
	}
	driverstest.Cmd(t, "cmp", disk, img)
	out := filepath.Join(t.TempDir(), "out")
	for _, args := range [][]string{{"bs=4k"}, {"bs=64k", "iflag=direct"}} {
		driverstest.Cmd(t, "dd", append([]string{"if=" + disk, "of=" + out, "status=none"}, args...)...)
		compareFiles(t, out, img)
	}
	f, err := os.Open(disk)
	if err != nil {
		t.Fatal(err)
	}
	m, err := unix.Mmap(int(f.Fd()), 0, 4096, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE)
	if err != nil {
		t.Fatal(err)
	}
	copy(m, "private scribble")
	unix.Munmap(m)
	f.Close()
	unmount(t, mp)
	var after syscall.Stat_t
	if err := syscall.Stat(img, &after); err != nil {
		t.Fatal(err)
	}
	if after.Mtim != before.Mtim || after.Ctim != before.Ctim || after.Size != before.Size {
		t.Errorf("the image's stat changed on a read-only mount: mtime %v→%v ctime %v→%v size %d→%d",
			before.Mtim, after.Mtim, before.Ctim, after.Ctim, before.Size, after.Size)
	}
	if b, err := os.ReadFile(img); err != nil || !bytes.Equal(b, data) {
		t.Errorf("the image's contents changed on a read-only mount (%v)", err)
	}
}

// TestPassthroughLoop: an ext4 filesystem made and written through a
// direct-I/O loop device on the writable disk, then mounted through a
// read-only buffered loop device (passed through), reads back what was
// written; e2fsck (reading through passthrough) finds it clean.
func TestPassthroughLoop(t *testing.T) {
	requireE2E(t, "mkfs.ext4", "e2fsck", "losetup", "mount", "umount")
	_, err := os.Stat("/dev/loop-control")
	driverstest.SkipUnless(t, err == nil, "/dev/loop-control: %v", err)
	t.Parallel()
	img := filepath.Join(t.TempDir(), "fs.raw")
	if err := os.WriteFile(img, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(img, 64<<20); err != nil {
		t.Fatal(err)
	}
	mp, disk := mount(t, img, false)
	requirePassthrough(t, mp)
	files := map[string][]byte{}
	rng := rand.New(rand.NewSource(5))
	for i := range 3 {
		p := make([]byte, 1<<20+rng.Intn(1<<20))
		rng.Read(p)
		files[fmt.Sprintf("f%d", i)] = p
	}
	loopMP := filepath.Join(t.TempDir(), "fs")
	if err := os.Mkdir(loopMP, 0o755); err != nil {
		t.Fatal(err)
	}
	for _, mode := range []struct {
		name    string
		losetup []string
		write   bool
	}{
		{"direct-io=on, read-write", []string{"--direct-io=on"}, true},
		{"buffered, read-only", []string{"-r"}, false},
	} {
		loop := strings.TrimSpace(string(driverstest.Cmd(t, "losetup", append(append([]string{"--show", "-f"}, mode.losetup...), disk)...)))
		detach := sync.OnceFunc(func() {
			if out, err := exec.Command("losetup", "-d", loop).CombinedOutput(); err != nil {
				t.Errorf("losetup -d %s: %v\n%s", loop, err, out)
			}
		})
		t.Cleanup(detach)
		opts := "ro"
		if mode.write {
			opts = "rw"
			driverstest.Cmd(t, "mkfs.ext4", "-q", "-b", "4096", loop)
		}
		driverstest.Cmd(t, "mount", "-t", "ext4", "-o", opts, loop, loopMP)
		umount := sync.OnceFunc(func() {
			if out, err := exec.Command("umount", loopMP).CombinedOutput(); err != nil {
				t.Errorf("umount %s: %v\n%s", loopMP, err, out)
				exec.Command("umount", "-l", loopMP).Run()
			}
		})
		t.Cleanup(umount)
		for name, want := range files {
			p := filepath.Join(loopMP, name)
			if mode.write {
				if err := os.WriteFile(p, want, 0o644); err != nil {
					t.Fatalf("%s: %v", mode.name, err)
				}
			} else if got, err := os.ReadFile(p); err != nil || !bytes.Equal(got, want) {
				t.Errorf("%s: %s reads back wrong (%d bytes, %v)", mode.name, name, len(got), err)
			}
		}
		umount()
		detach()
	}
	waitLoopDetached(t, disk)
	if code, out := exitCode(t, "e2fsck", "-fn", disk); code != 0 {
		t.Errorf("e2fsck -fn through the mount: exit %d\n%s", code, out)
	}
}

// TestPassthroughFlatVMDK: a read-only monolithicFlat VMDK is its -flat
// file byte for byte, so the kernel reads that file itself, as for a raw
// image; a sparse VMDK, and a writable flat one (whose first write must
// give the image a new CID), are served by the daemon.
func TestPassthroughFlatVMDK(t *testing.T) {
	requireE2E(t, "cmp")
	t.Parallel()
	dir := t.TempDir()
	flat := blockImage{"flat.vmdk", "vmdk", []string{"-o", "subformat=monolithicFlat"}, "9M", vmdkFill, false, nil}
	img, ref := flat.build(t, dir)
	want := filepath.Join(dir, "want.raw")
	writeModel(t, want, ref)

	mp, disk := mount(t, img, false, "--read-only")
	requirePassthrough(t, mp)
	driverstest.Cmd(t, "cmp", disk, want)
	if !stoppedRead(t, daemonPID(t, mp), disk, ref, 10*time.Second) {
		t.Error("a read with the daemon stopped waited for it: not passed through")
	}
	unmount(t, mp)

	mp, disk = mount(t, img, false)
	if s := passthroughState(t, mp); s == "on" {
		t.Errorf("writable flat VMDK: passthrough %s, want off", s)
	}
	driverstest.Cmd(t, "cmp", disk, want)
	unmount(t, mp)

	sparse := blockImage{"sparse.vmdk", "vmdk", nil, "9M", vmdkFill, false, nil}
	img, _ = sparse.build(t, dir)
	mp, _ = mount(t, img, false, "--read-only")
	if s := passthroughState(t, mp); s == "on" {
		t.Errorf("sparse VMDK: passthrough %s, want off", s)
	}
	unmount(t, mp)
}
