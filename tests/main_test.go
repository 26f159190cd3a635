package tests

import (
	"bytes"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/moby/sys/mountinfo"

	"imgfuse/drivers/driverstest"
)

var (
	// imgfuseBin is the imgfuse binary built by TestMain; buildErr says why
	// there is none.
	imgfuseBin string
	buildErr   error
	// logSupported: the binary has `mount --log FILE`.
	logSupported bool
)

// watchdog bounds how long a test may keep one mount: a hung FUSE request
// blocks the reader in the kernel for ever, so after this long the daemon
// gets SIGQUIT (a goroutine dump in its log) and then SIGKILL, which fails
// the blocked reads with ENOTCONN instead of hanging the whole run.
const watchdog = 150 * time.Second

// e2eParallel is how many tests run at once unless -parallel says
// otherwise. The end-to-end tests wait on FUSE round trips, qemu-img,
// fsync and the kernel far more than they compute: at go test's default
// (GOMAXPROCS tests at once) two cores stay more than half idle.
func e2eParallel() int { return 2 * runtime.GOMAXPROCS(0) }

func TestMain(m *testing.M) {
	flag.Parse()
	explicit := false
	flag.Visit(func(f *flag.Flag) { explicit = explicit || f.Name == "test.parallel" })
	if !explicit {
		flag.Set("test.parallel", strconv.Itoa(e2eParallel()))
	}
	dir, err := os.MkdirTemp("", "imgfuse-e2e-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	consultSources()
	imgfuseBin = filepath.Join(dir, "imgfuse")
	args := []string{"build", "-o", imgfuseBin}
	if raceEnabled {
		args = append(args, "-race")
	}
	cmd := exec.Command("go", append(args, "imgfuse/cmd/imgfuse")...)
	if out, err := cmd.CombinedOutput(); err != nil {
		buildErr = fmt.Errorf("go build imgfuse/cmd/imgfuse: %v\n%s", err, out)
	}
	if buildErr == nil {
		// --log is optional: with it a hung or crashed daemon leaves its
		// goroutine dump where the test can show it.
		out, _ := exec.Command(imgfuseBin, "mount", "--help").CombinedOutput()
		logSupported = bytes.Contains(out, []byte("--log"))
	}
	waitBench := startBenchSmoke()
	code := m.Run()
	waitBench()
	if left := leftMounted(); len(left) > 0 {
		fmt.Fprintf(os.Stderr, "FAIL: the tests left %d mounts behind: %v\n", len(left), left)
		code = 1
	}
	os.RemoveAll(dir)
	os.Exit(code)
}

// selected reports whether -run and -skip let the top-level test name run
// (judged by the part of each pattern before its first slash).
func selected(name string) bool {
	matches := func(flagName string, unset bool) bool {
		f := flag.Lookup(flagName)
		if f == nil || f.Value.String() == "" {
			return unset
		}
		top, _, _ := strings.Cut(f.Value.String(), "/")
		re, err := regexp.Compile(top)
		return err == nil && re.MatchString(name)
	}
	return matches("test.run", true) && !matches("test.skip", false)
}

// consultSources opens every source file of the module through the os
// package. The binary is built by a child process, whose reads the go
// test result cache does not see; files the test process itself opens are
// recorded, so a change anywhere in the module invalidates a cached pass.
func consultSources() {
	filepath.WalkDir("..", func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return nil
		}
		if d.IsDir() && p != ".." && strings.HasPrefix(d.Name(), ".") {
			return filepath.SkipDir
		}
		if n := d.Name(); strings.HasSuffix(n, ".go") || n == "go.mod" || n == "go.sum" {
			if f, err := os.Open(p); err == nil {
				f.Close()
			}
		}
		return nil
	})
}

// requireE2E skips t (fails it in CI) unless the end-to-end prerequisites
// are there, and fails it if the binary did not build.
func requireE2E(t *testing.T, tools ...string) {
	t.Helper()
	driverstest.SkipUnless(t, os.Geteuid() == 0, "not running as root")
	_, err := os.Stat("/dev/fuse")
	driverstest.SkipUnless(t, err == nil, "/dev/fuse: %v", err)
	driverstest.RequireTools(t, append([]string{"qemu-img", "qemu-io"}, tools...)...)
	if buildErr != nil {
		t.Fatal(buildErr)
	}
}

