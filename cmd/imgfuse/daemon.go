package main

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"

	"fmt"
	"io"
	"log"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// Daemonizing. Go cannot fork a running runtime, so `imgfuse mount` re-execs
// itself (/proc/self/exe) with daemonEnv naming an inherited pipe, the
// readiness pipe. The child (setsid, stdio on /dev/null or the --log file)
// opens the image, mounts, and writes "ok\n" or its error text to the pipe,
// then closes it. The parent exits 0 only after reading "ok".

// daemonEnv marks the re-executed child; its value is the readiness fd.
const daemonEnv = "IMGFUSE_DAEMON_READY_FD"

// readyOK is what the child writes once the mount answers.
const readyOK = "ok\n"

// warnPrefix starts a line of the report that is a warning for the user's
// terminal ("W warning: ...\n"), written before "ok" (or the error): a
// read-only mount of a damaged image still succeeds, and its parent
// prints the warning.
const warnPrefix = "W "

// daemonReadyTimeout bounds the wait for the child's report. Opening an
// image reads only headers and tables; fusefs.Mount waits at most 10 s.
const daemonReadyTimeout = 60 * time.Second

// daemonReadyFD reports whether this process is the re-executed child, and
// the readiness fd it inherited.
func daemonReadyFD() (int, bool) {
	v, ok := os.LookupEnv(daemonEnv)
	if !ok {
		return 0, false
	}
	// Helpers we run (fusermount3) must not think they are daemons.
	os.Unsetenv(daemonEnv)
	fd, err := strconv.Atoi(v)
	if err != nil || fd < 3 {
		return 0, false
	}
	return fd, true
}

// childArgs rebuilds the mount command line for the child from validated
// options. Paths are made absolute so that the child can chdir("/") and not
// pin the caller's working directory.
func childArgs(o *mountOptions) []string {
	args := []string{"mount", "--foreground", "--format", o.format}
	if o.readOnly {
		args = append(args, "--read-only")
	}
	if o.snapshot != "" {
		args = append(args, "--snapshot", o.snapshot)
	}
	if o.name != "" {
		args = append(args, "--name", o.name)
	}
	if o.allowOther {
		args = append(args, "--allow-other")
	}
	if o.noDirectIO {
		args = append(args, "--no-direct-io")
	}
	if o.forceShare {
		args = append(args, "--force-share")
	}
	if o.growable {
		args = append(args, "--growable")
	}
	if o.lazyRefcnt {
		args = append(args, "--lazy-refcounts")
	}
	if o.noPassthru {
		args = append(args, "--no-passthrough")
	}
	if o.debug {
		args = append(args, "--debug")
	}
	if o.cacheSize != "" {
		args = append(args, "--cache-size", o.cacheSize)
	}
	if o.overlay {
		args = append(args, "--overlay")
	}
	if o.overlayKeep != "" {
		args = append(args, "--overlay-keep", o.overlayKeep)
	}
	if o.pidFile != "" {
		args = append(args, "--pidfile", o.pidFile)
	}
	for _, p := range o.removeOnExit {
		args = append(args, "--remove-on-exit", p)
	}
	// The parent opens the log and makes it the child's stdout and
	// stderr; the child is told which file that is, for its state file
	// (and, for the default log, to keep it bounded).
	if o.logFile != "" {
		args = append(args, "--log", o.logFile)
	}
	if o.defaultLog != "" {
		args = append(args, "--default-log", o.defaultLog)
	}
	return append(args, "--", o.absImage, o.absMountpoint)
}

// startDaemon starts the child that serves the mount and waits for its
// report. On failure it leaves neither a child nor a mount behind.
func startDaemon(o *mountOptions) error {
	r, w, err := os.Pipe()
	if err != nil {
		return err
	}
	defer r.Close()
	var logFile *os.File
	if o.logFile != "" {
		lf, err := os.OpenFile(o.logFile, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o644)
		if err != nil {
			w.Close()
			return usagef("--log: %v", err)
		}
		logFile = lf
	} else if lf, path, err := openDefaultLog(o.absMountpoint); err == nil {
		logFile, o.defaultLog = lf, path
	}
	// else: no state directory to keep a log in; the daemon's writeState
	// fails too, and says so (to nowhere) as before.
	cmd := exec.Command("/proc/self/exe", childArgs(o)...)
	cmd.Args[0] = os.Args[0]
	cmd.Env = append(os.Environ(), daemonEnv+"=3")
	cmd.ExtraFiles = []*os.File{w}
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	cmd.Dir = "/"
	if logFile != nil {
		defer logFile.Close()
		cmd.Stdout, cmd.Stderr = logFile, logFile
	}
	err = startIOFlusher(cmd)
	w.Close()
	if err != nil {
		return fmt.Errorf("start mount daemon: %w", err)
	}

	msg, rerr := readReport(r, daemonReadyTimeout)
	msg, warnings := splitWarnings(msg)
	for _, w := range warnings {
		if o.warn != nil {
			o.warn(userSpelling(w, o))
		}
	}
	if rerr == nil && msg == readyOK {
		// The child lives on in its own session; init reaps it.
		_ = cmd.Process.Release()
		return nil
	}
	// Failure: make sure the child is gone and no mount is left.
	waitErr := reapChild(cmd, rerr != nil, o.absMountpoint)
	hint := ""
	if l := o.logPath(); l != "" {
		hint = " (see " + l + ")"
	}
	switch {
	case rerr != nil:
		return fmt.Errorf("mount daemon did not report within %v; killed it%s", daemonReadyTimeout, hint)
	case msg == "":
		return fmt.Errorf("mount daemon exited before reporting (%v)%s", waitErr, hint)
	default:
		return decodeReport(userSpelling(msg, o))
	}
}

