package fusefs

import (
	"bytes"
	"fmt"
	"imgfuse/coroutine"
	"log"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/hanwen/go-fuse/v2/fuse"

	"imgfuse/drivers"
	"imgfuse/partition"
)

// TestIOErrorsCounted: every EIO a handler returns is counted with its
// request, disk offset (a partition's at the disk offset), time and cause,
// and announced on the notify channel; successful requests and errors
// that are not I/O errors (ENOSPC, EROFS) are not counted; the log gets
// the first errors and then at most a line a second.
func TestIOErrorsCounted(t *testing.T) {
	var logBuf bytes.Buffer
	d := newMemDriver(make([]byte, 1<<20))
	fs := newDiskFS(d, Options{Logger: log.New(&logBuf, "", 0)}, false, nil)
	ino := uint64(fuse.FUSE_ROOT_ID)
	buf := make([]byte, 4096)
	read := func(off uint64) fuse.Status {
		var st fuse.Status
		onReq(fs, func(r *reqFS) {
			_, st = r.Read(nil, &fuse.ReadIn{InHeader: fuse.InHeader{NodeId: ino}, Offset: off, Size: 4096}, buf)
		})
		return st
	}

	if st := read(0); st != fuse.OK {
		t.Fatalf("read: %v", st)
	}
	// A write past the end: ENOSPC, not an I/O error.
	var st fuse.Status
	onReq(fs, func(r *reqFS) {
		_, st = r.Write(nil, &fuse.WriteIn{InHeader: fuse.InHeader{NodeId: ino}, Offset: 1 << 20}, []byte("x"))
	})
	if st != fuse.Status(syscall.ENOSPC) {
		t.Fatalf("write past the end: %v, want ENOSPC", st)
	}
	if got := fs.errs.stats(); got.Count != 0 {
		t.Fatalf("after a good read and ENOSPC: %d I/O errors counted", got.Count)
	}
	select {
	case <-fs.errs.notify:
		t.Fatal("notified without an I/O error")
	default:
	}

	before := time.Now()
	d.mu.Lock()
	d.readErr = fmt.Errorf("qcow2: img: L1 entry 3: L2 table offset 0x60000 is past the end of the file: %w", drivers.ErrCorrupt)
	d.mu.Unlock()
	for i := range 15 {
		if st := read(uint64(i) * 4096); st != fuse.EIO {
			t.Fatalf("read %d of a damaged range: %v, want EIO", i, st)
		}
	}
	got := fs.errs.stats()
	if got.Count != 15 || got.Last.Op != "read" || got.Last.Offset != 14*4096 ||
		!strings.Contains(got.Last.Cause, "L2 table offset 0x60000") || got.Last.Time.Before(before) {
		t.Errorf("stats after 15 failed reads: %+v", got)
	}
	select {
	case <-fs.errs.notify:
	default:
		t.Error("no notification after I/O errors")
	}
	// The first ioErrorLogBurst errors are logged one by one, the rest
	// (within the second) are not yet.
	if n := strings.Count(logBuf.String(), "\n"); n != ioErrorLogBurst {
		t.Errorf("log has %d lines after 15 errors in a burst, want %d:\n%s", n, ioErrorLogBurst, logBuf.String())
	}
	if !strings.Contains(logBuf.String(), "I/O error 1: read at disk offset 0x0: qcow2: img: L1 entry 3") {
		t.Errorf("log does not name the first error:\n%s", logBuf.String())
	}

	d.mu.Lock()
	d.flushErr = fmt.Errorf("disk on fire: %w", syscall.EIO)
	d.mu.Unlock()
	onReq(fs, func(r *reqFS) { st = r.Fsync(nil, &fuse.FsyncIn{InHeader: fuse.InHeader{NodeId: ino}}) })
	if st != fuse.EIO {
		t.Fatalf("fsync: %v, want EIO", st)
	}
	if got := fs.errs.stats(); got.Count != 16 || got.Last.Op != "flush" || got.Last.Offset != -1 || !strings.Contains(got.Last.Cause, "disk on fire") {
		t.Errorf("after a failed fsync: %+v", got)
	}

	// A cause is kept bounded whatever the driver says.
	fs.errs.record("read", 0, fmt.Errorf("%s", strings.Repeat("x", 10000)))
	if got := fs.errs.stats(); len(got.Last.Cause) != maxCauseLen {
		t.Errorf("cause of %d bytes kept, want %d", len(got.Last.Cause), maxCauseLen)
	}
}

// TestIOErrorsPartitionOffset: a partition file's failed read is counted
// at its disk offset, the offset the image's tools speak of.
func TestIOErrorsPartitionOffset(t *testing.T) {
	d := newMemDriver(make([]byte, 1<<20))
	d.readErr = fmt.Errorf("bad: %w", drivers.ErrCorrupt)
	fs := newDiskFS(d, Options{Name: "disk"}, true, []partition.Partition{{Number: 1, Start: 8192, Size: 65536}})
	var st fuse.Status
	onReq(fs, func(r *reqFS) {
		_, st = r.Read(nil, &fuse.ReadIn{InHeader: fuse.InHeader{NodeId: firstPartIno}, Offset: 4096, Size: 512}, make([]byte, 512))
	})
	if st != fuse.EIO {
		t.Fatalf("read: %v, want EIO", st)
	}
	if got := fs.errs.stats(); got.Count != 1 || got.Last.Offset != 8192+4096 {
		t.Errorf("stats: %+v, want one error at disk offset %#x", got, 8192+4096)
	}
}

// onReq runs fn with fs as a request's handler sees it: paired with the
// coroutine of the request, on an event loop (diskFS alone answers
// ENOSYS to the request operations).
func onReq(fs *diskFS, fn func(r *reqFS)) {
	coroutine.Run(func(co *coroutine.Co) { fn(&reqFS{fs, co}) })
}
