package session

import (
	"errors"
	"fmt"
	"io"
	"log"
	"os"
	"os/signal"
	"path/filepath"
	"reflect"
	"strconv"
	"strings"
	"syscall"
	"time"

	"imgfuse/aio"
	"imgfuse/coroutine"
	"imgfuse/drivers"
	"imgfuse/fusefs"
	"imgfuse/imgtool"
	"imgfuse/mounts"
	"imgfuse/remote"
)

// checkWriteFlags refuses write-path flags on a mount that cannot write:
// silently ignoring them would hide a mistake in a script.
func (o *Options) checkWriteFlags() error {
	for _, f := range []struct {
		name string
		set  bool
	}{
		{"--overlay", o.Overlay},
		{"--overlay-keep", o.OverlayKeep != ""},
		{"--growable", o.Growable},
		{"--lazy-refcounts", o.LazyRefcounts},
	} {
		if !f.set {
			continue
		}
		switch {
		case o.ReadOnly:
			return imgtool.Usagef("%s needs a writable mount, not --read-only", f.name)
		case o.Snapshot != "":
			return imgtool.Usagef("%s needs a writable mount; --snapshot is read-only", f.name)
		case o.ForceShare:
			return imgtool.Usagef("%s needs a writable mount; --force-share is read-only", f.name)
		}
	}
	return nil
}

// Validate checks, in the calling process, what can be checked before
// starting a daemon, so that common mistakes fail fast with a clear message.
func (o *Options) Validate() error {
	// A log file that cannot be made is a bad flag value, as a
	// --pidfile in a missing directory is.
	if o.LogFile != "" {
		if fi, err := os.Stat(filepath.Dir(o.LogFile)); err != nil || !fi.IsDir() {
			return imgtool.Usagef("--log %s: no such directory %s", o.LogFile, filepath.Dir(o.LogFile))
		}
		// Absolute: the daemon records it in its state file, for status.
		if abs, err := filepath.Abs(o.LogFile); err == nil {
			o.LogFile = abs
		}
	}
	if err := imgtool.RefuseRemote(o.Image); err != nil {
		return err
	}
	if !imgtool.IsRemote(o.Image) {
		if err := o.validateLocalImage(); err != nil {
			return err
		}
		return o.validateRest()
	}
	o.AbsImage = o.Image
	readOnly := !o.overlayed() && !o.ReadOnly
	if readOnly {
		o.ReadOnly = true
	}
	if err := o.validateRest(); err != nil {
		return err
	}
	if readOnly && o.Warn != nil {
		o.Warn(o.Image + " is a remote image: mounted read-only (--overlay sends writes to a local overlay)")
	}
	return nil
}

// validateLocalImage checks that the image is a file that can be opened.
func (o *Options) validateLocalImage() error {
	// OpenHead refuses, without blocking, what cannot be an image: a
	// FIFO would block the plain open below for ever.
	head, err := aio.OpenHead(o.Image)
	if err != nil {
		return imgtool.OpenFailed(o.Image, err) // "IMAGE: is a FIFO, not a regular file or block device"
	}
	head.Close()
	f, err := os.Open(o.Image)
	if err != nil {
		return imgtool.OpenFailed(o.Image, err) // "open IMAGE: no such file or directory"
	}
	f.Close()
	if o.AbsImage, err = filepath.Abs(o.Image); err != nil {
		return err
	}
	return nil
}

