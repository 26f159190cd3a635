package raw

import (
	"imgfuse/coroutine"
	"imgfuse/drivers"
)

var _ drivers.LayerMapper = (*Driver)(nil)

// LayerStatus implements drivers.LayerMapper: the disk is the file, so
// every run is allocated at its own offset; holes read as zeros (QEMU's
// file-posix: BDRV_BLOCK_ZERO | BDRV_BLOCK_OFFSET_VALID).
func (d *Driver) LayerStatus(co *coroutine.Co, off int64) (drivers.LayerStatus, error) {
	e, err := d.BlockStatus(co, off)
	if err != nil {
		return drivers.LayerStatus{}, err
	}
	data := e.Flags&drivers.ExtentData != 0
	return drivers.LayerStatus{Off: e.Off, Len: e.Len, Data: data, Zero: !data, HasOffset: true, Offset: e.Off}, nil
}

// BackingLayer implements drivers.LayerMapper: raw has no backing file.
func (d *Driver) BackingLayer() drivers.Driver { return nil }
