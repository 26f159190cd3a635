package main

import (
	"errors"
	"strconv"
	"strings"

	"imgfuse/drivers"
)

// Exit codes. Scripts depend on them: keep them stable. 0, 1 and 2 keep
// the meanings they always had; 3 to 8 refine 1 (a runtime error) for the
// causes scripts branch on. `check` uses qemu-img check's codes instead
// (see checkExit*).
const (
	exitOK          = 0 // success
	exitFailure     = 1 // runtime error not covered by a code below
	exitUsage       = 2 // bad command line: unknown flag or command, wrong argument count, bad flag value
	exitOpen        = 3 // the image cannot be opened: missing, unreadable, not in the format asked for
	exitLocked      = 4 // another process holds a conflicting lock on the image (or a backing file)
	exitUnsupported = 5 // the image uses a feature imgfuse does not implement, or a format it cannot read
	exitCorrupt     = 6 // the image is corrupt (or marked corrupt, for a writable open)
	exitMount       = 7 // the FUSE mount failed (mountpoint missing, not empty, a mount; /dev/fuse, fusermount3, permissions)
	exitFlush       = 8 // the final flush or close failed: data may be missing from the image
)

// exitCodesHelp is the table printed in `imgfuse --help` and README.md.
const exitCodesHelp = `Exit codes:
  0  success
  1  runtime error not listed below
  2  usage error (unknown command or flag, wrong number of arguments, bad flag value)
  3  the image cannot be opened (missing, unreadable, not in the format given)
  4  the image is locked by another process (use --force-share to read it anyway)
  5  the image uses an unsupported feature (encryption, for one), or is in a
     format imgfuse recognises but cannot read (VMDK, VHDX, ...)
  6  the image is corrupt
  7  the mount failed (mountpoint missing, not empty, or already a mount; FUSE refused)
  8  the final flush failed: data written through the mount may be missing
'imgfuse check' exits as 'qemu-img check' does: 0 clean, 1 check failed
(or usage error), 2 corruptions, 3 leaks only, 63 format without checks;
5 for a format imgfuse cannot read.`

// codedError carries an error and the exit code it maps to.
type codedError struct {
	code int
	err  error
}

func (e codedError) Error() string { return e.err.Error() }
func (e codedError) Unwrap() error { return e.err }

// openError marks err, the failure to open an image, as exitOpen unless a
// driver sentinel says more (lock, unsupported feature, corruption).
func openError(err error) error {
	if err == nil {
		return nil
	}
	return codedError{exitOpen, err}
}

// mountFailed marks err as a failure of the FUSE mount itself.
func mountFailed(err error) error { return codedError{exitMount, err} }

// flushFailed marks err as a failed final flush or close.
func flushFailed(err error) error { return codedError{exitFlush, err} }

// exitCode maps an error to the process exit code: the driver sentinels
// first (they are the most specific), then the code a command attached.
func exitCode(err error) int {
	var ue usageError
	var ee exitError
	var ce codedError
	switch {
	case err == nil:
		return exitOK
	case errors.As(err, &ee):
		return ee.code
	case errors.As(err, &ue):
		return exitUsage
	case errors.Is(err, drivers.ErrLocked):
		return exitLocked
	case errors.Is(err, drivers.ErrUnsupported):
		return exitUnsupported
	case errors.Is(err, drivers.ErrCorrupt):
		return exitCorrupt
	case errors.As(err, &ce):
		return ce.code
	}
	return exitFailure
}

// The mount daemon reports a failure to its parent through a pipe as text;
// reportPrefix and the exit code in front of the message carry the code
// across: "E6 open disk.qcow2: ...".
const reportPrefix = "E"

func encodeReport(err error) string {
	return reportPrefix + strconv.Itoa(exitCode(err)) + " " + err.Error()
}

// decodeReport turns a report back into an error with its exit code. A
// report without a code (an older daemon) is a plain runtime error.
func decodeReport(msg string) error {
	msg = strings.TrimSpace(msg)
	if rest, ok := strings.CutPrefix(msg, reportPrefix); ok {
		if num, text, ok := strings.Cut(rest, " "); ok {
			if code, err := strconv.Atoi(num); err == nil && code > exitUsage && code < 64 {
				return codedError{code, errors.New(text)}
			}
		}
	}
	return errors.New(msg)
}
