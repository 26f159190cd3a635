package vpc

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"path/filepath"
	"strings"
	"unicode/utf16"

	"imgfuse/drivers"
)

var be = binary.BigEndian

// The footer (512 bytes, big-endian; docs/formats.md §3.2): the offsets
// of the fields this driver reads.
const (
	footerSize      = 512
	fCookie         = 0  // "conectix"
	fDataOffset     = 16 // u64: the dynamic header; all ones for fixed
	fCreatorApp     = 28 // 4 bytes
	fCurrentSize    = 48 // u64 bytes
	fGeometry       = 56 // u16 cylinders, u8 heads, u8 sectors per track
	fDiskType       = 60 // u32
	fChecksum       = 64 // u32
	fUniqueID       = 68 // 16 bytes
	typeFixed       = 2
	typeDynamic     = 3
	typeDiff        = 4
	maxSectors      = 0xff000000 // QEMU's VHD_MAX_SECTORS: 2040 GiB
	unallocated     = 0xffffffff
	maxBlockSize    = 1 << 30
	maxLocatorBytes = 64 << 10
)

// The dynamic header (1024 bytes; §3.3).
const (
	dynHeaderSize = 1024
	dCookie       = 0  // "cxsparse"
	dTableOffset  = 16 // u64 BAT offset in bytes
	dMaxEntries   = 28 // u32
	dBlockSize    = 32 // u32
	dParentUUID   = 40 // 16 bytes: the parent footer's unique id
	dParentName   = 64 // 512 bytes UTF-16BE
	dLocators     = 576
	locatorSize   = 24
)

// footer is a parsed footer.
type footer struct {
	raw      []byte
	diskType uint32
	dataOff  uint64
	size     int64
	uniqueID [16]byte
}

// checksum is the ones' complement of the byte sum with the checksum
// field (at off) taken as zero.
func checksum(b []byte, off int) uint32 {
	var s uint32
	for i, c := range b {
		if i < off || i >= off+4 {
			s += uint32(c)
		}
	}
	return ^s
}

// diskSize is the size QEMU 10 gives the disk (§3.6): the CHS geometry's
// for images made by Virtual PC ("vpc ") and by QEMU ("qemu"), unless the
// geometry is the maximum (65535/16/255), which says "see current_size";
// current_size for everything else (Hyper-V "win ", Disk2vhd "d2v ",
// QEMU's force_size "qem2", Citrix, Azure, ...).
func diskSize(f []byte) int64 {
	cyls, heads, secs := int64(be.Uint16(f[fGeometry:])), int64(f[fGeometry+2]), int64(f[fGeometry+3])
	app := string(f[fCreatorApp : fCreatorApp+4])
	if (app == "vpc " || app == "qemu") && !(cyls == 65535 && heads == 16 && secs == 255) {
		return cyls * heads * secs * 512
	}
	return int64(be.Uint64(f[fCurrentSize:]) / 512 * 512)
}

// parseFooter validates a footer: cookie, checksum (which QEMU checks
// too), disk type, size.
func parseFooter(b []byte) (*footer, error) {
	if len(b) < footerSize || string(b[:8]) != "conectix" {
		return nil, fmt.Errorf("no VHD footer: %w", drivers.ErrCorrupt)
	}
	b = b[:footerSize]
	if sum := checksum(b, fChecksum); sum != be.Uint32(b[fChecksum:]) {
		return nil, fmt.Errorf("footer checksum %#x, want %#x: %w", be.Uint32(b[fChecksum:]), sum, drivers.ErrCorrupt)
	}
	f := &footer{raw: bytes.Clone(b), diskType: be.Uint32(b[fDiskType:]), dataOff: be.Uint64(b[fDataOffset:])}
	copy(f.uniqueID[:], b[fUniqueID:])
	switch f.diskType {
	case typeFixed, typeDynamic, typeDiff:
	default:
		return nil, fmt.Errorf("disk type %d (2 fixed, 3 dynamic, 4 differencing): %w", f.diskType, drivers.ErrUnsupported)
	}
	f.size = diskSize(b)
	if f.size/512 > maxSectors {
		return nil, fmt.Errorf("disk of %d bytes, more than VHD's 2040 GiB: %w", f.size, drivers.ErrUnsupported)
	}
	return f, nil
}

// dynHeader is a parsed dynamic disk header.
type dynHeader struct {
	batOff     int64
	entries    int64
	blockSize  int64
	parentUUID [16]byte
	parentName string
	locators   []locator
}

type locator struct {
	code        string
	length, off int64
}

