package raw

import (
	"fmt"
	"sync/atomic"
	"syscall"

	"imgfuse/coroutine"
	"imgfuse/drivers"
)

// headGuard keeps a writable raw image whose format was probed from
// turning into another format.
//
// A raw image's first sector belongs to the guest. If the image was opened
// by probing, a guest that writes a qcow2 header there (with, say,
// /etc/shadow as backing file) makes the next probing open read the file as
// qcow2 and expose a host file to it (CVE-2008-2004). QEMU restricts writes
// to block 0 of a probed raw image; so do we: a write, write-zeroes or
// discard touching the first drivers.ProbeSize bytes is refused with EPERM
// if the bytes it would leave there probe as any other format. Everything
// else, including writes to the first sector that keep it raw, goes
// through. Naming the format (--format raw) opens the image without a
// guard: the user has said how to read the file, now and next time.
//
// EPERM and not EIO: nothing is wrong with the image or the storage; the
// request is not permitted (QEMU answers EPERM too).
type headGuard struct {
	// others are the formats other than raw, whose probes must not match.
	// Immutable.
	others []drivers.Format
	logf   func(format string, args ...any)

	// mu serialises every change of the first sector, so that its check
	// reads what the change lands on: two writes that each leave the
	// sector raw could otherwise, interleaved, leave it qcow2.
	mu coroutine.CoMutex
	// logged is set once the refusal has been logged.
	logged atomic.Bool
}

// newHeadGuard returns the guard for a writable image opened with opts, or
// nil if it needs none.
func newHeadGuard(opts drivers.OpenOptions) *headGuard {
	if !opts.Probed || opts.ReadOnly {
		return nil
	}
	g := &headGuard{logf: opts.Logf}
	for _, f := range opts.Formats {
		if f.Name() != (Format{}).Name() {
			g.others = append(g.others, f)
		}
	}
	if len(g.others) == 0 {
		return nil
	}
	return g
}

// touchesHead reports whether a change of [off, off+n) reaches the probed
// bytes.
func (g *headGuard) touchesHead(off, n int64) bool {
	return g != nil && n > 0 && off >= 0 && off < drivers.ProbeSize
}

// checkHeadLocked reports whether the first sector, with [off, off+n) replaced by p
// (zeros if p is nil), would still probe as raw. The caller holds g.mu.
func (d *Driver) checkHeadLocked(co *coroutine.Co, p []byte, off, n int64) error {
	g := d.guard
	g.mu.AssertHeld(co)
	size := d.Size()
	head := make([]byte, drivers.ProbeSize)
	if err := d.f.PreadCo(co, head[:min(size, drivers.ProbeSize)], 0); err != nil {
		return fmt.Errorf("raw: %w", err)
	}
	end := min(off+n, drivers.ProbeSize)
	if p == nil {
		clear(head[off:end])
	} else {
		copy(head[off:end], p)
	}
	// What the next probe will read: the file's first bytes, as long as
	// the file is once this change is made.
	probed := head[:min(max(size, off+n), drivers.ProbeSize)]
	for _, f := range g.others {
		if f.Probe(probed) > 0 {
			if g.logged.CompareAndSwap(false, true) && g.logf != nil {
				g.logf("refusing writes to the first sector of %s that would make it probe as %s: "+
					"its format was probed as raw, and the next probing open would read it as %s; "+
					"open it with --format raw to allow them", d.path, f.Name(), f.Name())
			}
			return fmt.Errorf("raw: %s: write to [%#x, +%#x) refused: the first sector of a probed raw image would probe as %s (open with --format raw to allow): %w",
				d.path, off, n, f.Name(), syscall.EPERM)
		}
	}
	return nil
}

// guardedHead runs change, a change of [off, off+n) to the first sector
// that leaves p there (zeros if nil), if the result still probes as raw.
func (d *Driver) guardedHead(co *coroutine.Co, p []byte, off, n int64, change func() error) error {
	d.guard.mu.Lock(co)
	defer d.guard.mu.Unlock(co)
	if err := d.checkHeadLocked(co, p, off, n); err != nil {
		return err
	}
	return change()
}
