package fusefs

import (
	"errors"
	"fmt"
	"log"
	"os"
	"path/filepath"
	"syscall"
	"time"

	"github.com/hanwen/go-fuse/v2/fuse"
	"golang.org/x/sys/unix"

	"imgfuse/drivers"
	"imgfuse/partition"
)

// Options are the caller's choices for one mount.
type Options struct {
	// Name is the disk's file name when the mountpoint is a directory;
	// default "disk". Ignored for a regular-file mountpoint.
	Name string
	// ReadOnly mounts read-only ("ro" in /proc/mounts): the kernel then
	// refuses every open for writing, truncate, chmod and utimes with
	// EROFS itself, even for root, so that `mount -o loop` falls back to
	// a read-only mount by itself. The disk has mode 0444, and the
	// handlers refuse writes too (EROFS), should a request get through.
	ReadOnly bool
	// AllowOther lets users other than the mounter reach the mount
	// (needs user_allow_other in /etc/fuse.conf when not root). The
	// kernel then enforces the file mode (default_permissions).
	AllowOther bool
	// Growable passes writes that reach past the end of the disk to the
	// driver, which grows the disk (open it with OpenOptions.Growable),
	// instead of writing what fits and failing the rest with ENOSPC. So
	// does a ZERO_RANGE fallocate without KEEP_SIZE (through Truncate).
	Growable bool
	// ModTime is the image file's mtime, reported as the disk's (and the
	// directory's) mtime, ctime and atime. It never changes while mounted.
	ModTime time.Time
	// FSName is the source shown in /proc/mounts, e.g.
	// "imgfuse:/abs/image.qcow2"; default "imgfuse".
	FSName string
	// Debug logs every FUSE request and reply.
	Debug bool
	// NoPassthrough never uses FUSE passthrough, even for a driver that
	// could use it (drivers.FileBacked): every read and write then reaches
	// the driver. Server.Passthrough says what a mount got.
	NoPassthrough bool
	// IOURing serves requests through FUSE-over-io_uring when the
	// kernel offers it (URingAvailable), /dev/fuse otherwise.
	IOURing bool
	// Logger receives the one line about an ignored partition table or a
	// clamped or skipped partition (at mount and at each re-read), one
	// line per change of the table through the mount, and the I/O errors
	// returned (the first ten, then at most one line a second); default
	// log.Default() for the partition lines, none for the errors.
	Logger *log.Logger
}

// Server is a mounted disk.
type Server struct {
	// Mode says how requests are read from the kernel, for the log.
	Mode string

	srv        *fuse.Server
	mountpoint string
	// serving is the connection on the event loops.
	serving *serving
	served  chan struct{}
	// passthrough is whether the kernel serves the disk's reads itself;
	// why says why not. Immutable after Mount.
	passthrough bool
	why         string
	fsys        *diskFS
	// errs counts the I/O errors the mount returned (shared with the
	// file system, which records them).
	errs *ioErrors
}

// IOErrors returns how many I/O errors (EIO) the mount has returned to
// callers, and the last one. It may be called from any goroutine.
func (s *Server) IOErrors() IOErrorStats { return s.errs.stats() }

// IOErrorNotify receives a token after I/O errors (at most one pending):
// the caller then reads IOErrors. Tokens are never blocked on, so a
// caller that does not listen costs nothing.
func (s *Server) IOErrorNotify() <-chan struct{} { return s.errs.notify }

// mountReadyTimeout bounds how long Mount waits for the new mount to
// answer a stat.
const mountReadyTimeout = 10 * time.Second

