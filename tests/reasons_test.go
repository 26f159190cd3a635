package tests

import (
	"bufio"
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"imgfuse/drivers/driverstest"
)

// sha256File returns the SHA-256 of the file at path.
func sha256File(t *testing.T, path string) [32]byte {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return sha256.Sum256(b)
}

// truncatedImage makes a qcow2 image of four L2 tables (4 KiB clusters:
// one table maps 2 MiB), each range holding 64 KiB of its own pattern,
// and cuts the file at its last L2 table, as a failed copy would. It
// returns the image, the L1 index whose table is gone and that table's
// offset.
func truncatedImage(t *testing.T, dir string) (img string, badIndex int, badL2 int64) {
	t.Helper()
	img = filepath.Join(dir, "cut.qcow2")
	driverstest.Cmd(t, "qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4096", img, "8M")
	driverstest.QemuIO(t, img, "write -P 0x11 0 64k", "write -P 0x22 2M 64k", "write -P 0x33 4M 64k", "write -P 0x44 6M 64k")
	b, err := os.ReadFile(img)
	if err != nil {
		t.Fatal(err)
	}
	l1 := int64(binary.BigEndian.Uint64(b[40:]))
	for i := range 4 {
		if off := int64(binary.BigEndian.Uint64(b[l1+int64(i)*8:]) & 0x00fffffffffffe00); off > badL2 {
			badIndex, badL2 = i, off
		}
	}
	if badL2 <= l1 {
		t.Fatalf("no L2 table after the L1 table at %#x", l1)
	}
	if err := os.Truncate(img, badL2); err != nil {
		t.Fatal(err)
	}
	return img, badIndex, badL2
}

// statusOf returns the `imgfuse status --output=json` entry of mp.
func statusOf(t *testing.T, mp string) map[string]any {
	t.Helper()
	r := imgfuse(t, nil, "status", "--output=json")
	if r.code != 0 {
		t.Fatalf("imgfuse status --output=json: %v", r)
	}
	var entries []map[string]any
	if err := json.Unmarshal([]byte(r.stdout), &entries); err != nil {
		t.Fatalf("status JSON: %v\n%s", err, r.stdout)
	}
	for _, e := range entries {
		if e["mountpoint"] == mp {
			return e
		}
	}
	t.Fatalf("status does not list %s:\n%s", mp, r.stdout)
	return nil
}

