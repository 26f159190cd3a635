// Package imgtool is imgfuse's qemu-img side: opening an image as the
// commands do (the list of formats, the refusal of formats imgfuse
// recognises but cannot read, the check of an explicit --format against
// the file's contents), the qemu-img-compatible rendering of info, check,
// map and create (JSON key for key, the human output line for line), and
// the vocabulary every command ends with: the exit codes and the Error
// that carries one.
//
// Errors are values. A failure is built once, where it is known, as an
// *Error (operation, path as the user spelled it, format, cause, exit
// code, hint) and rendered once, by the command line's edge, as one line:
// "OP PATH: CAUSE (HINT)". A cause from a driver, package os or aio names
// its file and operation itself ("open IMG: no such file or directory",
// "qcow2: IMG: ...") and is then not prefixed again (Error.Named): one
// prefix per layer, the image named once. Exit codes come from the driver
// sentinels (drivers.ErrLocked 4, ErrUnsupported 5, ErrCorrupt 6) unless
// the code that built the Error decided one; nothing here reads an
// error's text to decide anything (tests/lint_test.go enforces it).
//
// Why qemu-img's shapes: scripts written for qemu-img run unchanged
// against imgfuse (info --output=json key for key, check's exit codes 0,
// 1, 2, 3 and 63, map's JSON runs merged as qemu-img merges them, create's
// "Formatting" line); imgfuse's own additions live under the "imgfuse"
// key so that a strict consumer of QEMU's schema sees nothing unknown.
//
// Concurrency: none. Every function opens what it needs, uses it from the
// calling goroutine (map enters one coroutine per lookup through
// coroutine.Run) and closes it before returning.
package imgtool