// validateRest is Validate once the image is known to be there.
func (o *Options) validateRest() error {
	if err := imgtool.CheckFormat(o.Image, o.Format); err != nil {
		return err
	}
	format, err := imgtool.ResolveFormat(o.Image, o.Format)
	if err != nil {
		return err
	}
	if err := o.validateMountpoint(format); err != nil {
		return &imgtool.Error{Op: "mount", Path: o.Mountpoint, Named: true, Code: imgtool.ExitMount, Err: err}
	}
	if o.Snapshot != "" && format == "raw" {
		return &imgtool.Error{Op: "mount", Path: o.Image, Named: true,
			Err: fmt.Errorf("--snapshot: %s is a raw image, which has no snapshots", o.Image)}
	}
	if o.Snapshot != "" {
		if err := imgtool.CheckSnapshot(o.Image, format, o.Snapshot); err != nil {
			return err
		}
	}
	if o.LazyRefcounts && format == "raw" && !o.overlayed() {
		return &imgtool.Error{Op: "mount", Path: o.Image, Named: true,
			Err: fmt.Errorf("--lazy-refcounts: %s is a raw image, which has no refcounts", o.Image)}
	}
	if o.CacheSize != "" {
		if _, err := imgtool.ParseSize(o.CacheSize); err != nil {
			return imgtool.Usagef("--cache-size: %v", err)
		}
	}
	if o.OverlayKeep != "" {
		if o.OverlayKeep, err = filepath.Abs(o.OverlayKeep); err != nil {
			return err
		}
		if _, err := os.Lstat(o.OverlayKeep); err == nil {
			return imgtool.Usagef("--overlay-keep %s: the file exists; refusing to overwrite it", o.OverlayKeep)
		}
		if fi, err := os.Stat(filepath.Dir(o.OverlayKeep)); err != nil || !fi.IsDir() {
			return imgtool.Usagef("--overlay-keep %s: no such directory %s", o.OverlayKeep, filepath.Dir(o.OverlayKeep))
		}
	}
	if o.PIDFile != "" {
		if o.PIDFile, err = filepath.Abs(o.PIDFile); err != nil {
			return err
		}
		if fi, err := os.Stat(filepath.Dir(o.PIDFile)); err != nil || !fi.IsDir() {
			return imgtool.Usagef("--pidfile %s: no such directory %s", o.PIDFile, filepath.Dir(o.PIDFile))
		}
	}
	return nil
}

// validateMountpoint checks that the mountpoint exists, can take a mount,
// is not a file of the image's chain and, unless --nonempty, hides
// nothing: the same rules for a directory and a regular file. It changes
// nothing, so a refusal leaves everything as it was.
func (o *Options) validateMountpoint(format string) error {
	mi, err := os.Stat(o.Mountpoint)
	switch {
	case errors.Is(err, syscall.ENOTCONN) || mounts.IsDead(o.Mountpoint):
		return fmt.Errorf("mountpoint %s is a dead mount (its server has exited); run 'imgfuse unmount %s' first",
			o.Mountpoint, o.Mountpoint)
	case errors.Is(err, os.ErrNotExist):
		return fmt.Errorf("mountpoint %s does not exist (create a directory or an empty file there)", o.Mountpoint)
	case err != nil:
		return fmt.Errorf("mountpoint: %w", err)
	case !mi.IsDir() && !mi.Mode().IsRegular():
		return fmt.Errorf("mountpoint %s is neither a directory nor a regular file", o.Mountpoint)
	}
	if o.AbsMountpoint, err = mounts.CanonicalPath(o.Mountpoint); err != nil {
		return fmt.Errorf("mountpoint: %w", err)
	}
	e, mounted, err := mounts.Find(o.AbsMountpoint)
	if err != nil {
		return fmt.Errorf("mountpoint: %w", err)
	}
	if mounted {
		return fmt.Errorf("mountpoint %s is already a mount (%s, type %s); unmount it first or choose another",
			o.Mountpoint, e.Source, e.FSType)
	}
	if mi.Mode().IsRegular() {
		// Not even --nonempty: the mount would cover a file the image
		// itself is made of.
		if err := o.checkNotInChain(mi, format); err != nil {
			return err
		}
	}
	switch {
	case o.NonEmpty:
	case mi.IsDir():
		if name, err := firstEntry(o.Mountpoint); err != nil {
			return fmt.Errorf("mountpoint: %w", err)
		} else if name != "" {
			return fmt.Errorf("mountpoint %s is not empty (it holds %s); the mount would hide its files: "+
				"choose an empty directory, or give --nonempty", o.Mountpoint, name)
		}
	case mi.Size() > 0:
		return fmt.Errorf("mountpoint %s is a file of %d bytes; the mount would hide its contents: "+
			"choose an empty file or a directory, or give --nonempty", o.Mountpoint, mi.Size())
	}
	return nil
}

