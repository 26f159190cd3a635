package vmdk

import (
	"errors"
	"fmt"

	"imgfuse/coroutine"
	"imgfuse/drivers"
)

// maxMessages bounds the messages a check keeps.
const maxMessages = 65536

// Check implements drivers.Checker as QEMU's vmdk_check does: every
// allocated grain of each sparse extent must start before the end of its
// file ("ERROR: cluster offset for sector N points after EOF"), one
// corruption each. A grain table outside the file is a corruption too
// (QEMU's read of it fails); one that cannot be read is a check error.
// Repair is refused, as qemu-img check -r refuses it for VMDK. Like
// vmdk_check it counts no block statistics (qemu-img then prints neither
// the "allocated, fragmented, compressed" line nor its JSON fields).
func (d *Driver) Check(mode drivers.CheckMode, progress func(done, total int64)) (drivers.CheckResult, error) {
	var res drivers.CheckResult
	if mode != drivers.CheckOnly {
		return res, fmt.Errorf("vmdk: %s: repair is not supported (qemu-img cannot repair VMDK images either): %w",
			d.path, drivers.ErrUnsupported)
	}
	var err error
	coroutine.Run(func(co *coroutine.Co) { err = d.checkCo(co, &res, progress) })
	return res, err
}

func (d *Driver) checkCo(co *coroutine.Co, res *drivers.CheckResult, progress func(done, total int64)) error {
	d.mu.Lock(co)
	defer d.mu.Unlock(co)
	for _, e := range d.extents {
		s := e.sp
		if s == nil {
			continue
		}
		grains := (e.size + s.grainBytes - 1) / s.grainBytes
		for g := int64(0); g < grains; g++ {
			if progress != nil && g%65536 == 0 {
				progress(e.start+g*s.grainBytes, d.size)
			}
			r, err := s.lookupLocked(co, g)
			if errors.Is(err, drivers.ErrCorrupt) {
				// A grain table outside the file: one corruption,
				// and on to the next table.
				res.Corruptions++
				if len(res.Messages) < maxMessages {
					res.Messages = append(res.Messages, "ERROR: "+err.Error())
				}
				g = (g/s.h.numGTEs+1)*s.h.numGTEs - 1
				continue
			}
			if err != nil {
				res.CheckErrors++
				return err
			}
			if r.gte == 0 || s.zeroed(r.gte) {
				continue
			}
			if int64(r.gte)*sector >= s.end {
				res.Corruptions++
				if len(res.Messages) < maxMessages {
					res.Messages = append(res.Messages, fmt.Sprintf("ERROR: cluster offset for sector %d points after EOF",
						(e.start+g*s.grainBytes)/sector))
				}
			}
		}
	}
	return nil
}
