package vmdk

import (
	"encoding/binary"
	"fmt"

	"imgfuse/drivers"
)

var le = binary.LittleEndian

// The hosted sparse extent header ("VMDK4", magic "KDMV"): 512 bytes,
// little-endian, sizes and offsets in 512-byte sectors (VMware's "Virtual
// Disk Format 5.0"; QEMU's VMDK4Header; docs/formats.md §2.2).
const (
	offMagic      = 0  // "KDMV"
	offVersion    = 4  // u32 1, 2 (zeroed grains), 3 (streamOptimized)
	offFlags      = 8  // u32 flag* bits
	offCapacity   = 12 // u64 sectors
	offGrainSize  = 20 // u64 sectors per grain
	offDescOff    = 28 // u64 embedded descriptor
	offDescSize   = 36 // u64 its sectors
	offNumGTEs    = 44 // u32 entries per grain table
	offRGDOff     = 48 // u64 redundant grain directory
	offGDOff      = 56 // u64 grain directory; gdAtEnd: see the footer
	offOverHead   = 64 // u64 first grain sector
	offCompressAl = 77 // u16 0 none, 1 deflate
	headerBytes   = 512
	sector        = 512

	flagNewlineTest = 1 << 0  // the newline bytes at 73 are valid
	flagRGD         = 1 << 1  // the redundant grain directory is in use
	flagZeroedGrain = 1 << 2  // GTE 1 means a zeroed grain
	flagCompressed  = 1 << 16 // grains are deflate streams behind a marker
	flagMarkers     = 1 << 17 // metadata markers (streamOptimized)

	magicKDMV = "KDMV"
	magicCOWD = "COWD"
	gdAtEnd   = ^uint64(0) // the real header is the footer near the end

	// QEMU's limits (vmdk_open_vmdk4): grains of at most 2^21 sectors (1
	// GiB), at most 512 entries per grain table.
	maxGrainSectors = 0x200000
	maxNumGTEs      = 512
	// maxExtentSectors: GTEs are 32-bit sector numbers, so extent data
	// stays below 2 TiB; a capacity is bounded likewise (VMware caps a
	// hosted sparse extent at 2 TiB).
	maxExtentSectors = 1 << 32

	gteZeroed = 1 // with flagZeroedGrain: the grain reads as zeros
)

// sparseHeader is a parsed hosted sparse extent header.
type sparseHeader struct {
	version     uint32
	flags       uint32
	capacity    int64 // sectors
	grainSize   int64 // sectors
	descOff     int64 // sectors
	descSize    int64 // sectors
	numGTEs     int64
	rgdOff      int64 // sectors; 0 if unused
	gdOff       int64 // sectors; -1: GD_AT_END, the footer has it
	overHead    int64 // sectors
	compression uint16
}

func (h *sparseHeader) compressed() bool { return h.flags&flagCompressed != 0 }

// gdEntries is the number of grain directory entries: one per grain
// table, each covering numGTEs grains.
func (h *sparseHeader) gdEntries() int64 {
	gtCover := h.numGTEs * h.grainSize
	return (h.capacity + gtCover - 1) / gtCover
}