// checkNotInChain refuses a regular-file mountpoint (mi) that is the
// image, its external data file or a file of its backing chain, however
// it is reached (a hard link, a symbolic link): compared by device and
// inode. The chain is read from a read-only open without image locks,
// closed at once; an image that does not open is compared alone (its
// mount fails at its own open, before mounting).
func (o *Options) checkNotInChain(mi os.FileInfo, format string) error {
	files := []drivers.ChainFile{{Path: o.Image, Role: "image"}}
	opts := drivers.OpenOptions{ReadOnly: true, ForceShare: true, NoDataFile: true, Formats: imgtool.Formats()}
	if d, _, err := drivers.Open(o.Image, format, opts); err == nil {
		if fl := drivers.FilesOf(d); len(fl) > 0 {
			files = fl
		}
		d.Close()
	}
	for _, f := range files {
		fi, err := os.Stat(f.Path)
		if err != nil || !os.SameFile(mi, fi) {
			continue
		}
		what := "the image itself"
		if f.Role != "image" {
			what = fmt.Sprintf("the %s of %s (%s)", f.Role, f.Of, f.Path)
		}
		return fmt.Errorf("mountpoint %s is %s: the mount would hide a file of the image it serves behind its own disk; "+
			"choose another mountpoint (--nonempty does not allow this)", o.Mountpoint, what)
	}
	return nil
}

// firstEntry returns the name of one entry of directory dir, "" if it is
// empty.
func firstEntry(dir string) (string, error) {
	f, err := os.Open(dir)
	if err != nil {
		return "", err
	}
	defer f.Close()
	names, err := f.Readdirnames(1)
	if errors.Is(err, io.EOF) {
		return "", nil
	}
	if err != nil {
		return "", err
	}
	return names[0], nil
}

// Serve opens the image, mounts it, calls ready once the mount answers,
// and serves until the mount goes away (SIGINT/SIGTERM/SIGHUP unmount it;
// so does an external umount). It then flushes and closes the image.
// Errors before ready are returned for the caller to report; later ones
// are logged and also returned.
//
// Everything Serve acquires is released by one clean-up stack, on every
// way out: a failed open, a failed mount, a failed --pidfile, the end of
// serving.
func Serve(o *Options, logger *log.Logger, ready func()) (err error) {
	s := &session{o: o, log: logger}
	defer func() { err = s.undo.run(err) }()

	// URLs (the image, or a backing file of it) are fetched through
	// the mount's own set of remote objects, closed with it.
	s.remote = remote.NewObjects(o.Remote)
	remote.Install(s.remote)
	if o.Prefetch {
		s.remote.PrefetchAll()
	}
	s.undo.push(func(err error) error { s.remote.Close(); return err })

	// Catch signals before mounting so that none can kill us with the
	// mount up and the image dirty. SIGHUP too: a --foreground server
	// whose terminal goes away stops like one interrupted (the daemon
	// has no terminal to lose).
	sigs := make(chan os.Signal, 2)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM, syscall.SIGHUP)
	s.undo.push(func(err error) error { signal.Stop(sigs); return err })
	// Whatever happens, the demo's files go once the image is closed.
	s.undo.push(func(err error) error { removePaths(o.RemoveOnExit, logger); return err })
	// Pushed now, run after the image is closed (the stack runs last
	// first): a script waiting for the pid file to go, or 'imgfuse
	// unmount' for the state file, then finds the image closed.
	s.undo.push(s.removePIDFile)
	s.undo.push(s.finishState)

	if err := s.open(); err != nil {
		return err
	}
	if err := s.mount(); err != nil {
		return err
	}
	s.writeState()
	if o.PIDFile != "" {
		if err := writePIDFile(o.PIDFile, s.state.PID); err != nil {
			// A script waiting for the pid file would wait for ever:
			// fail the mount instead.
			return &imgtool.Error{Op: "--pidfile", Path: o.PIDFile, Named: true, Code: imgtool.ExitMount, Err: err}
		}
		s.pidWritten = true
	}
	s.ready = true
	ready()
	s.serve(sigs)
	return nil
}

// session is one mount being served.
type session struct {
	o   *Options
	log *log.Logger
	// undo is the clean-up stack.
	undo cleanups
	// ready: the mount answered and the caller was told so.
	ready bool

	format  string
	d       drivers.Driver
	overlay string // the overlay file, "" without one
	srv     *fusefs.Server
	mp      string // the canonical mountpoint

	remote *remote.Objects

	state     mounts.State
	statePath string // "" if the state file could not be written
	// closeErr is the final flush or close error.
	closeErr   error
	pidWritten bool
}

// cleanups is a clean-up stack: each function releases one thing, is given
// the error the session ends with and returns it, perhaps joined with its
// own.
type cleanups []func(error) error

func (c *cleanups) push(f func(error) error) { *c = append(*c, f) }

// run calls the functions, last pushed first.
func (c *cleanups) run(err error) error {
	for i := len(*c) - 1; i >= 0; i-- {
		err = (*c)[i](err)
	}
	*c = nil
	return err
}

