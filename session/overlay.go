package session

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"imgfuse/drivers"
	"imgfuse/drivers/qcow2"
	"imgfuse/imgtool"
	"imgfuse/mounts"
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
// The temporary overlay lives in one of overlayTempDirs, the directory QEMU uses
// for its own temporary overlays, and is removed when the daemon exits
// (unmount, signal, or a failed mount). A daemon killed with SIGKILL
// cannot remove it: its path is in the state file, and `imgfuse unmount`
// of the dead mount removes it. --overlay-keep FILE creates the overlay at
// FILE instead and keeps it.

// overlayTempDirs are the directories a temporary overlay may go to, in
// turn: $TMPDIR, then /var/tmp as QEMU's get_tmp_filename uses
// (disk-backed, unlike a tmpfs /tmp, and writable by every user), then the
// system temp dir. A $TMPDIR that is missing or not writable is passed
// over, not fatal.
func overlayTempDirs() []string {
	var dirs []string
	if d := os.Getenv("TMPDIR"); d != "" {
		dirs = append(dirs, d)
	}
	return append(dirs, "/var/tmp", "/tmp")
}

// createTempOverlay creates an empty temporary overlay file in the first
// of overlayTempDirs that takes it.
func createTempOverlay() (string, error) {
	var errs []error
	for _, dir := range overlayTempDirs() {
		f, err := os.CreateTemp(dir, mounts.OverlayPrefix+"*.qcow2")
		if err == nil {
			f.Close()
			return f.Name(), nil
		}
		errs = append(errs, err)
	}
	return "", fmt.Errorf("create overlay: no temporary directory takes it: %w", errors.Join(errs...))
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
		var err error
		if path, err = createTempOverlay(); err != nil {
			return "", err
		}
	}
	err := qcow2.Create(path, qcow2.CreateOptions{Size: size, BackingFile: base, BackingFormat: baseFormat})
	if err != nil {
		os.Remove(path)
		return "", fmt.Errorf("create overlay %s: %w", path, err)
	}
	return path, nil
}

// openOverlay opens the image read-only (so that lock conflicts, missing
// files and corruption are reported against the image), creates the
// overlay over it and opens that writable. The image's own descriptor is
// closed once the overlay holds the image through its backing chain. The
// overlay is removed by the clean-up stack: a temporary one always, a kept
// one (--overlay-keep) when the mount never answered.
func (s *session) openOverlay(format string, opts drivers.OpenOptions) error {
	o := s.o
	bopts := opts
	bopts.ReadOnly, bopts.Growable, bopts.LazyRefcounts = true, false, false
	base, _, err := drivers.Open(o.Image, format, bopts)
	if err != nil {
		e := imgtool.OpenFailed(o.Image, err)
		if e.Hint != "" {
			// --force-share cannot help: the overlay needs an image
			// that nobody changes under it.
			e.Hint = "--overlay needs an image no other process writes"
		}
		return e
	}
	defer base.Close()
	absImage := o.AbsImage
	if absImage == "" {
		if absImage, err = filepath.Abs(o.Image); err != nil {
			return err
		}
	}
	path, err := createOverlay(absImage, format, base.Size(), o.OverlayKeep)
	if err != nil {
		return err
	}
	s.overlay = path
	s.undo.push(func(err error) error {
		if o.OverlayKeep == "" || !s.ready {
			if rerr := os.Remove(path); rerr != nil && o.OverlayKeep == "" {
				s.log.Printf("remove overlay: %v", rerr)
			}
		}
		return err
	})
	d, _, err := drivers.Open(path, "qcow2", opts)
	if err != nil {
		return imgtool.OpenFailed(path, err)
	}
	s.d = d
	return nil
}