// parseSparseHeader decodes and validates a sparse extent header against
// the size of its file, as QEMU's vmdk_open_vmdk4 does and more: every
// table it names must lie inside the file, so that nothing later reads or
// allocates from a count the file cannot back. b is the header at offset
// 0 (or the footer, for a GD_AT_END streamOptimized image).
func parseSparseHeader(b []byte, fileSize int64) (*sparseHeader, error) {
	if len(b) < headerBytes {
		return nil, fmt.Errorf("sparse header cut short (%d bytes): %w", len(b), drivers.ErrCorrupt)
	}
	if string(b[offMagic:offMagic+4]) != magicKDMV {
		if string(b[offMagic:offMagic+4]) == magicCOWD {
			return nil, fmt.Errorf("a VMDK3 (COWD, ESX vmfsSparse) extent: %w", drivers.ErrUnsupported)
		}
		return nil, fmt.Errorf("no sparse extent magic (KDMV): %w", drivers.ErrCorrupt)
	}
	h := &sparseHeader{
		version:     le.Uint32(b[offVersion:]),
		flags:       le.Uint32(b[offFlags:]),
		numGTEs:     int64(le.Uint32(b[offNumGTEs:])),
		compression: le.Uint16(b[offCompressAl:]),
	}
	// Every sector count or number must stay below 2^40 (a 512 TiB
	// file): products with 512 and sums then never overflow.
	u64 := func(off int) (int64, bool) {
		v := le.Uint64(b[off:])
		return int64(v), v < 1<<40
	}
	var ok [7]bool
	h.capacity, ok[0] = u64(offCapacity)
	h.grainSize, ok[1] = u64(offGrainSize)
	h.descOff, ok[2] = u64(offDescOff)
	h.descSize, ok[3] = u64(offDescSize)
	h.rgdOff, ok[4] = u64(offRGDOff)
	h.overHead, ok[6] = u64(offOverHead)
	gd := le.Uint64(b[offGDOff:])
	h.gdOff, ok[5] = int64(gd), gd < 1<<40
	if gd == gdAtEnd {
		h.gdOff, ok[5] = -1, true // the footer has it
	}
	for i, v := range ok {
		if !v {
			return nil, fmt.Errorf("header field %d out of range: %w", i, drivers.ErrCorrupt)
		}
	}
	if h.flags&flagRGD == 0 {
		h.rgdOff = 0
	}
	switch {
	case h.version > 3 || h.version == 0:
		return nil, fmt.Errorf("sparse extent version %d (1 to 3 are known): %w", h.version, drivers.ErrUnsupported)
	case h.compression > 1:
		return nil, fmt.Errorf("compression algorithm %d (only deflate is known): %w", h.compression, drivers.ErrUnsupported)
	case h.compressed() != (h.compression == 1):
		return nil, fmt.Errorf("compressed-grain flag %v with compression algorithm %d: %w", h.compressed(), h.compression, drivers.ErrCorrupt)
	case h.grainSize == 0 || h.grainSize > maxGrainSectors || h.grainSize&(h.grainSize-1) != 0:
		return nil, fmt.Errorf("grain size of %d sectors (a power of two up to %d): %w", h.grainSize, maxGrainSectors, drivers.ErrCorrupt)
	case h.numGTEs == 0 || h.numGTEs > maxNumGTEs:
		return nil, fmt.Errorf("%d entries per grain table (1 to %d): %w", h.numGTEs, maxNumGTEs, drivers.ErrCorrupt)
	case h.capacity > maxExtentSectors:
		return nil, fmt.Errorf("capacity of %d sectors (at most 2 TiB): %w", h.capacity, drivers.ErrUnsupported)
	case h.overHead*sector > fileSize:
		return nil, fmt.Errorf("file truncated: grains start at sector %d, the file has %d bytes: %w", h.overHead, fileSize, drivers.ErrCorrupt)
	case h.descSize > 0 && (h.descOff+h.descSize)*sector > fileSize:
		return nil, fmt.Errorf("embedded descriptor [sector %d, +%d) past the end of the file: %w", h.descOff, h.descSize, drivers.ErrCorrupt)
	}
	if gd != gdAtEnd {
		if err := h.checkGD(h.gdOff, "grain directory", fileSize); err != nil {
			return nil, err
		}
		if h.rgdOff != 0 {
			if err := h.checkGD(h.rgdOff, "redundant grain directory", fileSize); err != nil {
				return nil, err
			}
		}
	}
	return h, nil
}

// checkGD keeps a grain directory at sector off inside the file.
func (h *sparseHeader) checkGD(off int64, what string, fileSize int64) error {
	if off == 0 || off*sector+h.gdEntries()*4 > fileSize {
		return fmt.Errorf("%s at sector %d (%d entries) outside the file (%d bytes): %w",
			what, off, h.gdEntries(), fileSize, drivers.ErrCorrupt)
	}
	return nil
}

// Probe: QEMU's vmdk_probe. A sparse extent's magic ("KDMV"; "COWD" for
// the ESX VMDK3 extents QEMU also reads) scores 100, and so does a text
// descriptor by QEMU's rule (probeDescriptor). Missing bytes read as
// zeros.
func probe(in drivers.ProbeInput) int {
	h := in.Head
	if len(h) > drivers.ProbeSize {
		h = h[:drivers.ProbeSize]
	}
	if len(h) >= 4 && (string(h[:4]) == magicKDMV || string(h[:4]) == magicCOWD) {
		return 100
	}
	if probeDescriptor(h) {
		return 100
	}
	return 0
}