// open opens the image (or creates and opens the overlay over it).
func (s *session) open() error {
	o := s.o
	format, err := imgtool.ResolveFormat(o.Image, o.Format)
	if err != nil {
		return err
	}
	ro := o.ReadOnlyMount()
	opts := drivers.OpenOptions{
		ReadOnly:      ro,
		Formats:       imgtool.Formats(),
		Snapshot:      o.Snapshot,
		NoDirectIO:    o.NoDirectIO,
		ForceShare:    o.ForceShare,
		Growable:      o.Growable && !ro,
		LazyRefcounts: o.LazyRefcounts && !ro,
		// The format was probed just above: a probed raw image guards
		// its first sector (drivers.OpenOptions.Probed).
		Probed: o.Format == "" || o.Format == "auto",
		Logf:   s.log.Printf,
	}
	if o.CacheSize != "" {
		if opts.CacheSize, err = imgtool.ParseSize(o.CacheSize); err != nil {
			return imgtool.Usagef("--cache-size: %v", err)
		}
	}
	if o.overlayed() {
		if err := s.openOverlay(format, opts); err != nil {
			return err
		}
		s.log.Printf("writes go to the overlay %s", s.overlay)
	} else {
		d, f, err := drivers.Open(o.Image, format, opts)
		if err != nil {
			return explainWritableOpen(o.Image, format, opts, imgtool.OpenFailed(o.Image, err))
		}
		s.d, format = d, f.Name()
	}
	s.format = format
	s.undo.push(func(err error) error { return errors.Join(err, s.closeImage()) })
	if dmg := drivers.DamageOf(s.d); dmg != nil {
		// The open went on (read-only, or damage below a writable top
		// that never writes there): say so now, not at the first EIO.
		msg := damageWarning(o.Image, dmg)
		if o.Warn != nil {
			o.Warn(msg)
		} else {
			s.log.Print(msg)
		}
	}
	return nil
}

// mount mounts the open image.
func (s *session) mount() error {
	o := s.o
	var mtime time.Time
	if fi, err := os.Stat(o.Image); err == nil {
		mtime = fi.ModTime()
	}
	if o.AbsImage == "" {
		o.AbsImage, _ = filepath.Abs(o.Image)
	}
	if s.mp = o.AbsMountpoint; s.mp == "" {
		s.mp, _ = mounts.CanonicalPath(o.Mountpoint)
	}
	srv, err := fusefs.Mount(s.mp, s.d, fusefs.Options{
		Name:       o.Name,
		ReadOnly:   o.ReadOnlyMount(),
		Growable:   o.Growable && !o.ReadOnlyMount(),
		AllowOther: o.AllowOther,
		ModTime:    mtime,
		FSName:     "imgfuse:" + o.AbsImage,
		Debug:      o.Debug,
		Logger:     s.log,

		NoPassthrough: o.NoPassthrough,
		IOURing:       o.IOURing,
	})
	if err != nil {
		// fusermount3's own words (fusefs.FusermountError) are the
		// reason, on one line.
		var fe *fusefs.FusermountError
		if errors.As(err, &fe) {
			err = fe
		}
		return &imgtool.Error{Op: "mount", Path: o.Mountpoint, Code: imgtool.ExitMount, Err: err}
	}
	s.srv = srv
	s.undo.push(func(err error) error {
		// Still mounted only when serving never began.
		if !s.ready {
			_ = srv.Unmount()
		}
		srv.Wait()
		return err
	})
	passthrough := passthroughState(srv, o.NoPassthrough)
	s.log.Printf("passthrough: %s", passthrough)
	s.log.Printf("serving requests: %s", srv.Mode)
	s.state = mounts.State{
		PID: os.Getpid(), UID: mounts.UIDOf(os.Geteuid()), Image: o.AbsImage, Mountpoint: s.mp,
		Format: s.format, ReadOnly: o.ReadOnlyMount(), Passthrough: passthrough,
		Overlay: s.overlay, OverlayTemporary: s.overlay != "" && o.OverlayKeep == "",
		ServingMode: srv.Mode, PIDFile: o.PIDFile,
		Started: time.Now().UTC(),
		Log:     o.logPath(),
	}
	return nil
}

// writeState records the mount in its state file, for unmount and status.
func (s *session) writeState() {
	s.state.Remote = s.remote.Stats()
	path, err := mounts.WriteState(mounts.StateDir(), s.state)
	if err != nil {
		s.log.Printf("warning: %v ('imgfuse unmount' will not wait for this process)", err)
		return
	}
	s.statePath = path
}