// result is the outcome of one imgfuse command.
type result struct {
	stdout, stderr string
	code           int
}

func (r result) String() string {
	return fmt.Sprintf("exit %d\nstdout: %s\nstderr: %s", r.code, r.stdout, r.stderr)
}

// imgfuse runs the binary with args. A command that outlives 60 s is
// killed and fails t. env, if non-nil, is added to the environment.
func imgfuse(t *testing.T, env []string, args ...string) result {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	var stdout, stderr bytes.Buffer
	cmd := exec.CommandContext(ctx, imgfuseBin, args...)
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	cmd.Env = append(os.Environ(), env...)
	// A daemon that keeps our stdout/stderr pipes open would make Wait
	// block until it exits; bound that, and report it below.
	cmd.WaitDelay = 3 * time.Second
	err := cmd.Run()
	r := result{stdout: stdout.String(), stderr: stderr.String()}
	var ee *exec.ExitError
	switch {
	case err == nil:
	case errors.Is(err, exec.ErrWaitDelay):
		t.Errorf("imgfuse %s: the daemon kept the caller's stdout/stderr open", strings.Join(args, " "))
	case errors.As(err, &ee):
		r.code = ee.ExitCode()
	default:
		t.Fatalf("imgfuse %s: %v", strings.Join(args, " "), err)
	}
	if ctx.Err() != nil {
		t.Fatalf("imgfuse %s: timed out after 60s\n%v", strings.Join(args, " "), r)
	}
	checkNoPanic(t, r.stderr)
	return r
}

// checkNoPanic fails t if a Go panic or fatal error shows in out.
func checkNoPanic(t *testing.T, out string) {
	t.Helper()
	for _, s := range []string{"panic:", "goroutine ", "fatal error:", "DATA RACE"} {
		if strings.Contains(out, s) {
			t.Errorf("output contains %q:\n%s", s, out)
		}
	}
}

// mounted reports whether path is a mountpoint in the mount table.
func mounted(t *testing.T, path string) bool {
	t.Helper()
	m, err := mountinfo.GetMounts(mountinfo.SingleEntryFilter(path))
	if err != nil {
		t.Fatal(err)
	}
	return len(m) > 0
}

// forceUnmount is the last resort: a lazy unmount so a failed test never
// leaves a stale mount.
func forceUnmount(t *testing.T, mp string) {
	for _, c := range [][]string{{"fusermount3", "-uz", mp}, {"umount", "-l", mp}} {
		if !mounted(t, mp) {
			return
		}
		exec.Command(c[0], c[1:]...).Run()
	}
	if mounted(t, mp) {
		t.Errorf("%s is still mounted after a lazy unmount", mp)
	}
}

// mount mounts img on a fresh mountpoint with extra flags and registers a
// cleanup that unmounts it. With fileMP the mountpoint is a regular file
// (the disk itself); otherwise it is a directory. It returns the
// mountpoint and the path of the disk file.
func mount(t *testing.T, img string, fileMP bool, flags ...string) (mp, disk string) {
	t.Helper()
	mp = newMountpoint(t, fileMP)
	logDir := t.TempDir()
	logFile := filepath.Join(logDir, "daemon.log")
	env := []string{"GORACE=log_path=" + filepath.Join(logDir, "race") + " halt_on_error=0"}
	stop := func() {}
	t.Cleanup(func() {
		stop()
		if mounted(t, mp) {
			if r := imgfuse(t, env, "unmount", mp); r.code != 0 {
				t.Errorf("cleanup: imgfuse unmount %s: %v", mp, r)
			}
		}
		forceUnmount(t, mp)
		checkRaceLogs(t, logDir)
		if b, err := os.ReadFile(logFile); err == nil {
			checkNoPanic(t, string(b))
			if t.Failed() && len(b) > 0 {
				t.Logf("daemon log %s:\n%s", logFile, b)
			}
		}
	})
	args := []string{"mount"}
	if logSupported {
		args = append(args, "--log", logFile)
		daemonLogs.Store(mp, logFile)
	}
	args = append(args, flags...)
	r := imgfuse(t, env, append(args, img, mp)...)
	if r.code != 0 {
		t.Fatalf("imgfuse mount %s %s: %v", strings.Join(flags, " "), img, r)
	}
	if !mounted(t, mp) {
		t.Fatalf("imgfuse mount exited 0 but %s is not in /proc/self/mountinfo", mp)
	}
	stop = guard(t, mp)
	disk = mp
	if !fileMP {
		name := "disk"
		for i, f := range flags {
			if f == "--name" && i+1 < len(flags) {
				name = flags[i+1]
			} else if v, ok := strings.CutPrefix(f, "--name="); ok {
				name = v
			}
		}
		disk = filepath.Join(mp, name)
	}
	return mp, disk
}

