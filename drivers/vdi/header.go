package vdi

import (
	"encoding/binary"
	"fmt"

	"imgfuse/drivers"
)

// The header: 512 bytes, little-endian (QEMU's VdiHeader; docs/formats.md
// §5.1). Offsets of the fields this driver reads or writes.
const (
	offSignature    = 0x40  // u32 0xBEDA107F
	offVersion      = 0x44  // u32 0x00010001 (1.1)
	offHeaderSize   = 0x48  // u32 bytes after the 72-byte pre-header
	offImageType    = 0x4c  // u32 1 dynamic, 2 static (3 undo, 4 diff)
	offBmap         = 0x154 // u32 byte offset of the block map
	offData         = 0x158 // u32 byte offset of block 0's data
	offSectorSize   = 0x168 // u32 512
	offDiskSize     = 0x170 // u64 bytes
	offBlockSize    = 0x178 // u32 1 MiB
	offBlockExtra   = 0x17c // u32 0
	offBlocks       = 0x180 // u32 blocks in the image
	offAllocated    = 0x184 // u32 blocks allocated
	offUUIDLink     = 0x1a8 // 16 bytes: must be zero
	offUUIDParent   = 0x1b8 // 16 bytes: must be zero
	headerBytes     = 512
	signature       = 0xbeda107f
	version11       = 0x00010001
	blockSize       = 1 << 20
	sectorSize      = 512
	typeStatic      = 2
	maxBlocks       = 0x3fffff80 // QEMU's VDI_BLOCKS_IN_IMAGE_MAX: 512 TiB
	entryFree       = 0xffffffff // never allocated: reads as zeros
	entryDiscarded  = 0xfffffffe // discarded: reads as zeros
	firstSpecialEnt = entryDiscarded
)

// header is the parsed header; raw keeps the bytes, rewritten whole when
// the allocated count changes (as QEMU does).
type header struct {
	raw        [headerBytes]byte
	imageType  uint32
	bmapOff    int64
	dataOff    int64
	diskSize   int64 // rounded up to 512, as QEMU does on open
	blocks     int64
	allocated  int64
	headerSize uint32
}

var le = binary.LittleEndian

// parseHeader validates a VDI header as QEMU's vdi_open does, and more:
// the block map must lie inside the file and before the data (a map past
// the end would make the open-time scan read a file that is not there).
func parseHeader(b []byte, fileSize int64) (*header, error) {
	if len(b) < headerBytes {
		return nil, fmt.Errorf("header cut short (%d bytes): %w", len(b), drivers.ErrCorrupt)
	}
	h := &header{}
	copy(h.raw[:], b)
	if le.Uint32(b[offSignature:]) != signature {
		return nil, fmt.Errorf("no VDI signature at 0x40: %w", drivers.ErrCorrupt)
	}
	if v := le.Uint32(b[offVersion:]); v != version11 {
		return nil, fmt.Errorf("version %d.%d (only 1.1 is known): %w", v>>16, v&0xffff, drivers.ErrUnsupported)
	}
	h.headerSize = le.Uint32(b[offHeaderSize:])
	h.imageType = le.Uint32(b[offImageType:])
	h.bmapOff = int64(le.Uint32(b[offBmap:]))
	h.dataOff = int64(le.Uint32(b[offData:]))
	h.blocks = int64(le.Uint32(b[offBlocks:]))
	h.allocated = int64(le.Uint32(b[offAllocated:]))
	disk := le.Uint64(b[offDiskSize:])
	switch {
	case le.Uint32(b[offSectorSize:]) != sectorSize:
		return nil, fmt.Errorf("sector size %d (only 512 is known): %w", le.Uint32(b[offSectorSize:]), drivers.ErrUnsupported)
	case le.Uint32(b[offBlockSize:]) != blockSize:
		return nil, fmt.Errorf("block size %d (only 1 MiB is supported, as in QEMU): %w", le.Uint32(b[offBlockSize:]), drivers.ErrUnsupported)
	case le.Uint32(b[offBlockExtra:]) != 0:
		return nil, fmt.Errorf("block extra data of %d bytes: %w", le.Uint32(b[offBlockExtra:]), drivers.ErrUnsupported)
	case !zero(b[offUUIDLink : offUUIDLink+16]):
		return nil, fmt.Errorf("a linked image (link UUID set): %w", drivers.ErrUnsupported)
	case !zero(b[offUUIDParent : offUUIDParent+16]):
		return nil, fmt.Errorf("a differencing image (parent UUID set): %w", drivers.ErrUnsupported)
	case h.blocks > maxBlocks:
		return nil, fmt.Errorf("%d blocks (at most %d): %w", h.blocks, maxBlocks, drivers.ErrUnsupported)
	case h.bmapOff%sectorSize != 0 || h.dataOff%sectorSize != 0:
		return nil, fmt.Errorf("block map at %#x or data at %#x not sector-aligned: %w", h.bmapOff, h.dataOff, drivers.ErrCorrupt)
	case h.bmapOff < headerBytes:
		return nil, fmt.Errorf("block map at %#x inside the header: %w", h.bmapOff, drivers.ErrCorrupt)
	case h.bmapOff+4*h.blocks > h.dataOff:
		return nil, fmt.Errorf("block map [%#x, +%#x) runs into the data at %#x: %w", h.bmapOff, 4*h.blocks, h.dataOff, drivers.ErrCorrupt)
	case h.bmapOff+4*h.blocks > fileSize:
		return nil, fmt.Errorf("block map [%#x, +%#x) past the end of the file (%d bytes): %w", h.bmapOff, 4*h.blocks, fileSize, drivers.ErrCorrupt)
	case disk > uint64(h.blocks)*blockSize:
		return nil, fmt.Errorf("disk size %d larger than its %d blocks: %w", disk, h.blocks, drivers.ErrCorrupt)
	case h.allocated > h.blocks:
		return nil, fmt.Errorf("%d blocks allocated of %d: %w", h.allocated, h.blocks, drivers.ErrCorrupt)
	}
	h.diskSize = int64((disk + sectorSize - 1) &^ (sectorSize - 1))
	return h, nil
}

func zero(b []byte) bool {
	for _, c := range b {
		if c != 0 {
			return false
		}
	}
	return true
}

// setAllocated records n in the header bytes.
func (h *header) setAllocated(n int64) {
	h.allocated = n
	le.PutUint32(h.raw[offAllocated:], uint32(n))
}

// Probe: the signature 0xBEDA107F, little-endian at 0x40 (block/vdi.c).
// The banner text before it is free. Missing bytes read as zeros.
func probe(in drivers.ProbeInput) int {
	if len(in.Head) >= offSignature+4 && le.Uint32(in.Head[offSignature:]) == signature {
		return 100
	}
	return 0
}