// TestTruncatedImage: a qcow2 image cut short by a failed copy is refused
// for a writable mount (exit 6, the reason, nothing mounted, the file
// unchanged); a read-only mount succeeds with a one-line warning naming
// the problem and `imgfuse check`, serves the intact ranges and fails the
// damaged one with EIO; and that EIO is then in `imgfuse status` (human
// and JSON: the count, the last error's offset and cause, the log) and in
// the default log status names, with no --log given.
func TestTruncatedImage(t *testing.T) {
	requireE2E(t)
	t.Parallel()
	dir := t.TempDir()
	img, badIndex, badL2 := truncatedImage(t, dir)
	sum := sha256File(t, img)
	reason := fmt.Sprintf("L1 entry %d: L2 table offset %#x is past the end of the file (%d bytes)", badIndex, badL2, badL2)

	// Writable: refused before anything is mounted or written.
	mp := newMountpoint(t, false)
	r := imgfuse(t, nil, "mount", img, mp)
	if r.code != 6 || !strings.Contains(r.stderr, img+": "+reason) || strings.Count(r.stderr, img) != 1 || strings.Count(r.stderr, "\n") != 1 {
		t.Errorf("writable mount of a truncated image: %v; want exit 6 and one line naming %q", r, reason)
	}
	if mounted(t, mp) {
		t.Fatal("a refused mount left a mount behind")
	}

	// Read-only, detached, without --log: one warning line, exit 0.
	r = imgfuse(t, nil, "mount", "-r", img, mp)
	if r.code != 0 {
		t.Fatalf("read-only mount: %v", r)
	}
	t.Cleanup(func() {
		if mounted(t, mp) {
			imgfuse(t, nil, "unmount", mp)
		}
	})
	want := "imgfuse: warning: " + img + ": " + reason + ": image is corrupt; reads of the damaged range fail with EIO; " +
		"run 'imgfuse check " + img + "' for a full report\n"
	if r.stderr != want {
		t.Errorf("read-only mount stderr:\n got %q\nwant %q", r.stderr, want)
	}
	disk := filepath.Join(mp, "disk")
	for i, p := range []byte{0x11, 0x22, 0x33, 0x44} {
		off := int64(i) << 21
		errno, got := readErrno(t, disk, off, 64<<10)
		switch {
		case i == badIndex && errno != syscall.EIO:
			t.Errorf("read of the damaged range at %#x: errno %v, want EIO", off, errno)
		case i != badIndex && (errno != 0 || !bytes.Equal(got, bytes.Repeat([]byte{p}, 64<<10))):
			t.Errorf("read of the intact range at %#x: errno %v or wrong bytes", off, errno)
		}
	}

	// status: the error is there once the daemon has published it (it
	// rewrites its state file asynchronously, within a quarter second).
	var st map[string]any
	if !waitFor(10*time.Second, func() bool {
		st = statusOf(t, mp)
		n, _ := st["io-errors"].(float64)
		return n >= 1
	}) {
		t.Fatalf("status shows no I/O error after an EIO: %v", st)
	}
	last, _ := st["last-io-error"].(map[string]any)
	logPath, _ := st["log"].(string)
	if last == nil || last["operation"] != "read" || last["offset"] != float64(int64(badIndex)<<21) ||
		!strings.Contains(fmt.Sprint(last["cause"]), reason) || last["time"] == nil {
		t.Errorf("status last-io-error: %v; want a read at %#x naming %q", last, int64(badIndex)<<21, reason)
	}
	if logPath == "" || !strings.HasSuffix(logPath, ".log") {
		t.Fatalf("status names no log: %v", st)
	}
	r = imgfuse(t, nil, "status")
	wantLine := fmt.Sprintf("%s: %d I/O error(s); the last at ", mp, int(st["io-errors"].(float64)))
	if r.code != 0 || !strings.Contains(r.stdout, wantLine) || !strings.Contains(r.stdout, fmt.Sprintf("read at disk offset %#x: ", int64(badIndex)<<21)) ||
		!strings.Contains(r.stdout, reason) || !strings.Contains(r.stdout, logPath) {
		t.Errorf("status (human): %v; want %q, the offset, the cause and %s", r, wantLine, logPath)
	}
	b, err := os.ReadFile(logPath)
	if err != nil {
		t.Fatalf("the log status names: %v", err)
	}
	if !strings.Contains(string(b), "I/O error 1: read at disk offset") || !strings.Contains(string(b), reason) {
		t.Errorf("the default log %s lacks the error's cause:\n%s", logPath, b)
	}
	unmount(t, mp)
	// The log outlives the daemon: after it has gone, it still says why.
	if _, err := os.Stat(logPath); err != nil {
		t.Errorf("the default log is gone after the unmount: %v", err)
	}

	// Read-only in the foreground: the warning on stderr too.
	fg := exec.Command(imgfuseBin, "mount", "--foreground", "-r", img, mp)
	pr, err := fg.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := fg.Start(); err != nil {
		t.Fatal(err)
	}
	var mu sync.Mutex
	var stderr strings.Builder
	done := make(chan struct{})
	go func() {
		defer close(done)
		sc := bufio.NewScanner(pr)
		for sc.Scan() {
			mu.Lock()
			stderr.WriteString(sc.Text() + "\n")
			mu.Unlock()
		}
	}()
	if !waitFor(20*time.Second, func() bool { return mounted(t, mp) }) {
		fg.Process.Kill()
		fg.Wait()
		t.Fatal("the --foreground mount did not appear")
	}
	unmount(t, mp)
	<-done
	if err := fg.Wait(); err != nil {
		t.Errorf("--foreground mount: %v", err)
	}
	mu.Lock()
	out := stderr.String()
	mu.Unlock()
	checkNoPanic(t, out)
	if n := strings.Count(out, "warning: "+img+": "+reason); n != 1 || !strings.Contains(out, "run 'imgfuse check "+img+"'") {
		t.Errorf("--foreground stderr has the warning %d times, want once with the check command:\n%s", n, out)
	}

	if sha256File(t, img) != sum {
		t.Error("the truncated image changed")
	}
}