// userSpelling rewrites the child's report, which names the absolute
// paths the child was given, with the paths as the user spelled them:
// the image wherever it appears, the mountpoint where the report names
// the failed mount ("mount MNT: fusermount3: ...").
func userSpelling(msg string, o *mountOptions) string {
	msg = strings.ReplaceAll(msg, o.absImage, o.image)
	if o.absMountpoint != "" {
		msg = strings.Replace(msg, " mount "+o.absMountpoint+": ", " mount "+o.mountpoint+": ", 1)
	}
	return msg
}

// splitWarnings separates the warning lines of a report from the rest
// (readyOK or the error).
func splitWarnings(report string) (rest string, warnings []string) {
	for {
		line, tail, ok := strings.Cut(report, "\n")
		w, isWarn := strings.CutPrefix(line, warnPrefix)
		if !ok || !isWarn {
			return report, warnings
		}
		warnings = append(warnings, w)
		report = tail
	}
}

// readReport reads the child's report until it closes the pipe.
func readReport(r *os.File, timeout time.Duration) (string, error) {
	if err := r.SetReadDeadline(time.Now().Add(timeout)); err != nil {
		return "", err
	}
	b, err := io.ReadAll(io.LimitReader(r, 64<<10))
	return string(b), err
}

// reapChild waits for a failed child to exit, killing it if it does not
// within a few seconds (or at once if kill), and removes any mount it left
// at mountpoint. It never blocks forever: a child stuck in the kernel on
// its own FUSE mount is freed by aborting that mount's connection, and if
// it still does not exit the parent gives up waiting.
func reapChild(cmd *exec.Cmd, kill bool, mountpoint string) error {
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	wait := func(d time.Duration) (bool, error) {
		select {
		case err := <-done:
			return true, err
		case <-time.After(d):
			return false, nil
		}
	}
	if kill {
		_ = cmd.Process.Kill()
	}
	exited, err := wait(10 * time.Second)
	if !exited {
		_ = cmd.Process.Kill()
		exited, err = wait(5 * time.Second)
	}
	detachIfOurs(mountpoint)
	if !exited {
		exited, err = wait(5 * time.Second)
	}
	if !exited {
		return fmt.Errorf("pid %d did not exit after SIGKILL", cmd.Process.Pid)
	}
	return err
}

// detachIfOurs lazily unmounts mountpoint if an imgfuse mount sits there:
// the child died or was killed between mounting and reporting.
func detachIfOurs(mountpoint string) {
	if e, ok, _ := findMount(mountpoint); ok && isImgfuseMount(e) {
		abortConnection(e)
		_ = lazyUnmount(mountpoint)
	}
}

// startIOFlusher starts cmd with PR_SET_IO_FLUSHER on the forking thread:
// the flag is inherited by the child's first thread and so by every thread
// its runtime creates. A FUSE server under a loop device needs it to avoid
// deadlocking in memory reclaim that waits on its own I/O. Setting it needs
// CAP_SYS_RESOURCE; without it the child runs as before.
func startIOFlusher(cmd *exec.Cmd) error {
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	set := unix.Prctl(unix.PR_SET_IO_FLUSHER, 1, 0, 0, 0) == nil
	err := cmd.Start()
	if set {
		if unix.Prctl(unix.PR_SET_IO_FLUSHER, 0, 0, 0, 0) != nil {
			// Leave the thread locked: the runtime then retires it
			// when this goroutine exits instead of reusing it.
			runtime.LockOSThread()
		}
	}
	return err
}

