// Package session is one mount's lifecycle: the options (Options, one
// struct, handed whole to the daemon child as JSON), the checks made
// before a daemon starts (Validate: the image, the format, the
// mountpoint), the daemon (Start in the parent, RunDaemon in the child,
// RunForeground for --foreground), and Serve: open the image or its
// overlay, mount, record the state file and pid file, serve, and at the
// end flush and close.
//
// One clean-up stack. Serve pushes the release of everything it acquires
// (signal handlers, the demo's files, the overlay, the open image, the
// mount, the state file, the pid file) onto a stack that runs on every
// way out, last pushed first; the steps whose release must follow the
// image's close (the state file, which carries a close error to
// 'imgfuse unmount'; the pid file, whose removal scripts wait for) are
// pushed before the image is opened. A failed open, a refused mount, a
// --pidfile that cannot be written and the end of serving all leave by
// the same path, so an overlay is never left behind by one of them.
//
// The daemon child starts in the caller's working directory with the
// paths as the user spelled them, so that its messages name the image as
// the user did without rewriting them; it moves to / once the mount
// answers. It reports to the parent over a pipe, one JSON object a line:
// warnings for the user's terminal, then "ok" or the error as rendered
// and its exit code.
//
// Errors are imgtool.Error values, built where the failure is known; the
// hint a writable open gets when a read-only one works is decided from
// the driver's sentinels and types (drivers.DamageError), never from its
// words.
//
// Concurrency: the FUSE server's goroutines (in fusefs), and in Serve one
// goroutine that turns srv.Wait into a channel; the serving loop alone
// touches the session's state.
package session
