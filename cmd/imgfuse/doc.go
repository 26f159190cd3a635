// Command imgfuse mounts a disk image (qcow2, raw, VDI, VHD, VHDX or
// VMDK) as one regular file through FUSE. This package is only the command line: the cobra
// commands, their flags and help, and the edge where an error is rendered
// (once, one line on stderr, "imgfuse: " first) and turned into the exit
// code. What the commands do lives in library packages:
//
//   - imgfuse/session: a mount's lifecycle (options, validation, the
//     daemon, serving, the clean-up stack);
//   - imgfuse/mounts: the mount table, state files, status, holders,
//     unmount;
//   - imgfuse/imgtool: opening images as the commands do, qemu-img
//     compatible info, check, map and create, the exit codes and the
//     Error every command ends with.
//
// Commands: mount, unmount, status, info, check, map, create, demo,
// version, man (the manual pages, generated from these commands by
// cobra/doc), completion (see `imgfuse help`). info, check and map print
// qemu-img's JSON (--output=json) and take qemu-img's flags (-f, -U);
// check exits as qemu-img check does. Exit codes: imgtool.ExitCodesHelp.
//
// main first asks session.DaemonChild whether this process is a mount
// daemon re-executed by `imgfuse mount` (Go cannot fork); if so it runs
// session.RunDaemon instead of the command line.
//
// The demo (demo.go) writes a sample qcow2 chain embedded in the binary
// and mounts it read-only through session, removing everything it created
// once the server exits.
package main
