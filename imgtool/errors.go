package imgtool

import (
	"errors"
	"fmt"

	"imgfuse/drivers"
)

// Exit codes. Scripts depend on them: keep them stable. 0, 1 and 2 keep
// the meanings they always had; 3 to 8 refine 1 (a runtime error) for the
// causes scripts branch on. `check` uses qemu-img check's codes instead
// (see Check*).
const (
	ExitOK          = 0 // success
	ExitFailure     = 1 // runtime error not covered by a code below
	ExitUsage       = 2 // bad command line: unknown flag or command, wrong argument count, bad flag value
	ExitOpen        = 3 // the image cannot be opened: missing, unreadable, not in the format asked for
	ExitLocked      = 4 // another process holds a conflicting lock on the image (or a backing file)
	ExitUnsupported = 5 // the image uses a feature imgfuse does not implement, a format it cannot read, or is a URL of a kind imgfuse does not read
	ExitCorrupt     = 6 // the image is corrupt (or marked corrupt, for a writable open)
	ExitMount       = 7 // the FUSE mount failed (mountpoint missing, not empty, a mount; /dev/fuse, fusermount3, permissions)
	ExitFlush       = 8 // the final flush or close failed: data may be missing from the image
)

// Exit codes of `imgfuse check`: qemu-img check's.
const (
	CheckClean       = 0  // no corruption, no leak
	CheckFailed      = 1  // the check could not be run (open error, I/O error, bad command line); ExitUnsupported for a format imgfuse cannot read
	CheckCorrupt     = 2  // corruptions (perhaps leaks too)
	CheckLeaks       = 3  // leaks only
	CheckUnsupported = 63 // the format has nothing to check (raw)
)

// ExitCodesHelp is the table printed in `imgfuse --help` and README.md.
const ExitCodesHelp = `Exit codes:
  0  success
  1  runtime error not listed below
  2  usage error (unknown command or flag, wrong number of arguments, bad flag value)
  3  the image cannot be opened (missing, unreadable, not in the format given)
  4  the image is locked by another process (use --force-share to read it anyway)
  5  the image uses an unsupported feature (encryption, for one), is in a
     format imgfuse recognises but cannot read (QED, Parallels, ...),
     or is a URL imgfuse does not read (nbd://, ftp://, ...; http://,
     https:// and s3:// are read, read-only)
  6  the image is corrupt
  7  the mount failed (mountpoint missing, not empty, or already a mount; FUSE refused)
  8  the final flush failed: data written through the mount may be missing
'imgfuse check' exits as 'qemu-img check' does: 0 clean, 1 check failed
(or usage error), 2 corruptions, 3 leaks only, 63 format without checks;
5 for a format imgfuse cannot read or a URL it does not read.`

// Error is the failure of an operation on a file (an image, a mountpoint),
// built once where the failure is known and rendered once, by Error, at
// the edge: "OP PATH: CAUSE (HINT)". It is the os.PathError of imgfuse's
// commands, with the format and the exit code decided where they are
// known; programs read the fields, never the text.
type Error struct {
	Op     string // "open", "mount", "unmount", "create", "check", "map", "flush", "close", ...
	Path   string // the file, as the user spelled it
	Format string // the image format, if known
	Err    error  // the cause
	// Code is the exit code; 0 derives it from Err (Code).
	Code int
	// Hint ends the message: the way out ("to read it while another
	// process writes it, use --force-share / -U").
	Hint string
	// Named: Err names Path and what was done to it, in the words of
	// the layer that failed (a driver's "qcow2: IMG: ...", package os's
	// "open IMG: ..."), so neither is said again: one prefix per layer,
	// the file named once.
	Named bool
}

func (e *Error) Error() string {
	msg := e.Err.Error()
	if !e.Named {
		msg = e.Op + " " + e.Path + ": " + msg
	}
	if e.Hint != "" {
		msg += " (" + e.Hint + ")"
	}
	return msg
}

func (e *Error) Unwrap() error { return e.Err }

// Errorf is an Error whose cause is a message of this layer.
func Errorf(op, path string, code int, format string, args ...any) *Error {
	return &Error{Op: op, Path: path, Code: code, Err: fmt.Errorf(format, args...)}
}

// DriverError is the failure of op on image reported by a driver (or by
// drivers.Open, package os or aio below it), whose errors name the file
// they are about: the exit code is the driver sentinel's, else fallback.
func DriverError(op, image string, fallback int, err error) *Error {
	return &Error{Op: op, Path: image, Err: err, Named: true, Code: sentinelCode(err, fallback)}
}

// sentinelCode maps the driver sentinels to their exit codes (they are the
// most specific), or returns fallback.
func sentinelCode(err error, fallback int) int {
	switch {
	case errors.Is(err, drivers.ErrLocked):
		return ExitLocked
	case errors.Is(err, drivers.ErrUnsupported):
		return ExitUnsupported
	case errors.Is(err, drivers.ErrCorrupt):
		return ExitCorrupt
	}
	return fallback
}

// UsageError is an error in the command line itself; it exits with
// ExitUsage.
type UsageError struct{ Err error }

func (e UsageError) Error() string { return e.Err.Error() }
func (e UsageError) Unwrap() error { return e.Err }

// Usagef is a UsageError.
func Usagef(format string, args ...any) error {
	return UsageError{fmt.Errorf(format, args...)}
}

// ExitStatus ends a command with Code whatever Err's own code: check exits
// as qemu-img check does. With Err nil the command has said everything
// itself (the daemon, which logged its error; check, which printed its
// report), and the edge prints nothing more.
type ExitStatus struct {
	Code int
	Err  error
}

func (e ExitStatus) Error() string {
	if e.Err == nil {
		return fmt.Sprintf("exit status %d", e.Code)
	}
	return e.Err.Error()
}

func (e ExitStatus) Unwrap() error { return e.Err }

// Code maps an error to the process exit code.
func Code(err error) int {
	var ue UsageError
	var es ExitStatus
	var ie *Error
	switch {
	case err == nil:
		return ExitOK
	case errors.As(err, &es):
		return es.Code
	case errors.As(err, &ue):
		return ExitUsage
	case errors.As(err, &ie) && ie.Code != 0:
		return ie.Code
	}
	return sentinelCode(err, ExitFailure)
}
