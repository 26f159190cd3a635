package session

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"log"
	"os"
	"os/exec"
	"runtime"
	"syscall"
	"time"

	"golang.org/x/sys/unix"

	"imgfuse/imgtool"
	"imgfuse/mounts"
)

// Daemonizing. Go cannot fork a running runtime, so `imgfuse mount`
// re-execs itself (/proc/self/exe) as the daemon child: its Options travel
// whole, as JSON, in DaemonEnv, and a pipe on fd 3 carries its report
// back. The child (setsid, stdio on the log) starts in the caller's
// working directory, so that the image and mountpoint as the user spelled
// them name the same files and its messages name them as the user did;
// it leaves for / once the mount answers, so as not to pin the caller's
// directory. It opens the image, mounts, and writes its report: warning
// lines, then "ok" or its error with its exit code, one JSON object a
// line. The parent exits 0 only after reading "ok".

// DaemonEnv marks the re-executed child; its value is the child's Options
// as JSON.
const DaemonEnv = "IMGFUSE_DAEMON"

// readyFD is the child's end of the readiness pipe.
const readyFD = 3

// daemonReadyTimeout bounds the wait for the child's report. Opening an
// image reads only headers and tables; fusefs.Mount waits at most 10 s.
const daemonReadyTimeout = 60 * time.Second

// report is one line the child writes to its parent: a warning for the
// user's terminal (a read-only mount of a damaged image still succeeds,
// and its parent prints the warning), then either OK or the error, as
// the user is to read it, and its exit code.
type report struct {
	Warning string `json:"warning,omitempty"`
	OK      bool   `json:"ok,omitempty"`
	Error   string `json:"error,omitempty"`
	Code    int    `json:"code,omitempty"`
}

// DaemonChild reports whether this process is the re-executed daemon
// child, and the Options it was given.
func DaemonChild() (*Options, bool) {
	v, ok := os.LookupEnv(DaemonEnv)
	if !ok {
		return nil, false
	}
	// Helpers we run (fusermount3) must not think they are daemons.
	os.Unsetenv(DaemonEnv)
	o := &Options{}
	if json.Unmarshal([]byte(v), o) != nil {
		return nil, false
	}
	return o, true
}

// Start starts the daemon child that serves the mount described by o
// (validated) and waits for its report. On failure it leaves neither a
// child nor a mount behind.
func Start(o *Options) error {
	r, w, err := os.Pipe()
	if err != nil {
		return err
	}
	defer r.Close()
	var logFile *os.File
	if o.LogFile != "" {
		lf, err := os.OpenFile(o.LogFile, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o644)
		if err != nil {
			w.Close()
			return imgtool.Usagef("--log: %v", err)
		}
		logFile = lf
	} else if lf, path, err := mounts.OpenDefaultLog(o.AbsMountpoint); err == nil {
		logFile, o.DefaultLog = lf, path
	}
	// else: no state directory to keep a log in; the daemon's
	// WriteState fails too, and says so (to nowhere) as before.
	child := *o
	dir, err := os.Getwd()
	if err != nil {
		// Nowhere to resolve the user's spelling from: the absolute
		// paths, from /.
		dir, child.Image, child.Mountpoint = "/", o.AbsImage, o.AbsMountpoint
	}
	js, err := child.marshal()
	if err != nil {
		w.Close()
		return err
	}
	// "mount", the image and the mountpoint: what ps shows, and what
	// mounts.ServerRunning looks for in /proc/PID/cmdline.
	cmd := exec.Command("/proc/self/exe", "mount", "--", o.AbsImage, o.AbsMountpoint)
	cmd.Args[0] = os.Args[0]
	cmd.Env = append(os.Environ(), DaemonEnv+"="+js)
	cmd.ExtraFiles = []*os.File{w} // readyFD
	cmd.SysProcAttr = &syscall.SysProcAttr{Setsid: true}
	cmd.Dir = dir
	if logFile != nil {
		defer logFile.Close()
		cmd.Stdout, cmd.Stderr = logFile, logFile
	}
	err = startIOFlusher(cmd)
	w.Close()
	if err != nil {
		return fmt.Errorf("start mount daemon: %w", err)
	}

	last, rerr := readReports(r, daemonReadyTimeout, o.Warn)
	if rerr == nil && last.OK {
		// The child lives on in its own session; init reaps it.
		_ = cmd.Process.Release()
		return nil
	}
	// Failure: make sure the child is gone and no mount is left.
	waitErr := reapChild(cmd, rerr != nil, o.AbsMountpoint)
	hint := ""
	if l := o.logPath(); l != "" {
		hint = " (see " + l + ")"
	}
	switch {
	case rerr != nil:
		return fmt.Errorf("mount daemon did not report within %v; killed it%s", daemonReadyTimeout, hint)
	case last.Error == "":
		return fmt.Errorf("mount daemon exited before reporting (%v)%s", waitErr, hint)
	}
	// The child's error, rendered there (it names the files as the
	// user did), with the exit code it decided.
	return &imgtool.Error{Op: "mount", Path: o.Image, Named: true, Code: last.Code, Err: errors.New(last.Error)}
}

