package vmdk

import (
	"fmt"
	"os"
	"strings"

	"imgfuse/coroutine"
	"imgfuse/drivers"
)

// openParent opens the parent a delta link names (parentFileNameHint),
// read-only, as QEMU's vmdk_parent_open does: the hint resolved against
// the child's path (drivers.ResolveParent), the parent opened as VMDK
// whatever it holds (QEMU sets the backing format to "vmdk"; qemu-img
// create refuses any other base), the chain carried by opts refusing
// loops and over-deep chains.
//
// The parent's CID is compared with the child's parentCID here, once (the
// parent is opened read-only and locked, so it cannot change while open).
// A mismatch does not fail the open: as in QEMU (vmdk_is_cid_valid),
// reads that fall through to the parent and copy-on-write fail (parentErr),
// while allocated grains read and write.
func (d *Driver) openParent(opts drivers.OpenOptions) error {
	hint := d.desc.parentHint
	path, err := drivers.ResolveParent(d.path, hint)
	if err != nil {
		// VMware on Windows may write an absolute Windows path, which
		// QEMU takes for a protocol: look for its last element beside
		// the image, as drivers/vpc does with Windows parent locators.
		if base, ok := windowsBase(hint); ok {
			if p := drivers.JoinParent(d.path, base); fileExists(p) {
				path, err = p, nil
			}
		}
	}
	if err != nil {
		return fmt.Errorf("vmdk: %w", err)
	}
	p, _, err := drivers.OpenParent(path, "vmdk", Format{}, opts)
	if err != nil {
		return fmt.Errorf("vmdk: %s: parent %q: %w", d.path, hint, err)
	}
	d.parent, d.parentAt = p, path
	pv, ok := p.(*Driver)
	if w, whole := p.(wholeFileDriver); whole {
		// A read-only monolithicFlat parent, served as one file.
		pv, ok = w.Driver, true
	}
	switch {
	case !ok:
		d.parentErr = fmt.Errorf("vmdk: %s: parent %s is not a VMDK image: it has no CID to check: %w", d.path, path, drivers.ErrCorrupt)
	case pv.desc == nil:
		d.parentErr = fmt.Errorf("vmdk: %s: parent %s has no descriptor: it has no CID to check: %w", d.path, path, drivers.ErrCorrupt)
	case pv.desc.cid != d.desc.parentCID:
		d.parentErr = fmt.Errorf("vmdk: %s: parent %s has CID %08x, the image was made on CID %08x (parentCID): the parent changed since: %w",
			d.path, path, pv.desc.cid, d.desc.parentCID, drivers.ErrCorrupt)
	}
	if d.parentErr != nil && opts.Logf != nil {
		opts.Logf("%v; reads of what the image leaves to its parent fail", d.parentErr)
	}
	return nil
}

// readParent fills q with the parent's bytes at disk offset off: zeros
// past the parent's end or without a parent. A parent whose CID does not
// match fails the read (openParent).
func (d *Driver) readParent(co *coroutine.Co, q []byte, off int64) error {
	if d.parent == nil {
		clear(q)
		return nil
	}
	if d.parentErr != nil {
		return d.parentErr
	}
	n := max(min(int64(len(q)), d.parent.Size()-off), 0)
	if n > 0 {
		if _, err := d.parent.ReadAt(co, q[:n], off); err != nil {
			return err
		}
	}
	clear(q[n:])
	return nil
}

// windowsBase returns the last element of a Windows drive-letter path
// (`C:\VMs\base.vmdk`: "base.vmdk").
func windowsBase(p string) (string, bool) {
	if len(p) < 4 || p[1] != ':' || (p[2] != '\\' && p[2] != '/') {
		return "", false
	}
	base := p[strings.LastIndexAny(p, `\\/`)+1:]
	return base, base != "" && base != "." && base != ".."
}

func fileExists(p string) bool {
	_, err := os.Stat(p)
	return err == nil
}