// finishState leaves a close error in the state file, where 'imgfuse
// unmount', waiting for us to exit, finds it; a clean close removes the
// file.
func (s *session) finishState(err error) error {
	if s.statePath == "" {
		return err
	}
	if s.closeErr != nil && s.ready {
		s.state.CloseError = s.closeErr.Error()
		if _, werr := mounts.WriteState(mounts.StateDir(), s.state); werr == nil {
			return err
		}
	}
	os.Remove(s.statePath)
	return err
}

// removePIDFile removes the --pidfile if it still holds our pid (another
// server may have been started with the same --pidfile since).
func (s *session) removePIDFile(err error) error {
	if s.pidWritten {
		removePIDFile(s.o.PIDFile, s.state.PID)
	}
	return err
}

// serve serves until the mount goes away, publishing I/O errors in the
// state file and unmounting on a signal.
func (s *session) serve(sigs <-chan os.Signal) {
	srv := s.srv
	served := make(chan struct{})
	go func() {
		srv.Wait()
		close(served)
	}()
	// I/O errors reach 'imgfuse status' through the state file, rewritten
	// when they happen: at once for the first of a while, then at most
	// every ioErrorPublishEvery (a dd over a damaged range fails every
	// request).
	// A remote image's counters likewise, every second while they change.
	var remoteTick <-chan time.Time
	var lastRemote []remote.Stats
	if len(s.remote.Stats()) > 0 {
		t := time.NewTicker(time.Second)
		defer t.Stop()
		remoteTick = t.C
	}
	var publishTimer <-chan time.Time
	var published time.Time
	publish := func() {
		st := srv.IOErrors()
		s.state.IOErrors, s.state.LastIOError = st.Count, ioErrorStateOf(st.Last)
		s.state.Remote = s.remote.Stats()
		published = time.Now()
		if s.statePath != "" {
			if _, werr := mounts.WriteState(mounts.StateDir(), s.state); werr != nil {
				s.log.Printf("warning: %v (status will not show the I/O errors)", werr)
			}
		}
	}
	for {
		select {
		case <-srv.IOErrorNotify():
			if publishTimer == nil {
				if wait := ioErrorPublishEvery - time.Since(published); wait > 0 {
					publishTimer = time.After(wait)
				} else {
					publish()
				}
			}
		case <-remoteTick:
			if now := s.remote.Stats(); !reflect.DeepEqual(now, lastRemote) {
				lastRemote = now
				publish()
			}
		case <-publishTimer:
			publishTimer = nil
			publish()
		case sig := <-sigs:
			s.log.Printf("%v: unmounting %s", sig, s.mp)
			if err := srv.Unmount(); err != nil {
				// Typically EBUSY: a loop device still holds the disk.
				// Dropping the mount would fail the loop device's I/O,
				// so keep serving. BusyReason reads only /proc and
				// /sys, never the mount we serve.
				why := "free the disk, then retry"
				if e, ok, _ := mounts.Find(s.mp); ok {
					why = mounts.BusyReason(e, s.mp)
				}
				s.log.Printf("%s; still serving: %s", oneLine(err.Error()), why)
			}
		case <-served:
			// The errors of the last moments go with a close error.
			st := srv.IOErrors()
			s.state.IOErrors, s.state.LastIOError = st.Count, ioErrorStateOf(st.Last)
			return
		}
	}
}

// oneLine puts a message on one line (go-fuse's fusermount error ends in
// a newline; a file name may hold one).
func oneLine(msg string) string { return strings.Join(strings.Fields(msg), " ") }

// closeImage flushes the image and then closes it, even if the flush
// failed: the descriptors and image locks must go whatever happened. A
// flush error is logged at once (before the close, which may take time or
// fail too). The error (ExitFlush) is kept in s.closeErr for the state
// file.
func (s *session) closeImage() error {
	name := s.o.Image
	if s.overlay != "" {
		name = s.overlay
	}
	var ferr error
	coroutine.Run(func(co *coroutine.Co) { ferr = s.d.Flush(co) })
	if ferr != nil {
		ferr = &imgtool.Error{Op: "flush", Path: name, Code: imgtool.ExitFlush, Err: ferr}
		s.log.Printf("%v; data written through the mount may not be in the image; closing it", ferr)
	}
	var cerr error
	if err := s.d.Close(); err != nil {
		cerr = &imgtool.Error{Op: "close", Path: name, Code: imgtool.ExitFlush, Err: err}
	}
	s.closeErr = errors.Join(ferr, cerr)
	if s.closeErr == nil && s.ready {
		s.log.Printf("%s unmounted; %s flushed and closed", s.mp, name)
	}
	return s.closeErr
}

