package raw

import (
	"fmt"
	"sync/atomic"
	"syscall"

	"imgfuse/coroutine"
	"imgfuse/drivers"
)

// probeGuard keeps a writable raw image whose format was probed from
// turning into another format.
//
// A raw image's sectors belong to the guest. If the image was opened by
// probing, a guest that writes a qcow2 header into the first sector (with,
// say, /etc/shadow as backing file) makes the next probing open read the
// file as qcow2 and expose a host file to it (CVE-2008-2004). QEMU
// restricts writes to block 0 of a probed raw image; so do we, for every
// format in the list (drivers/foreign adds QED, Parallels and the rest):
// a write, write-zeroes or discard is refused with EPERM if the file it
// would leave probes as any other format.
//
// The probe also reads the last drivers.ProbeSize bytes, where a fixed
// VHD keeps its only header, so the guard covers them too: a write
// reaching the last sector, a write that grows the disk and a growing
// Truncate move or change the file's tail and are checked the same way.
// A fixed VHD names no other file, so this one is about the disk not
// changing format under its user (the next probing open would refuse it,
// or, once a VHD driver exists, hide its last sector and resize it), not
// about host files; the check is the same code and costs two sector reads
// on the rare writes that reach the last sector.
//
// Everything else, including writes to those sectors that keep the file
// raw, goes through. The probe is run without a file name, as QEMU's
// re-probe is: a name (DMG's ".dmg") does not change with a write, and a
// file the name makes a DMG image was never opened as probed raw. Naming
// the format (--format raw) opens the image without a guard: the user has
// said how to read the file, now and next time.
//
// EPERM and not EIO: nothing is wrong with the image or the storage; the
// request is not permitted (QEMU answers EPERM too).
type probeGuard struct {
	// others are the formats other than raw, whose probes must not match.
	// Immutable.
	others []drivers.Format
	logf   func(format string, args ...any)

	// mu serialises every change of what the probe reads (the first and
	// last sectors, and the size), so that each check reads what the
	// change lands on: two writes that each leave the sector raw could
	// otherwise, interleaved, leave it qcow2. Every change of the size
	// holds it, so the size is stable while it is held.
	mu coroutine.CoMutex
	// logged is set once the refusal has been logged.
	logged atomic.Bool
}

// newProbeGuard returns the guard for a writable image opened with opts,
// or nil if it needs none.
func newProbeGuard(opts drivers.OpenOptions) *probeGuard {
	if !opts.Probed || opts.ReadOnly {
		return nil
	}
	g := &probeGuard{logf: opts.Logf}
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

// touchesProbed reports whether a change of [off, off+n) on a disk of
// size bytes reaches what the next probe reads: the first sector, the last
// one, or past the end (a growing write moves the last sector). Sizes only
// grow, so a range that misses the last sector of an older, smaller size
// misses today's too.
func (g *probeGuard) touchesProbed(off, n, size int64) bool {
	return g != nil && n > 0 && off >= 0 && (off < drivers.ProbeSize || off+n > size-drivers.ProbeSize)
}

// checkProbedLocked reports whether the file, with [off, off+n) replaced
// by p (zeros if p is nil; n may be 0) and newSize bytes long, would still
// probe as raw. The caller holds g.mu.
func (d *Driver) checkProbedLocked(co *coroutine.Co, p []byte, off, n, newSize int64) error {
	g := d.guard
	g.mu.AssertHeld(co)
	size := d.Size()
	// view returns the bytes [start, start+length) of the file once the
	// change is made: the file's own bytes below its current size, zeros
	// past it (a hole, or the new end), the change over both.
	view := func(start, length int64) ([]byte, error) {
		b := make([]byte, length)
		if have := min(size, start+length) - start; have > 0 {
			if err := d.f.PreadCo(co, b[:have], start); err != nil {
				return nil, fmt.Errorf("raw: %w", err)
			}
		}
		from, to := max(off, start), min(off+n, start+length)
		if from < to {
			if p == nil {
				clear(b[from-start : to-start])
			} else {
				copy(b[from-start:to-start], p[from-off:to-off])
			}
		}
		return b, nil
	}
	probeLen := min(newSize, drivers.ProbeSize)
	var in drivers.ProbeInput
	var err error
	if in.Head, err = view(0, probeLen); err != nil {
		return err
	}
	if in.Tail, err = view(newSize-probeLen, probeLen); err != nil {
		return err
	}
	for _, f := range g.others {
		if f.Probe(in) > 0 {
			if g.logged.CompareAndSwap(false, true) && g.logf != nil {
				g.logf("refusing writes to the first and last sectors of %s that would make it probe as %s: "+
					"its format was probed as raw, and the next probing open would read it as %s; "+
					"open it with --format raw to allow them", d.path, f.Name(), f.Name())
			}
			return fmt.Errorf("raw: %s: write to [%#x, +%#x) refused: a probed raw image would then probe as %s (open with --format raw to allow): %w",
				d.path, off, n, f.Name(), syscall.EPERM)
		}
	}
	return nil
}

// guarded runs change, a change of [off, off+n) that leaves p there (zeros
// if nil) and makes the file newSize bytes long, if the result still
// probes as raw.
func (d *Driver) guarded(co *coroutine.Co, p []byte, off, n int64, newSize func(size int64) int64, change func() error) error {
	d.guard.mu.Lock(co)
	defer d.guard.mu.Unlock(co)
	if err := d.checkProbedLocked(co, p, off, n, newSize(d.Size())); err != nil {
		return err
	}
	return change()
}
