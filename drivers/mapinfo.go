package drivers

import (
	"fmt"

	"imgfuse/coroutine"
)

// LayerStatus describes a run of one layer of a backing chain on its own,
// as QEMU's block status of one node does.
type LayerStatus struct {
	Off, Len int64
	// Data: the layer stores data for the run. Zero: the layer says the
	// run reads as zeros. Neither: the layer leaves the run to the layer
	// below it.
	Data, Zero bool
	// HasOffset: Offset is where the run starts in the layer's file (its
	// external data file, for qcow2 with one).
	HasOffset bool
	Offset    int64
}

// LayerMapper is implemented by drivers that can describe one layer of a
// chain without the layers below it (for `imgfuse map`).
type LayerMapper interface {
	// LayerStatus describes the layer from off. On entry, 0 <= off <
	// Size(); on exit, the run starts at off and is non-empty.
	LayerStatus(co *coroutine.Co, off int64) (LayerStatus, error)
	// BackingLayer is the next layer down, nil if none.
	BackingLayer() Driver
}

// HostMapper is implemented by layers some of whose data runs QEMU's
// driver leaves to the file's own block status (BDRV_BLOCK_RAW or
// BDRV_BLOCK_RECURSE: a fixed VHD, a static VDI, a flat VMDK extent):
// qemu-img map reports a hole of the file there as zeros (still data, at
// its offset); MapAt does the same through HostStatus.
type HostMapper interface {
	// HostStatus describes the run st (a LayerStatus of this layer, with
	// Data and HasOffset) in the file that holds it: whether its first
	// bytes are a hole and for how many bytes (in (0, st.Len]) that holds.
	// It never yields.
	HostStatus(st LayerStatus) (zero bool, n int64)
}

// FileMapper is implemented by layers whose data lies in more than one
// file (a VMDK's extents): qemu-img map's text output names the file that
// holds each run.
type FileMapper interface {
	// MapFile names the file holding the layer's run at off, "" if the
	// layer's image file does. It never yields.
	MapFile(off int64) string
}

// MapEntry is one entry of `qemu-img map --output=json`: a run of the
// virtual disk, the depth in the chain of the layer that decides how it
// reads (0 for the image itself), whether that layer allocates it
// (Present), whether it reads as zeros or holds data, and where in that
// layer's file it is (Offset, nil when it has no plain location:
// compressed, unallocated, zero without a preallocated cluster).
type MapEntry struct {
	Start   int64  `json:"start"`
	Length  int64  `json:"length"`
	Depth   int    `json:"depth"`
	Present bool   `json:"present"`
	Zero    bool   `json:"zero"`
	Data    bool   `json:"data"`
	Offset  *int64 `json:"offset,omitempty"`
	// Layer is the driver at Depth.
	Layer Driver `json:"-"`
}

// MapAt describes d's chain at off as qemu-img map does (its
// get_block_status): walk down from d until a layer has data or zeros for
// off; a layer with nothing below it reads as zeros, and so does a range
// past the end of the layer below. Each layer's run bounds the entry. A
// driver that is not a LayerMapper is a flat layer described by its
// BlockStatus, allocated everywhere, without offsets.
func MapAt(co *coroutine.Co, d Driver, off int64) (MapEntry, error) {
	e := MapEntry{Start: off, Length: d.Size() - off}
	layer := d
	for {
		st, below, err := layerStatus(co, layer, off)
		if err != nil {
			return MapEntry{}, err
		}
		if st.Off != off || st.Len <= 0 {
			return MapEntry{}, fmt.Errorf("block status at %#x returned [%#x,+%#x)", off, st.Off, st.Len)
		}
		if hm, ok := layer.(HostMapper); ok && st.Data && !st.Zero && st.HasOffset {
			zero, n := hm.HostStatus(st)
			st.Zero, st.Len = zero, max(min(n, st.Len), 1)
		}
		e.Length = min(e.Length, st.Len)
		e.Layer = layer
		e.Data, e.Zero, e.Present = st.Data, st.Zero, st.Data || st.Zero
		if st.HasOffset {
			o := st.Offset
			e.Offset = &o
		} else {
			e.Offset = nil
		}
		if e.Present {
			return e, nil
		}
		if below != nil && off >= below.Size() {
			// QEMU counts a raw layer in whole 512-byte sectors: the
			// tail past its file's last byte is that layer's, as zeros.
			if end := qemuSize(below); off < end {
				o := off
				return MapEntry{Start: off, Length: min(e.Length, end-off), Depth: e.Depth + 1,
					Present: true, Zero: true, Offset: &o, Layer: below}, nil
			}
		}
		if below == nil || off >= below.Size() {
			e.Zero = true
			return e, nil
		}
		layer = below
		e.Depth++
	}
}

// qemuSize is d's size as QEMU's block layer sees it: a raw layer's is
// rounded up to whole 512-byte sectors.
func qemuSize(d Driver) int64 {
	if in, ok := d.(Informer); ok && in.Info().Format == "raw" {
		return (d.Size() + 511) &^ 511
	}
	return d.Size()
}

func layerStatus(co *coroutine.Co, d Driver, off int64) (LayerStatus, Driver, error) {
	if lm, ok := d.(LayerMapper); ok {
		st, err := lm.LayerStatus(co, off)
		return st, lm.BackingLayer(), err
	}
	ext, err := d.BlockStatus(co, off)
	if err != nil {
		return LayerStatus{}, nil, err
	}
	return LayerStatus{Off: ext.Off, Len: ext.Len, Data: ext.Flags&ExtentData != 0, Zero: ext.Flags&ExtentData == 0}, nil, nil
}

// BlockStatusOf is the block status of a driver without a backing layer,
// from its LayerStatus at off: data where the layer stores data, zeros
// everywhere else.
func BlockStatusOf(co *coroutine.Co, m interface {
	LayerStatus(co *coroutine.Co, off int64) (LayerStatus, error)
}, off int64) (Extent, error) {
	st, err := m.LayerStatus(co, off)
	if err != nil {
		return Extent{}, err
	}
	e := Extent{Off: st.Off, Len: st.Len, Flags: ExtentZero}
	if st.Data {
		e.Flags = ExtentData
	}
	return e, nil
}