// writePIDFile writes pid to path atomically: a temporary file in the same
// directory, renamed over path, so a reader never sees a partial pid.
func writePIDFile(path string, pid int) error {
	tmp, err := os.CreateTemp(filepath.Dir(path), "."+filepath.Base(path)+".*")
	if err != nil {
		return err
	}
	_, err = fmt.Fprintf(tmp, "%d\n", pid)
	if cerr := tmp.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Chmod(tmp.Name(), 0o644)
	}
	if err == nil {
		err = os.Rename(tmp.Name(), path)
	}
	if err != nil {
		os.Remove(tmp.Name())
	}
	return err
}

// removePIDFile removes path if it still holds pid (another server may
// have been started with the same --pidfile since).
func removePIDFile(path string, pid int) {
	b, err := os.ReadFile(path)
	if err == nil && strings.TrimSpace(string(b)) == strconv.Itoa(pid) {
		os.Remove(path)
	}
}

// removePaths removes each path in turn (files, then the directories that
// held them, which must be empty by then); errors are logged.
func removePaths(paths []string, logger *log.Logger) {
	for _, p := range paths {
		if err := os.Remove(p); err != nil && !errors.Is(err, os.ErrNotExist) {
			logger.Printf("remove %s: %v", p, err)
		}
	}
}

// passthroughState says whether the mount is in FUSE passthrough mode, for
// the log and the state file: "on", or "off: " and why.
func passthroughState(srv *fusefs.Server, noPassthru bool) string {
	on, why := srv.Passthrough()
	switch {
	case on:
		return "on"
	case noPassthru:
		return "off: --no-passthrough"
	}
	return "off: " + why
}

// explainWritableOpen adds a hint to e, the failure to open an image for
// writing, when the image opens read-only: a driver refuses to write an
// image whose metadata points past its end, and a user may lack write
// permission, yet either can be read with --read-only. The read-only open
// is closed at once. A refusal the driver explains itself (the corrupt
// bit, an unsupported feature: "it can only be opened read-only") gets no
// second hint.
func explainWritableOpen(image, format string, opts drivers.OpenOptions, e *imgtool.Error) error {
	var dmg *drivers.DamageError
	explained := errors.Is(e, drivers.ErrUnsupported) || (errors.Is(e, drivers.ErrCorrupt) && !errors.As(e, &dmg))
	if opts.ReadOnly || explained || errors.Is(e, drivers.ErrLocked) || errors.Is(e, os.ErrNotExist) {
		return e
	}
	opts.ReadOnly, opts.Growable, opts.LazyRefcounts = true, false, false
	d, _, rerr := drivers.Open(image, format, opts)
	if rerr != nil {
		return e
	}
	d.Close()
	e.Hint = "it cannot be opened for writing; --read-only mounts it read-only"
	return e
}

// damageWarning is the one-line warning about an image (or a file of its
// backing chain) whose metadata the open found damaged: the file, the
// first problem, what it means for reads, and the command that reports
// everything.
func damageWarning(image string, dmg error) string {
	file, cause := image, dmg.Error()
	var de *drivers.DamageError
	if errors.As(dmg, &de) {
		file, cause = de.Path, de.Err.Error()
	}
	where := file
	if file != image {
		where = file + " (in the backing chain of " + image + ")"
	}
	msg := fmt.Sprintf("warning: %s: %s; reads of the damaged range fail with EIO; run 'imgfuse check %s' for a full report",
		where, cause, imgtool.ShellQuote(file))
	return strings.NewReplacer("\n", " ", "\r", " ").Replace(msg) // one line, whatever a file name holds
}

// ioErrorPublishEvery is the shortest time between two rewrites of the
// state file for I/O errors.
const ioErrorPublishEvery = 250 * time.Millisecond

// ioErrorStateOf is e for the state file, nil for no error.
func ioErrorStateOf(e fusefs.IOError) *mounts.IOErrorState {
	if e.Op == "" {
		return nil
	}
	st := &mounts.IOErrorState{Time: e.Time.UTC(), Operation: e.Op, Cause: e.Cause}
	if e.Offset >= 0 {
		off := e.Offset
		st.Offset = &off
	}
	return st
}