// runDaemonChild is the re-executed child: serve the mount, report
// readiness (or the error) on fd, exit when the mount goes away.
func runDaemonChild(o *mountOptions, fd int) error {
	syscall.CloseOnExec(fd)
	pipe := os.NewFile(uintptr(fd), "readiness")
	var logw io.Writer = os.Stderr
	if o.defaultLog != "" {
		logw = newBoundedLog(os.Stderr, o.defaultLog, defaultLogMax, []int{1, 2})
	}
	logger := log.New(logw, "imgfuse: ", log.LstdFlags)
	reported := false
	o.warn = func(msg string) {
		logger.Print(msg)
		if !reported {
			_, _ = pipe.WriteString(warnPrefix + msg + "\n")
		}
	}
	err := serve(o, logger, func() {
		logger.Printf("serving %s on %s (pid %d)", o.image, o.mountpoint, os.Getpid())
		reported = true
		_, _ = pipe.WriteString(readyOK)
		pipe.Close()
		_ = os.Chdir("/")
	})
	if err == nil {
		return nil
	}
	if !reported {
		_, _ = pipe.WriteString(encodeReport(err))
		pipe.Close()
	}
	logger.Print(err)
	return exitError{exitCode(err)}
}

// daemonState is what a serving process records so that `imgfuse unmount`
// can find it and wait for it to flush and exit.
type daemonState struct {
	PID        int    `json:"pid"`
	Image      string `json:"image"`
	Mountpoint string `json:"mountpoint"`
	Format     string `json:"format"`
	ReadOnly   bool   `json:"read-only"`
	// Passthrough is "on" when the kernel serves the disk's reads itself
	// (FUSE passthrough), else "off: " and why.
	Passthrough string `json:"passthrough,omitempty"`
	// Overlay is the qcow2 overlay that takes the writes (--overlay,
	// --overlay-keep); OverlayTemporary says it is removed on exit, so a
	// stale state file's overlay is removed with it.
	Overlay          string `json:"overlay,omitempty"`
	OverlayTemporary bool   `json:"overlay-temporary,omitempty"`
	// ServingMode is how the FUSE server reads requests (fusefs
	// Server.Mode); PIDFile the --pidfile.
	ServingMode string    `json:"serving-mode,omitempty"`
	PIDFile     string    `json:"pidfile,omitempty"`
	Started     time.Time `json:"started"`
	// CloseError is set by a server whose final flush or close failed,
	// just before it exits; 'imgfuse unmount' reports it.
	CloseError string `json:"close-error,omitempty"`
	// Log is the file the server logs to: --log FILE, else its default
	// log; "" for a --foreground server logging to its terminal.
	Log string `json:"log,omitempty"`
	// IOErrors counts the I/O errors (EIO) the mount returned, and
	// LastIOError is the last of them; the server rewrites the state
	// file as they happen (at most ioErrorPublishEvery apart).
	IOErrors    uint64        `json:"io-errors,omitempty"`
	LastIOError *ioErrorState `json:"last-io-error,omitempty"`
}

// ioErrorState is the last I/O error of a mount, in the state file and in
// 'imgfuse status --output=json'.
type ioErrorState struct {
	Time      time.Time `json:"time"`
	Operation string    `json:"operation"`
	// Offset is the disk offset of the request, null for one without
	// (a flush).
	Offset *int64 `json:"offset"`
	Cause  string `json:"cause"`
}

// logPath is the file a daemon started with o logs to, "" if none.
func (o *mountOptions) logPath() string {
	if o.logFile != "" {
		return o.logFile
	}
	return o.defaultLog
}

// stateDir is where state files live: /run/imgfuse for root; for a user
// $XDG_RUNTIME_DIR/imgfuse, else imgfuse in the user's runtime directory
// /run/user/UID if it exists (what XDG_RUNTIME_DIR is in their login
// sessions, so that a command run outside one, from cron or sudo -u,
// finds the same mounts), else /tmp/imgfuse-UID: /tmp, not $TMPDIR, so
// that the user's commands agree whatever their TMPDIR.
func stateDir() string {
	return stateDirFor(os.Geteuid(), os.Getenv("XDG_RUNTIME_DIR"), "/run/user")
}

// stateDirFor is stateDir for user uid, with XDG_RUNTIME_DIR xdg and the
// runtime directories under runUser.
func stateDirFor(uid int, xdg, runUser string) string {
	if uid == 0 {
		return "/run/imgfuse"
	}
	if xdg != "" {
		return filepath.Join(xdg, "imgfuse")
	}
	if d := filepath.Join(runUser, strconv.Itoa(uid)); checkDirOwner(d, uid) == nil {
		return filepath.Join(d, "imgfuse")
	}
	return fmt.Sprintf("/tmp/imgfuse-%d", uid)
}