// daemonLogs maps a mountpoint made by mount to its daemon's log file.
var daemonLogs sync.Map

// daemonLog returns what the daemon serving mp has logged so far.
func daemonLog(t *testing.T, mp string) string {
	t.Helper()
	p, ok := daemonLogs.Load(mp)
	if !ok {
		t.Fatalf("no daemon log for %s (imgfuse mount has no --log?)", mp)
	}
	b, err := os.ReadFile(p.(string))
	if err != nil {
		t.Fatal(err)
	}
	return string(b)
}

// guard starts the watchdog for the mount on mp and returns its stop
// function.
func guard(t *testing.T, mp string) (stop func()) {
	pid, err := findDaemon(mp)
	if err != nil {
		t.Logf("no watchdog: %v", err)
		return func() {}
	}
	timer := time.AfterFunc(watchdog, func() {
		t.Errorf("%s still mounted after %v: sending SIGQUIT, then SIGKILL, to the daemon (pid %d)", mp, watchdog, pid)
		syscall.Kill(pid, syscall.SIGQUIT)
		time.Sleep(2 * time.Second)
		syscall.Kill(pid, syscall.SIGKILL)
	})
	return func() { timer.Stop() }
}

// mountpoints lists every mountpoint a test created, so that TestMain can
// check that none is left mounted.
var mountpoints struct {
	sync.Mutex
	list []string
}

// newMountpoint creates an empty directory (or, with file, an empty
// regular file) to mount on, and registers a cleanup that lazily unmounts
// whatever is still mounted there.
func newMountpoint(t *testing.T, file bool) string {
	t.Helper()
	mp := filepath.Join(t.TempDir(), "mnt")
	if file {
		if err := os.WriteFile(mp, nil, 0o644); err != nil {
			t.Fatal(err)
		}
	} else if err := os.Mkdir(mp, 0o755); err != nil {
		t.Fatal(err)
	}
	mountpoints.Lock()
	mountpoints.list = append(mountpoints.list, mp)
	mountpoints.Unlock()
	t.Cleanup(func() { forceUnmount(t, mp) })
	return mp
}

// leftMounted returns the registered mountpoints that are still mounted,
// after unmounting them lazily.
func leftMounted() []string {
	mounts, err := mountinfo.GetMounts(nil)
	if err != nil {
		return nil
	}
	live := map[string]bool{}
	for _, m := range mounts {
		live[m.Mountpoint] = true
	}
	var left []string
	mountpoints.Lock()
	defer mountpoints.Unlock()
	for _, mp := range mountpoints.list {
		if live[mp] {
			left = append(left, mp)
			exec.Command("umount", "-l", mp).Run()
		}
	}
	return left
}

// unmount runs `imgfuse unmount mp` and checks that the mount is gone when
// it returns.
func unmount(t *testing.T, mp string) {
	t.Helper()
	if r := imgfuse(t, nil, "unmount", mp); r.code != 0 {
		t.Fatalf("imgfuse unmount %s: %v", mp, r)
	}
	if mounted(t, mp) {
		t.Fatalf("imgfuse unmount %s returned, but it is still mounted", mp)
	}
}

// checkRaceLogs fails t if a daemon wrote a race report.
func checkRaceLogs(t *testing.T, dir string) {
	logs, _ := filepath.Glob(filepath.Join(dir, "race*"))
	for _, l := range logs {
		b, _ := os.ReadFile(l)
		t.Errorf("the daemon reported a data race (%s):\n%s", l, b)
	}
}

