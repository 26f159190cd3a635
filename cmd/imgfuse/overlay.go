package main

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"

	"imgfuse/drivers"
	"imgfuse/drivers/qcow2"
)

// Throw-away writes (mount --overlay, like qemu-nbd -s). The daemon opens
// the image read-only, creates a qcow2 overlay whose backing file is the
// image (absolute name, the image's format recorded as the backing format)
// and serves the overlay writable. Every write lands in the overlay; the
// image is only ever read, through a read-only descriptor holding the
// same locks as any read-only QEMU user (consistent read; write and resize
// refused to others), so `qemu-img info` and other read-only mounts work
// meanwhile and no writer can change the image under the overlay.
//
// The temporary overlay lives in overlayTempDir, the directory QEMU uses
// for its own temporary overlays, and is removed when the daemon exits
// (unmount, signal, or a failed mount). A daemon killed with SIGKILL
// cannot remove it: its path is in the state file, and `imgfuse unmount`
// of the dead mount removes it. --overlay-keep FILE creates the overlay at
// FILE instead and keeps it.

// overlayPrefix starts the name of every temporary overlay: a state file
// naming anything else as a temporary overlay is not trusted with a
// removal.
const overlayPrefix = "imgfuse-overlay-"

// overlayTempDir is $TMPDIR, or /var/tmp as QEMU's get_tmp_filename uses
// (disk-backed, unlike a tmpfs /tmp, and writable by every user), or the
// system temp dir if there is no /var/tmp.
func overlayTempDir() string {
	if d := os.Getenv("TMPDIR"); d != "" {
		return d
	}
	if fi, err := os.Stat("/var/tmp"); err == nil && fi.IsDir() {
		return "/var/tmp"
	}
	return os.TempDir()
}

// createOverlay creates the overlay over base (absolute path, in format
// baseFormat, virtual size size): at keep, which must not exist, or at a
// new temporary file. It returns the overlay's path.
func createOverlay(base, baseFormat string, size int64, keep string) (string, error) {
	var path string
	if keep != "" {
		f, err := os.OpenFile(keep, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o644)
		if err != nil {
			return "", fmt.Errorf("--overlay-keep: %w", err)
		}
		f.Close()
		path = keep
	} else {
		f, err := os.CreateTemp(overlayTempDir(), overlayPrefix+"*.qcow2")
		if err != nil {
			return "", fmt.Errorf("create overlay: %w", err)
		}
		f.Close()
		path = f.Name()
	}
	err := qcow2.Create(path, qcow2.CreateOptions{Size: size, BackingFile: base, BackingFormat: baseFormat})
	if err != nil {
		os.Remove(path)
		return "", fmt.Errorf("create overlay %s: %w", path, err)
	}
	return path, nil
}

// isTempOverlay reports whether path may be removed as a temporary
// overlay recorded in a state file.
func isTempOverlay(path string) bool {
	return filepath.IsAbs(path) && strings.HasPrefix(filepath.Base(path), overlayPrefix) &&
		strings.HasSuffix(path, ".qcow2")
}

// removeStaleState removes the state file of a server that is gone, its
// --pidfile if that still holds its pid (a stale pid file could make a
// script signal whatever process gets the pid next), and the temporary
// overlay it recorded; it returns the overlay removed, if any.
func removeStaleState(dir, mp string, st daemonState) string {
	os.Remove(statePath(dir, mp))
	if st.PIDFile != "" {
		if b, err := os.ReadFile(st.PIDFile); err == nil && strings.TrimSpace(string(b)) == strconv.Itoa(st.PID) {
			os.Remove(st.PIDFile)
		}
	}
	if st.OverlayTemporary && isTempOverlay(st.Overlay) && os.Remove(st.Overlay) == nil {
		return st.Overlay
	}
	return ""
}

// openOverlay opens the image read-only (so that lock conflicts, missing
// files and corruption are reported against the image), creates the
// overlay over it and opens that writable. The image's own descriptor is
// closed once the overlay holds the image through its backing chain. On
// failure nothing is left: no overlay file, no open image.
func openOverlay(o *mountOptions, format string, opts drivers.OpenOptions) (drivers.Driver, string, error) {
	bopts := opts
	bopts.ReadOnly, bopts.Growable, bopts.LazyRefcounts = true, false, false
	base, _, err := drivers.Open(o.image, format, bopts)
	if err != nil {
		// --force-share cannot help: the overlay needs an image that
		// nobody changes under it.
		msg := strings.Replace(describeOpenError(o.image, err).Error(), forceShareHint,
			" (--overlay needs an image no other process writes)", 1)
		return nil, "", openError(fmt.Errorf("%s%w", msg, sentinelOf(err)))
	}
	defer base.Close()
	absImage := o.absImage
	if absImage == "" {
		if absImage, err = filepath.Abs(o.image); err != nil {
			return nil, "", err
		}
	}
	path, err := createOverlay(absImage, format, base.Size(), o.overlayKeep)
	if err != nil {
		return nil, "", err
	}
	d, _, err := drivers.Open(path, "qcow2", opts)
	if err != nil {
		os.Remove(path)
		return nil, "", openError(describeOpenError(path, err))
	}
	return d, path, nil
}