// checkStateDir refuses a state directory that is not ours alone. The
// per-user directory under /tmp may have been made by anyone, and a state
// file is trusted: 'imgfuse unmount' waits for the pid it names and
// removes its temporary overlay.
func checkStateDir(dir string) error { return checkDirOwner(dir, os.Geteuid()) }

// checkDirOwner checks that dir is a directory (not a symlink) of user
// uid that no other user may write.
func checkDirOwner(dir string, uid int) error {
	fi, err := os.Lstat(dir)
	if err != nil {
		return err // os.IsNotExist: no state yet
	}
	st, ok := fi.Sys().(*syscall.Stat_t)
	switch {
	case !fi.IsDir():
		return fmt.Errorf("state dir %s is not a directory", dir)
	case ok && int(st.Uid) != uid:
		return fmt.Errorf("state dir %s belongs to uid %d, not to uid %d", dir, st.Uid, uid)
	case fi.Mode().Perm()&0o022 != 0:
		return fmt.Errorf("state dir %s is writable by other users (mode %#o)", dir, fi.Mode().Perm())
	}
	return nil
}

// statePath names the state file of a canonical mountpoint: a hash, so any
// path (spaces, slashes, length) maps to one flat file name.
func statePath(dir, mountpoint string) string {
	sum := sha256.Sum256([]byte(mountpoint))
	return filepath.Join(dir, hex.EncodeToString(sum[:])+".json")
}

// writeState records st atomically (write a temporary file, rename).
func writeState(dir string, st daemonState) (string, error) {
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return "", fmt.Errorf("state dir: %w", err)
	}
	if err := checkStateDir(dir); err != nil {
		return "", err
	}
	b, err := json.MarshalIndent(st, "", "  ")
	if err != nil {
		return "", err
	}
	path := statePath(dir, st.Mountpoint)
	tmp, err := os.CreateTemp(dir, ".state-*")
	if err != nil {
		return "", fmt.Errorf("state file: %w", err)
	}
	_, err = tmp.Write(append(b, '\n'))
	if cerr := tmp.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp.Name(), path)
	}
	if err != nil {
		os.Remove(tmp.Name())
		return "", fmt.Errorf("state file: %w", err)
	}
	return path, nil
}

// readState loads the state file of a canonical mountpoint.
func readState(dir, mountpoint string) (daemonState, error) {
	var st daemonState
	if err := checkStateDir(dir); err != nil {
		return st, err
	}
	b, err := os.ReadFile(statePath(dir, mountpoint))
	if err != nil {
		return st, err
	}
	if err := json.Unmarshal(b, &st); err != nil {
		return st, fmt.Errorf("state file %s: %w", statePath(dir, mountpoint), err)
	}
	if st.Mountpoint != mountpoint {
		return st, fmt.Errorf("state file %s is for %s", statePath(dir, mountpoint), st.Mountpoint)
	}
	return st, nil
}

// daemonRunning reports whether pid is still a live imgfuse process
// serving a mount: the pid exists, is not a zombie, and its command line is
// an imgfuse mount (so a recycled pid is not waited for).
func daemonRunning(pid int) bool {
	if pid <= 0 {
		return false
	}
	stat, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	// The state follows the parenthesised command name, which may itself
	// contain ") ".
	if i := bytes.LastIndexByte(stat, ')'); i >= 0 && i+2 < len(stat) && stat[i+2] == 'Z' {
		return false
	}
	cmdline, err := os.ReadFile(fmt.Sprintf("/proc/%d/cmdline", pid))
	if err != nil {
		return false
	}
	return isImgfuseMountCmdline(cmdline)
}

// isImgfuseMountCmdline checks a NUL-separated /proc/PID/cmdline.
func isImgfuseMountCmdline(cmdline []byte) bool {
	args := strings.Split(strings.TrimRight(string(cmdline), "\x00"), "\x00")
	if len(args) < 2 || !strings.Contains(filepath.Base(args[0]), "imgfuse") {
		return false
	}
	for _, a := range args[1:] {
		if a == "mount" || a == "demo" {
			return true
		}
	}
	return false
}

// abortConnection aborts the FUSE connection behind e (root only), failing
// every pending and future request with ENOTCONN. It frees processes stuck
// waiting on a server that will never answer.
func abortConnection(e *mountEntry) {
	if e.Major != 0 {
		return
	}
	_ = os.WriteFile("/sys/fs/fuse/connections/"+strconv.Itoa(e.Minor)+"/abort", []byte("1"), 0)
}