// TestDamagedBackingWritableTop: a writable overlay whose backing file is
// truncated mounts (its writes never touch the backing file) with the
// warning naming the backing file; the damaged range of the backing file
// reads as EIO through the overlay, the rest reads and writes.
func TestDamagedBackingWritableTop(t *testing.T) {
	requireE2E(t)
	t.Parallel()
	dir := t.TempDir()
	base, badIndex, badL2 := truncatedImage(t, dir)
	baseSum := sha256File(t, base)
	top := filepath.Join(dir, "top.qcow2")
	driverstest.Cmd(t, "qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", top)
	mp := newMountpoint(t, true)
	r := imgfuse(t, nil, "mount", top, mp)
	if r.code != 0 {
		t.Fatalf("writable mount over a damaged backing file: %v", r)
	}
	t.Cleanup(func() {
		if mounted(t, mp) {
			imgfuse(t, nil, "unmount", mp)
		}
	})
	want := fmt.Sprintf("imgfuse: warning: %s (in the backing chain of %s): L1 entry %d: L2 table offset %#x is past the end",
		base, top, badIndex, badL2)
	if !strings.HasPrefix(r.stderr, want) || strings.Count(r.stderr, "\n") != 1 || !strings.Contains(r.stderr, "imgfuse check "+base) {
		t.Errorf("stderr %q; want one line starting %q naming imgfuse check %s", r.stderr, want, base)
	}
	if errno, _ := readErrno(t, mp, int64(badIndex)<<21, 4096); errno != syscall.EIO {
		t.Errorf("read of the backing file's damaged range: errno %v, want EIO", errno)
	}
	f, err := os.OpenFile(mp, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	good := int64((badIndex+1)%4) << 21
	if _, err := f.WriteAt(bytes.Repeat([]byte{0x55}, 4096), good); err != nil {
		t.Errorf("write to the overlay: %v", err)
	}
	f.Close()
	if errno, got := readErrno(t, mp, good, 4096); errno != 0 || !bytes.Equal(got, bytes.Repeat([]byte{0x55}, 4096)) {
		t.Errorf("read back the overlay's write: errno %v", errno)
	}
	unmount(t, mp)
	if sha256File(t, base) != baseSum {
		t.Error("the damaged backing file changed")
	}
	driverstest.Cmd(t, "qemu-img", "check", "-q", top)
}

// TestFileMountpointRules: a regular-file mountpoint obeys the rules of a
// directory: a non-empty one is refused (exit 7) unless --nonempty, which
// hides its contents while mounted and shows them again after; one that
// is the image, a file of its backing chain (directly, through a hard
// link or a symbolic link) or its external data file is refused with
// exit 7 and the reason even with --nonempty, and nothing is mounted or
// changed.
func TestFileMountpointRules(t *testing.T) {
	requireE2E(t)
	t.Parallel()
	dir := t.TempDir()
	base := filepath.Join(dir, "base.qcow2")
	top := filepath.Join(dir, "top.qcow2")
	data := filepath.Join(dir, "ext.data")
	ext := filepath.Join(dir, "ext.qcow2")
	driverstest.Cmd(t, "qemu-img", "create", "-q", "-f", "qcow2", base, "1M")
	driverstest.QemuIO(t, base, "write -P 0x5a 0 64k")
	driverstest.Cmd(t, "qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", top)
	driverstest.Cmd(t, "qemu-img", "create", "-q", "-f", "qcow2", "-o", "data_file="+data, ext, "1M")
	driverstest.QemuIO(t, ext, "write -P 0x6b 0 64k")
	hard := filepath.Join(dir, "base-hard.qcow2")
	if err := os.Link(base, hard); err != nil {
		t.Fatal(err)
	}
	sym := filepath.Join(dir, "base-sym.qcow2")
	if err := os.Symlink("base.qcow2", sym); err != nil {
		t.Fatal(err)
	}
	notes := filepath.Join(dir, "notes.txt")
	if err := os.WriteFile(notes, []byte("my notes\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	files := []string{base, top, data, ext, notes}
	sums := map[string][32]byte{}
	for _, f := range files {
		sums[f] = sha256File(t, f)
	}
	for _, mp := range []string{notes, base, top, data} {
		mountpoints.Lock()
		mountpoints.list = append(mountpoints.list, mp)
		mountpoints.Unlock()
		t.Cleanup(func() { forceUnmount(t, mp) })
	}

	backing := "is the backing file of " + top + " (" + base + "): "
	for _, c := range []struct {
		args []string
		want string
	}{
		{[]string{top, notes}, "imgfuse: mountpoint " + notes + " is a file of 9 bytes; the mount would hide its contents: choose an empty file or a directory, or give --nonempty\n"},
		{[]string{top, top}, "imgfuse: mountpoint " + top + " is the image itself: "},
		{[]string{"--nonempty", top, top}, "imgfuse: mountpoint " + top + " is the image itself: "},
		{[]string{"-r", top, base}, "imgfuse: mountpoint " + base + " " + backing},
		{[]string{"--nonempty", "-r", top, base}, "imgfuse: mountpoint " + base + " " + backing},
		{[]string{"--nonempty", top, hard}, "imgfuse: mountpoint " + hard + " " + backing},
		{[]string{"--nonempty", "-r", top, sym}, "imgfuse: mountpoint " + sym + " " + backing},
		{[]string{"--nonempty", "--overlay", top, base}, "imgfuse: mountpoint " + base + " " + backing},
		{[]string{"--nonempty", ext, data}, "imgfuse: mountpoint " + data + " is the external data file of " + ext + " (" + data + "): "},
	} {
		r := imgfuse(t, nil, append([]string{"mount"}, c.args...)...)
		mp := c.args[len(c.args)-1]
		if r.code != 7 || !strings.HasPrefix(r.stderr, c.want) || strings.Count(r.stderr, "\n") != 1 {
			t.Errorf("mount %s: %v; want exit 7 and one line starting %q", strings.Join(c.args, " "), r, c.want)
		}
		if len(c.args) > 2 && c.args[0] == "--nonempty" && !strings.Contains(r.stderr, "--nonempty does not allow this") {
			t.Errorf("mount %s: %q does not say --nonempty cannot help", strings.Join(c.args, " "), r.stderr)
		}
		if mounted(t, mp) {
			t.Errorf("mount %s left %s mounted", strings.Join(c.args, " "), mp)
			forceUnmount(t, mp)
		}
	}
	for _, f := range files {
		if sha256File(t, f) != sums[f] {
			t.Errorf("a refused mount changed %s", f)
		}
	}

	// --nonempty: the file is the disk while mounted, itself again after.
	r := imgfuse(t, nil, "mount", "--nonempty", "-r", top, notes)
	if r.code != 0 {
		t.Fatalf("mount --nonempty on a non-empty file: %v", r)
	}
	errno, got := readErrno(t, notes, 0, 64<<10)
	if errno != 0 || !bytes.Equal(got, bytes.Repeat([]byte{0x5a}, 64<<10)) {
		t.Errorf("read of the disk on %s: errno %v or wrong bytes", notes, errno)
	}
	unmount(t, notes)
	if sha256File(t, notes) != sums[notes] {
		t.Error("the file mounted over with --nonempty changed")
	}
}