// readReports reads the child's reports until it closes the pipe, handing
// each warning to warn (if not nil), and returns the last report.
func readReports(r *os.File, timeout time.Duration, warn func(string)) (report, error) {
	if err := r.SetReadDeadline(time.Now().Add(timeout)); err != nil {
		return report{}, err
	}
	var last report
	dec := json.NewDecoder(io.LimitReader(r, 64<<10))
	for {
		var rep report
		err := dec.Decode(&rep)
		if err == io.EOF {
			return last, nil
		}
		if err != nil {
			return last, err
		}
		if rep.Warning != "" {
			if warn != nil {
				warn(rep.Warning)
			}
			continue
		}
		last = rep
	}
}

// RunDaemon is the re-executed child: serve the mount, report readiness
// (or the error) on the readiness pipe, return when the mount goes away.
// Its error has been logged; it carries the exit code only.
func RunDaemon(o *Options) error {
	syscall.CloseOnExec(readyFD)
	pipe := os.NewFile(readyFD, "readiness")
	enc := json.NewEncoder(pipe)
	var logw io.Writer = os.Stderr
	if o.DefaultLog != "" {
		logw = newBoundedLog(os.Stderr, o.DefaultLog, mounts.DefaultLogMax, []int{1, 2})
	}
	logger := log.New(logw, "imgfuse: ", log.LstdFlags)
	reported := false
	o.Warn = func(msg string) {
		logger.Print(msg)
		if !reported {
			_ = enc.Encode(report{Warning: msg})
		}
	}
	err := Serve(o, logger, func() {
		logger.Printf("serving %s on %s (pid %d)", o.Image, o.Mountpoint, os.Getpid())
		reported = true
		_ = enc.Encode(report{OK: true})
		pipe.Close()
		_ = os.Chdir("/")
	})
	if err == nil {
		return nil
	}
	if !reported {
		_ = enc.Encode(report{Error: err.Error(), Code: imgtool.Code(err)})
		pipe.Close()
	}
	logger.Print(err)
	return imgtool.ExitStatus{Code: imgtool.Code(err)}
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
	mounts.DetachIfOurs(mountpoint)
	if !exited {
		exited, err = wait(5 * time.Second)
	}
	if !exited {
		return fmt.Errorf("pid %d did not exit after SIGKILL", cmd.Process.Pid)
	}
	return err
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

// RunForeground serves o in this process (--foreground) until the mount
// goes away, logging to stderr or to --log FILE; warnings reach stderr
// either way.
func RunForeground(o *Options, stderr io.Writer) error {
	logw := stderr
	if o.LogFile != "" {
		lf, err := os.OpenFile(o.LogFile, os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o644)
		if err != nil {
			return imgtool.Usagef("--log: %v", err)
		}
		defer lf.Close()
		logw = lf
	}
	logger := log.New(logw, "imgfuse: ", log.LstdFlags)
	if toTerm := o.Warn; o.LogFile != "" && toTerm != nil {
		// stderr gets the warning; the log keeps it too.
		o.Warn = func(msg string) { toTerm(msg); logger.Print(msg) }
	} else {
		o.Warn = func(msg string) { logger.Print(msg) } // the log is stderr
	}
	return Serve(o, logger, func() {
		logger.Printf("mounted %s on %s; Ctrl-C or 'imgfuse unmount %s' to stop", o.Image, o.Mountpoint, o.Mountpoint)
	})
}