// Mount mounts d at mountpoint and returns once the mount answers requests.
// A directory mountpoint holds one file, opts.Name; a regular-file
// mountpoint becomes the disk itself (the root inode is the disk).
//
// The caller keeps ownership of d: after Wait returns it flushes and
// closes it.
func Mount(mountpoint string, d drivers.Driver, opts Options) (*Server, error) {
	if opts.Name == "" {
		opts.Name = "disk"
	}
	if opts.Name == "." || opts.Name == ".." || filepath.Base(opts.Name) != opts.Name {
		return nil, fmt.Errorf("fusefs: invalid file name %q", opts.Name)
	}
	if opts.FSName == "" {
		opts.FSName = "imgfuse"
	}
	abs, err := filepath.Abs(mountpoint)
	if err != nil {
		return nil, fmt.Errorf("fusefs: %w", err)
	}
	fi, err := os.Stat(abs)
	if err != nil {
		return nil, fmt.Errorf("fusefs: mountpoint: %w", err)
	}
	var dirMode bool
	switch {
	case fi.IsDir():
		dirMode = true
	case fi.Mode().IsRegular():
	default:
		return nil, fmt.Errorf("fusefs: mountpoint %s is neither a directory nor a regular file", abs)
	}

	if opts.Logger == nil {
		opts.Logger = log.Default()
	}
	fsys := newDiskFS(d, opts, dirMode, nil)
	if dirMode {
		fsys.readTable()
	}
	mopts := &fuse.MountOptions{
		// DirectMount passes rootmode from stat(mountpoint), which is what
		// makes a regular-file mountpoint possible; it falls back to
		// fusermount3 when mount(2) is not permitted.
		DirectMount: true,
		AllowOther:  opts.AllowOther,
		// The kernel checks the mode bits; without this any user of an
		// allow_other mount could write a 0644 disk.
		Options: []string{"default_permissions"},
		// 1 MiB READ/WRITE requests (the default is 128 KiB).
		MaxWrite: 1 << 20,
		// Bounds async direct I/O in flight in the kernel (default 12).
		MaxBackground: 64,
		// Without CAP_ASYNC_DIO the kernel serialises O_DIRECT aio: fio
		// QD32 4k random reads 19.9k vs 92.5k IOPS. CAP_DIRECT_IO_ALLOW_MMAP
		// keeps MAP_SHARED mmap working on our FOPEN_DIRECT_IO file.
		ExtraCapabilities: fuse.CAP_ASYNC_DIO | fuse.CAP_DIRECT_IO_ALLOW_MMAP,
		// No xattrs: otherwise the kernel asks for security.capability
		// on every write (4k random writes 139k → 17k IOPS).
		DisableXAttrs: true,
		// Splice only helps ReadResultFd; for our in-memory results go-fuse
		// would still fill and drain a pipe per READ before falling back
		// (and log an error for every 1 MiB read, which does not fit).
		DisableSplice: true,
		FsName:        opts.FSName,
		Name:          "imgfuse",
		Debug:         opts.Debug,
		// Passthrough: the image may live on a stacked filesystem
		// (overlayfs, depth 1); the kernel refuses a backing file whose
		// filesystem is stacked as deep as the FUSE mount may be.
		MaxStackDepth: 2,
	}
	useURing := opts.IOURing && URingAvailable()
	if useURing {
		mopts.ExtraCapabilities |= fuse.CAP_OVER_IO_URING
	}
	if opts.ReadOnly {
		// MS_RDONLY for mount(2), which makes both the superblock and
		// the mount read-only (go-fuse's default flags kept); "ro" for
		// fusermount3, which turns it into the same flag.
		mopts.DirectMountFlags = syscall.MS_NOSUID | syscall.MS_NODEV | syscall.MS_RDONLY
		mopts.Options = append(mopts.Options, "ro")
	}
	fb, _ := d.(drivers.FileBacked)
	if opts.NoPassthrough || fb == nil {
		// Not even negotiated: the mount is then exactly what it was
		// before passthrough existed.
		mopts.DisabledCapabilities = fuse.CAP_PASSTHROUGH
	}
	srv, fd, err := newServer(&reqFS{diskFS: fsys}, abs, mopts)
	if err != nil {
		return nil, fmt.Errorf("fusefs: mount %s: %w", abs, err)
	}
	s := &Server{srv: srv, mountpoint: abs, served: make(chan struct{}), fsys: fsys, errs: fsys.errs}
	// Decided before the first request is read, so every Open sees the
	// final fsys.backingID and every table change reaches the kernel.
	fsys.notify = srv
	switch {
	case opts.NoPassthrough:
		s.why = "disabled by the mount options"
	case fb == nil:
		s.why = "the image format maps the disk onto its file piecewise (only raw images and read-only flat VMDK images are passed through)"
	default:
		fsys.backingID, s.why = registerBacking(srv, fb)
		s.passthrough = fsys.backingID != 0
	}
	serving, err := startLoops(srv, fd, fsys, mopts)
	if err != nil {
		_ = srv.Unmount()
		return nil, fmt.Errorf("fusefs: mount %s: serving from event loops: %w", abs, err)
	}
	s.serving = serving
	s.Mode = fmt.Sprintf("event loops (%d)", len(serving.conns))
	if useURing {
		// Until every CPU's queue has an entry the kernel holds new
		// requests back; a refused registration hands them to
		// /dev/fuse.
		if err := serving.startURing(writePayloadOff + mopts.MaxWrite); err != nil {
			opts.Logger.Printf("fusefs: FUSE-over-io_uring not used: %v", err)
		} else {
			s.Mode += ", io_uring"
		}
	}
	go func() {
		serving.wait()
		// go-fuse's server reads nothing while the loops serve; now it
		// only finds the connection gone and releases go-fuse's
		// descriptor, which Unmount waits for.
		srv.Serve()
		close(s.served)
	}()
	if err := waitReady(abs, dirMode, opts.Name); err != nil {
		_ = srv.Unmount()
		return nil, fmt.Errorf("fusefs: mount %s: %w", abs, err)
	}
	return s, nil
}