func parseDynHeader(b []byte, size, fileSize int64) (*dynHeader, error) {
	if len(b) < dynHeaderSize || string(b[:8]) != "cxsparse" {
		return nil, fmt.Errorf("no dynamic disk header (cookie \"cxsparse\"): %w", drivers.ErrCorrupt)
	}
	h := &dynHeader{
		batOff:    int64(be.Uint64(b[dTableOffset:]) & (1<<62 - 1)),
		entries:   int64(be.Uint32(b[dMaxEntries:])),
		blockSize: int64(be.Uint32(b[dBlockSize:])),
	}
	if be.Uint64(b[dTableOffset:]) >= 1<<62 {
		return nil, fmt.Errorf("BAT offset %#x: %w", be.Uint64(b[dTableOffset:]), drivers.ErrCorrupt)
	}
	copy(h.parentUUID[:], b[dParentUUID:])
	switch {
	case h.blockSize < 512 || h.blockSize&(h.blockSize-1) != 0:
		return nil, fmt.Errorf("block size %d, not a power of two of at least 512: %w", h.blockSize, drivers.ErrCorrupt)
	case h.blockSize > maxBlockSize:
		return nil, fmt.Errorf("block size %d (at most 1 GiB): %w", h.blockSize, drivers.ErrUnsupported)
	case h.entries*h.blockSize < size:
		return nil, fmt.Errorf("%d BAT entries of %d bytes map less than the disk's %d bytes: %w", h.entries, h.blockSize, size, drivers.ErrCorrupt)
	case h.batOff%512 != 0 || h.batOff < 512:
		return nil, fmt.Errorf("BAT at %#x: %w", h.batOff, drivers.ErrCorrupt)
	case h.batOff+4*h.entries > fileSize:
		return nil, fmt.Errorf("BAT [%#x, +%#x) past the end of the file (%d bytes): the image has been truncated: %w",
			h.batOff, 4*h.entries, fileSize, drivers.ErrCorrupt)
	}
	name := b[dParentName : dParentName+512]
	u := make([]uint16, 0, 256)
	for i := 0; i+1 < len(name); i += 2 {
		c := be.Uint16(name[i:])
		if c == 0 {
			break
		}
		u = append(u, c)
	}
	h.parentName = string(utf16.Decode(u))
	for i := 0; i < 8; i++ {
		e := b[dLocators+i*locatorSize:]
		code := string(e[:4])
		if be.Uint32(e) == 0 {
			continue
		}
		h.locators = append(h.locators, locator{code: code, length: int64(be.Uint32(e[8:])), off: int64(be.Uint64(e[16:]) & (1<<62 - 1))})
	}
	return h, nil
}

// bitmapSize is the size of a block's sector bitmap: a bit per sector,
// rounded up to a sector.
func bitmapSize(blockSize int64) int64 { return (blockSize/512/8 + 511) &^ 511 }

// decodeLocator turns a locator's bytes into a path: UTF-16LE for the
// Windows codes (W2ru relative, W2ku absolute), bytes for the deprecated
// Wi2r/Wi2k, a file URL in UTF-8 for MacX. Backslashes become slashes;
// "" for what cannot name a file here.
func decodeLocator(code string, b []byte) string {
	var s string
	switch code {
	case "W2ru", "W2ku":
		u := make([]uint16, 0, len(b)/2)
		for i := 0; i+1 < len(b); i += 2 {
			c := binary.LittleEndian.Uint16(b[i:])
			if c == 0 {
				break
			}
			u = append(u, c)
		}
		s = string(utf16.Decode(u))
	case "Wi2r", "Wi2k":
		s = string(bytes.TrimRight(b, "\x00"))
	case "MacX":
		s = strings.TrimPrefix(strings.TrimPrefix(string(bytes.TrimRight(b, "\x00")), "file://"), "localhost")
	default:
		return ""
	}
	return windowsToSlash(s)
}

// windowsToSlash turns a Windows path into a slash path: "\" to "/", a
// leading ".\" dropped. A drive-letter path ("C:\x") names nothing here:
// its last element is kept, to be looked for beside the image.
func windowsToSlash(s string) string {
	s = strings.ReplaceAll(s, `\`, "/")
	if len(s) >= 2 && s[1] == ':' {
		return filepath.Base(s)
	}
	return strings.TrimPrefix(s, "./")
}

// probe: the cookie "conectix" at the start of the file (dynamic and
// differencing disks keep a copy of their footer there), score 100, or a
// fixed disk's whole, valid footer as the file's last 512 bytes, score 50
// (beyond QEMU, which probes a fixed VHD as raw; the score lets a magic at
// the start win). See drivers/foreign's package doc.
func probe(in drivers.ProbeInput) int {
	if len(in.Head) >= 8 && string(in.Head[:8]) == "conectix" {
		return 100
	}
	t := in.Tail
	if len(t) == footerSize && string(t[:8]) == "conectix" && be.Uint32(t[fDiskType:]) == typeFixed &&
		checksum(t, fChecksum) == be.Uint32(t[fChecksum:]) {
		return 50
	}
	return 0
}