// daemonPID finds the running imgfuse process serving mp: the process
// running our binary with mp on its command line.
func daemonPID(t *testing.T, mp string) int {
	t.Helper()
	pid, err := findDaemon(mp)
	if err != nil {
		t.Fatal(err)
	}
	return pid
}

func findDaemon(mp string) (int, error) {
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return 0, err
	}
	var found []int
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil || pid == os.Getpid() {
			continue
		}
		exe, err := os.Readlink(fmt.Sprintf("/proc/%d/exe", pid))
		if err != nil || exe != imgfuseBin {
			continue
		}
		cmdline, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
		if err != nil || alive(pid) == false {
			continue
		}
		for _, a := range bytes.Split(cmdline, []byte{0}) {
			if string(a) == mp {
				found = append(found, pid)
				break
			}
		}
	}
	if len(found) != 1 {
		return 0, fmt.Errorf("found %d imgfuse processes serving %s (%v), want 1", len(found), mp, found)
	}
	return found[0], nil
}

// alive reports whether pid exists and is not exiting: not a zombie (an
// orphaned daemon may be left unreaped by the container's init), and still
// holding its memory (the kernel empties /proc/PID/cmdline when an exiting
// process releases it, which is also when `imgfuse unmount` stops waiting;
// by then the daemon has closed the image itself).
func alive(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	i := bytes.LastIndexByte(b, ')')
	if i < 0 || i+2 >= len(b) || b[i+2] == 'Z' || b[i+2] == 'X' {
		return false
	}
	cmdline, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	return err == nil && len(cmdline) > 0
}

// waitFor polls cond every 50 ms for up to d.
func waitFor(d time.Duration, cond func() bool) bool {
	deadline := time.Now().Add(d)
	for time.Now().Before(deadline) {
		if cond() {
			return true
		}
		time.Sleep(50 * time.Millisecond)
	}
	return cond()
}

// compareFiles streams got and want and fails t at the first difference,
// naming its offset; sizes must match too.
func compareFiles(t *testing.T, got, want string) {
	t.Helper()
	gf, err := os.Open(got)
	if err != nil {
		t.Fatal(err)
	}
	defer gf.Close()
	wf, err := os.Open(want)
	if err != nil {
		t.Fatal(err)
	}
	defer wf.Close()
	gs, _ := gf.Stat()
	ws, _ := wf.Stat()
	if gs.Size() != ws.Size() {
		t.Errorf("%s is %d bytes, %s is %d", got, gs.Size(), want, ws.Size())
	}
	gb := make([]byte, 1<<20)
	wb := make([]byte, 1<<20)
	for off := int64(0); ; {
		gn, gerr := io.ReadFull(gf, gb)
		wn, werr := io.ReadFull(wf, wb)
		if gerr != nil && gerr != io.EOF && gerr != io.ErrUnexpectedEOF {
			t.Fatalf("read %s at %d: %v", got, off, gerr)
		}
		if werr != nil && werr != io.EOF && werr != io.ErrUnexpectedEOF {
			t.Fatalf("read %s at %d: %v", want, off, werr)
		}
		n := min(gn, wn)
		if !bytes.Equal(gb[:n], wb[:n]) {
			i := 0
			for gb[i] == wb[i] {
				i++
			}
			end := min(i+16, n)
			t.Fatalf("%s differs from %s at offset %d: got % x, want % x", got, want, off+int64(i), gb[i:end], wb[i:end])
		}
		if gn != wn {
			t.Fatalf("%s and %s differ in length after offset %d", got, want, off+int64(n))
		}
		if gn < len(gb) {
			return
		}
		off += int64(n)
	}
}

// readErrno reads len bytes at off from path and returns the errno of the
// read, or 0.
func readErrno(t *testing.T, path string, off, n int64) (syscall.Errno, []byte) {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		var errno syscall.Errno
		if errors.As(err, &errno) {
			return errno, nil
		}
		t.Fatal(err)
	}
	defer f.Close()
	buf := make([]byte, n)
	_, err = f.ReadAt(buf, off)
	var errno syscall.Errno
	if errors.As(err, &errno) {
		return errno, nil
	}
	if err != nil && err != io.EOF {
		t.Fatalf("read %s: %v", path, err)
	}
	return 0, buf
}