// Partitions returns the partitions served as partN files now (none for a
// regular-file mountpoint): as read at mount time, or at the last change
// of the table through the mount.
func (s *Server) Partitions() []partition.Partition {
	return s.fsys.table.Load().partitions()
}

// Passthrough reports whether the kernel serves the disk's reads itself
// (FUSE passthrough), and if not, why.
func (s *Server) Passthrough() (on bool, why string) { return s.passthrough, s.why }

// registerBacking registers the disk's file with the kernel as the backing
// file of every open of the disk. It returns the backing ID, or 0 and why
// passthrough is off. The ID lives as long as the connection: the kernel
// drops it when the mount goes away.
func registerBacking(srv *fuse.Server, fb drivers.FileBacked) (int32, string) {
	if srv.KernelSettings().Flags64()&fuse.CAP_PASSTHROUGH == 0 {
		return 0, "the kernel does not offer FUSE passthrough (needs Linux 6.9 or later with CONFIG_FUSE_PASSTHROUGH)"
	}
	var id int32
	var errno syscall.Errno
	err := fb.LendBackingFd(func(fd int) error {
		id, errno = srv.RegisterBackingFd(&fuse.BackingMap{Fd: int32(fd)})
		return nil
	})
	switch {
	case err != nil:
		return 0, err.Error()
	case errno == 0 && id > 0:
		return id, ""
	case errno == 0:
		return 0, fmt.Sprintf("the kernel answered backing ID %d", id)
	case errno == syscall.EPERM:
		return 0, "registering the backing file needs CAP_SYS_ADMIN (EPERM)"
	case errno == syscall.ENOTTY:
		return 0, "the kernel does not know FUSE_DEV_IOC_BACKING_OPEN (ENOTTY)"
	case errno == syscall.ELOOP:
		return 0, "the image's filesystem is stacked too deep for a backing file (ELOOP)"
	case errno == syscall.EINVAL:
		return 0, "the kernel refused the image as a backing file (EINVAL: not a regular file?)"
	default:
		return 0, fmt.Sprintf("registering the backing file: %v", errno)
	}
}

// waitReady returns once the mount answers a stat of its root.
//
// fuse.NewServer has already mounted and answered INIT, so requests queue
// until Serve reads them. Server.WaitMount is no use here: it opens a
// helper file inside the mountpoint, which fails when the mountpoint is a
// regular file. Instead we stat the root and check it is ours (inode 1 on
// a device other than the parent directory's).
func waitReady(mountpoint string, dirMode bool, name string) error {
	var parent syscall.Stat_t
	if err := syscall.Stat(filepath.Dir(mountpoint), &parent); err != nil {
		return err
	}
	done := make(chan error, 1)
	go func() {
		var st syscall.Stat_t
		if err := syscall.Stat(mountpoint, &st); err != nil {
			done <- err
			return
		}
		if st.Ino != fuse.FUSE_ROOT_ID || st.Dev == parent.Dev {
			done <- errors.New("mountpoint root is not the FUSE root")
			return
		}
		// Answer the kernel's POLL probe once, now: os.Open registers a
		// file with the runtime's epoll, and epoll_ctl on a FUSE file
		// sends POLL from inside the runtime (not a Go syscall), which
		// can stall a garbage collection – and with it the server that
		// must answer – in any process that opens the disk through
		// os.Open, such as our tests. Once a poll(2) has been answered
		// ENOSYS the kernel never asks again. go-fuse's WaitMount does
		// the same with a helper file that cannot exist under a file
		// mountpoint.
		disk := mountpoint
		if dirMode {
			disk = filepath.Join(mountpoint, name)
		}
		if fd, err := unix.Open(disk, unix.O_RDONLY|unix.O_CLOEXEC, 0); err == nil {
			_, _ = unix.Poll([]unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}, 0)
			unix.Close(fd)
		}
		done <- nil
	}()
	select {
	case err := <-done:
		return err
	case <-time.After(mountReadyTimeout):
		return fmt.Errorf("mount did not answer within %v", mountReadyTimeout)
	}
}

// Wait returns when the filesystem is unmounted and every request handler
// has returned.
func (s *Server) Wait() {
	<-s.served
}

// Unmount unmounts the filesystem. It fails (EBUSY) while the disk is in
// use, e.g. attached to a loop device.
func (s *Server) Unmount() error {
	if err := s.srv.Unmount(); err != nil {
		return fmt.Errorf("fusefs: unmount %s: %w", s.mountpoint, err)
	}
	return nil
}
