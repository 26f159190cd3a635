package vhdx

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"hash/crc32"
	"path/filepath"
	"strings"
	"unicode/utf16"

	"imgfuse/drivers"
)

var le = binary.LittleEndian

var castagnoli = crc32.MakeTable(crc32.Castagnoli)

// crcOK reports whether the CRC-32C of b, with the 4-byte field at off
// taken as zero, equals the field.
func crcOK(b []byte, off int) bool { return crcOf(b, off) == le.Uint32(b[off:]) }

// crcOf is the CRC-32C of b with the field at off taken as zero.
func crcOf(b []byte, off int) uint32 {
	c := crc32.Update(0, castagnoli, b[:off])
	c = crc32.Update(c, castagnoli, []byte{0, 0, 0, 0})
	return crc32.Update(c, castagnoli, b[off+4:])
}

// Fixed places and sizes (docs/formats.md §4.1).
const (
	mib            = 1 << 20
	header1Off     = 64 << 10
	header2Off     = 128 << 10
	headerSize     = 4096
	region1Off     = 192 << 10
	region2Off     = 256 << 10
	regionSize     = 64 << 10
	sectorSize     = 4096 // log sectors, and the unit of BAT updates
	maxRegions     = 2047
	maxMetaEntries = 2047
	maxDiskSize    = 64 << 40
	minBlockSize   = 1 << 20
	maxBlockSize   = 256 << 20
	// maxLogLength bounds the log this driver replays: Hyper-V and QEMU
	// make 1 MiB logs; the scan of a larger one costs up to 16 times its
	// length.
	maxLogLength = 1 << 30
)

// The header (4 KiB slot; §4.2): the offsets of its fields.
const (
	hSignature = 0  // "head"
	hChecksum  = 4  // CRC-32C of the 4 KiB
	hSeq       = 8  // u64
	hFileWrite = 16 // GUID
	hDataWrite = 32 // GUID
	hLogGUID   = 48 // GUID: zero when there is no log to replay
	hLogVer    = 64 // u16 = 0
	hVersion   = 66 // u16 = 1
	hLogLength = 68 // u32
	hLogOffset = 72 // u64
)

// guid is a GUID as stored (Microsoft byte order).
type guid [16]byte

func (g guid) zero() bool { return g == guid{} }

// String is the registry form "{XXXXXXXX-XXXX-XXXX-XXXX-XXXXXXXXXXXX}"
// that parent_linkage holds.
func (g guid) String() string {
	return fmt.Sprintf("{%08X-%04X-%04X-%X-%X}", le.Uint32(g[0:]), le.Uint16(g[4:]), le.Uint16(g[6:]), g[8:10], g[10:16])
}

// parseGUID parses "XXXXXXXX-XXXX-XXXX-XXXX-XXXXXXXXXXXX" (with or
// without braces) into its stored form; ok is false for anything else.
func parseGUID(s string) (g guid, ok bool) {
	s = strings.TrimSuffix(strings.TrimPrefix(strings.TrimSpace(s), "{"), "}")
	var a uint32
	var b, c uint16
	var d [8]byte
	if len(s) != 36 || s[8] != '-' || s[13] != '-' || s[18] != '-' || s[23] != '-' {
		return g, false
	}
	hex := func(t string) (uint64, bool) {
		var v uint64
		for _, ch := range t {
			switch {
			case ch >= '0' && ch <= '9':
				v = v<<4 | uint64(ch-'0')
			case ch >= 'a' && ch <= 'f':
				v = v<<4 | uint64(ch-'a'+10)
			case ch >= 'A' && ch <= 'F':
				v = v<<4 | uint64(ch-'A'+10)
			default:
				return 0, false
			}
		}
		return v, true
	}
	v1, ok1 := hex(s[0:8])
	v2, ok2 := hex(s[9:13])
	v3, ok3 := hex(s[14:18])
	v4, ok4 := hex(s[19:23])
	v5, ok5 := hex(s[24:36])
	if !(ok1 && ok2 && ok3 && ok4 && ok5) {
		return g, false
	}
	a, b, c = uint32(v1), uint16(v2), uint16(v3)
	d[0], d[1] = byte(v4>>8), byte(v4)
	for i := 0; i < 6; i++ {
		d[2+i] = byte(v5 >> (40 - 8*i))
	}
	le.PutUint32(g[0:], a)
	le.PutUint16(g[4:], b)
	le.PutUint16(g[6:], c)
	copy(g[8:], d[:])
	return g, true
}

// mustGUID is parseGUID for the literals below.
func mustGUID(s string) guid {
	g, ok := parseGUID(s)
	if !ok {
		panic("vhdx: bad GUID literal " + s)
	}
	return g
}

// Region and metadata item GUIDs (§4.3, §4.4).
var (
	guidBAT          = mustGUID("2DC27766-F623-4200-9D64-115E9BFD4A08")
	guidMetadata     = mustGUID("8B7CA206-4790-4B9A-B8FE-575F050F886E")
	guidFileParams   = mustGUID("CAA16737-FA36-4D43-B3B6-33F0AA44E76B")
	guidDiskSize     = mustGUID("2FA54224-CD1B-4876-B211-5DBED83BF4B8")
	guidPage83       = mustGUID("BECA12AB-B2E6-4523-93EF-C309E000C746")
	guidLogicalSS    = mustGUID("8141BF1D-A96F-4709-BA47-F233A8FAAB5F")
	guidPhysicalSS   = mustGUID("CDA348C7-445D-4471-9CC9-E9885251C556")
	guidParentLoc    = mustGUID("A8D35F2D-B30B-454D-ABF7-D3D84834AB0C")
	guidVHDXParentTy = mustGUID("B04AEFB7-D19E-4A81-B789-25B8E9445913")
)

// header is a parsed header.
type header struct {
	raw       []byte // the 4 KiB slot
	seq       uint64
	fileWrite guid
	dataWrite guid
	logGUID   guid
	logLength int64
	logOffset int64
}

// parseHeader validates one header slot: signature, CRC over the 4 KiB,
// version 1, log version 0, a log of whole MiBs at a MiB boundary.
func parseHeader(b []byte) (*header, error) {
	if len(b) < headerSize || string(b[:4]) != "head" {
		return nil, fmt.Errorf("no header signature: %w", drivers.ErrCorrupt)
	}
	b = b[:headerSize]
	if !crcOK(b, hChecksum) {
		return nil, fmt.Errorf("header checksum: %w", drivers.ErrCorrupt)
	}
	h := &header{raw: bytes.Clone(b), seq: le.Uint64(b[hSeq:]),
		logLength: int64(le.Uint32(b[hLogLength:])), logOffset: int64(le.Uint64(b[hLogOffset:]) & (1<<62 - 1))}
	copy(h.fileWrite[:], b[hFileWrite:])
	copy(h.dataWrite[:], b[hDataWrite:])
	copy(h.logGUID[:], b[hLogGUID:])
	switch {
	case le.Uint16(b[hVersion:]) != 1:
		return nil, fmt.Errorf("header version %d (want 1): %w", le.Uint16(b[hVersion:]), drivers.ErrUnsupported)
	case le.Uint16(b[hLogVer:]) != 0:
		return nil, fmt.Errorf("log version %d (want 0): %w", le.Uint16(b[hLogVer:]), drivers.ErrUnsupported)
	case le.Uint64(b[hLogOffset:]) >= 1<<62:
		return nil, fmt.Errorf("log offset %#x: %w", le.Uint64(b[hLogOffset:]), drivers.ErrCorrupt)
	case h.logLength%mib != 0 || h.logOffset%mib != 0 || (h.logLength > 0 && h.logOffset < mib):
		return nil, fmt.Errorf("log [%#x, +%#x) not at whole MiBs past the first: %w", h.logOffset, h.logLength, drivers.ErrCorrupt)
	}
	return h, nil
}

// pickHeader returns the current header of the two slots, and which (0 or
// 1): the valid one with the higher sequence number; equal numbers only
// if the slots are identical (Disk2vhd writes them so).
func pickHeader(b1, b2 []byte) (*header, int, error) {
	h1, err1 := parseHeader(b1)
	h2, err2 := parseHeader(b2)
	switch {
	case err1 != nil && err2 != nil:
		return nil, 0, fmt.Errorf("neither header is valid (1: %v; 2: %w)", err1, err2)
	case err2 != nil:
		return h1, 0, nil
	case err1 != nil:
		return h2, 1, nil
	case h1.seq > h2.seq:
		return h1, 0, nil
	case h2.seq > h1.seq:
		return h2, 1, nil
	case bytes.Equal(h1.raw, h2.raw):
		return h1, 0, nil
	}
	return nil, 0, fmt.Errorf("both headers have sequence number %d but differ: %w", h1.seq, drivers.ErrCorrupt)
}

// region is a region table entry.
type region struct {
	off, length int64
}

// regions is what the region table says: where the BAT and the metadata
// are.
type regions struct {
	bat, meta region
	others    []region // regions this driver does not know (not required)
}

// parseRegions validates a region table (§4.3): signature, CRC over the 64
// KiB, at most 2047 entries, the BAT and metadata at whole MiBs inside
// the file, no entry overlapping another, the first MiB or the log; known
// GUIDs once; an unknown entry marked required refused, one not required
// kept only as a place blocks must not overlap.
func parseRegions(b []byte, fileSize int64, logOff, logLen int64) (*regions, error) {
	if len(b) < regionSize || string(b[:4]) != "regi" {
		return nil, fmt.Errorf("no region table signature: %w", drivers.ErrCorrupt)
	}
	b = b[:regionSize]
	if !crcOK(b, 4) {
		return nil, fmt.Errorf("region table checksum: %w", drivers.ErrCorrupt)
	}
	n := int(le.Uint32(b[8:]))
	if n > maxRegions {
		return nil, fmt.Errorf("%d region table entries (at most %d): %w", n, maxRegions, drivers.ErrCorrupt)
	}
	r := &regions{}
	var seenBAT, seenMeta bool
	used := []region{{0, mib}}
	if logLen > 0 {
		used = append(used, region{logOff, logLen})
	}
	for i := 0; i < n; i++ {
		e := b[16+32*i:]
		var g guid
		copy(g[:], e[:16])
		rg := region{int64(le.Uint64(e[16:]) & (1<<62 - 1)), int64(le.Uint32(e[24:]))}
		required := le.Uint32(e[28:])&1 != 0
		switch {
		case g == guidBAT && seenBAT, g == guidMetadata && seenMeta:
			return nil, fmt.Errorf("region %s listed twice: %w", g, drivers.ErrCorrupt)
		case g != guidBAT && g != guidMetadata:
			if required {
				return nil, fmt.Errorf("unknown required region %s: %w", g, drivers.ErrUnsupported)
			}
			// Its content is ignored, its place is not (QEMU's
			// vhdx_region_check): no other region and no block may
			// overlap it.
			for _, u := range used {
				if rg.off < u.off+u.length && u.off < rg.off+rg.length {
					return nil, fmt.Errorf("region %s [%#x, +%#x) overlaps [%#x, +%#x): %w", g, rg.off, rg.length, u.off, u.length, drivers.ErrCorrupt)
				}
			}
			used = append(used, rg)
			r.others = append(r.others, rg)
			continue
		}
		switch {
		case le.Uint64(e[16:]) >= 1<<62 || rg.off%mib != 0 || rg.length%mib != 0 || rg.length == 0:
			return nil, fmt.Errorf("region %s at [%#x, +%#x), not whole MiBs: %w", g, rg.off, rg.length, drivers.ErrCorrupt)
		case rg.off+rg.length > fileSize:
			return nil, fmt.Errorf("region %s [%#x, +%#x) past the end of the file (%d bytes): %w", g, rg.off, rg.length, fileSize, drivers.ErrCorrupt)
		}
		for _, u := range used {
			if rg.off < u.off+u.length && u.off < rg.off+rg.length {
				return nil, fmt.Errorf("region %s [%#x, +%#x) overlaps [%#x, +%#x): %w", g, rg.off, rg.length, u.off, u.length, drivers.ErrCorrupt)
			}
		}
		used = append(used, rg)
		if g == guidBAT {
			r.bat, seenBAT = rg, true
		} else {
			r.meta, seenMeta = rg, true
		}
	}
	if !seenBAT || !seenMeta {
		return nil, fmt.Errorf("the region table lacks the BAT or the metadata region: %w", drivers.ErrCorrupt)
	}
	return r, nil
}

// metadata is what the metadata region says (§4.4).
type metadata struct {
	blockSize      int64
	leaveAllocated bool
	hasParent      bool
	diskSize       int64
	logicalSS      int64
	physicalSS     int64
	locator        *parentLocator
}

// parseMetadata validates the metadata table at the start of the region
// b and decodes its items.
func parseMetadata(b []byte) (*metadata, error) {
	if len(b) < 64<<10 || string(b[:8]) != "metadata" {
		return nil, fmt.Errorf("no metadata table signature: %w", drivers.ErrCorrupt)
	}
	n := int(le.Uint16(b[10:]))
	if n > maxMetaEntries {
		return nil, fmt.Errorf("%d metadata entries (at most %d): %w", n, maxMetaEntries, drivers.ErrCorrupt)
	}
	m := &metadata{}
	items := map[guid][]byte{}
	for i := 0; i < n; i++ {
		e := b[32+32*i:]
		var g guid
		copy(g[:], e[:16])
		off, length := int64(le.Uint32(e[16:])), int64(le.Uint32(e[20:]))
		flags := le.Uint32(e[24:])
		isUser, required := flags&1 != 0, flags&4 != 0
		if _, dup := items[g]; dup && !isUser {
			return nil, fmt.Errorf("metadata item %s listed twice: %w", g, drivers.ErrCorrupt)
		}
		if length > 0 && (off < 64<<10 || off+length > int64(len(b)) || length > mib) {
			return nil, fmt.Errorf("metadata item %s at [%#x, +%#x) outside the region: %w", g, off, length, drivers.ErrCorrupt)
		}
		switch g {
		case guidFileParams, guidDiskSize, guidPage83, guidLogicalSS, guidPhysicalSS, guidParentLoc:
			if !isUser {
				items[g] = b[off : off+length]
				continue
			}
		}
		if required {
			return nil, fmt.Errorf("unknown required metadata item %s: %w", g, drivers.ErrUnsupported)
		}
	}
	need := func(g guid, name string, size int) ([]byte, error) {
		v, ok := items[g]
		if !ok || len(v) < size {
			return nil, fmt.Errorf("metadata item %s (%s) missing or short: %w", g, name, drivers.ErrCorrupt)
		}
		return v, nil
	}
	fp, err := need(guidFileParams, "file parameters", 8)
	if err != nil {
		return nil, err
	}
	m.blockSize = int64(le.Uint32(fp))
	m.leaveAllocated, m.hasParent = le.Uint32(fp[4:])&1 != 0, le.Uint32(fp[4:])&2 != 0
	ds, err := need(guidDiskSize, "virtual disk size", 8)
	if err != nil {
		return nil, err
	}
	if _, err := need(guidPage83, "page 83 data", 16); err != nil {
		return nil, err
	}
	ls, err := need(guidLogicalSS, "logical sector size", 4)
	if err != nil {
		return nil, err
	}
	ps, err := need(guidPhysicalSS, "physical sector size", 4)
	if err != nil {
		return nil, err
	}
	m.logicalSS, m.physicalSS = int64(le.Uint32(ls)), int64(le.Uint32(ps))
	switch {
	case m.blockSize < minBlockSize || m.blockSize > maxBlockSize || m.blockSize&(m.blockSize-1) != 0:
		return nil, fmt.Errorf("block size %d (a power of two from 1 to 256 MiB): %w", m.blockSize, drivers.ErrCorrupt)
	case m.logicalSS != 512 && m.logicalSS != 4096:
		return nil, fmt.Errorf("logical sector size %d (512 or 4096): %w", m.logicalSS, drivers.ErrCorrupt)
	case m.physicalSS != 512 && m.physicalSS != 4096:
		return nil, fmt.Errorf("physical sector size %d (512 or 4096): %w", m.physicalSS, drivers.ErrCorrupt)
	}
	size := le.Uint64(ds)
	if size > maxDiskSize || size%uint64(m.logicalSS) != 0 {
		return nil, fmt.Errorf("virtual disk size %d (a multiple of %d, at most 64 TiB): %w", size, m.logicalSS, drivers.ErrCorrupt)
	}
	m.diskSize = int64(size)
	if m.hasParent {
		pl, err := need(guidParentLoc, "parent locator", 20)
		if err != nil {
			return nil, err
		}
		if m.locator, err = parseLocator(pl); err != nil {
			return nil, err
		}
	}
	return m, nil
}

// parentLocator is a decoded parent locator item: its key/value pairs.
type parentLocator struct {
	entries map[string]string
}

// parseLocator decodes a parent locator item (§4.4): the VHDX parent type,
// entries whose keys and values lie inside the item, UTF-16LE strings.
func parseLocator(b []byte) (*parentLocator, error) {
	var ty guid
	copy(ty[:], b)
	if ty != guidVHDXParentTy {
		return nil, fmt.Errorf("parent locator of type %s (only VHDX parents): %w", ty, drivers.ErrUnsupported)
	}
	n := int(le.Uint16(b[18:]))
	if 20+12*n > len(b) {
		return nil, fmt.Errorf("parent locator of %d entries in %d bytes: %w", n, len(b), drivers.ErrCorrupt)
	}
	pl := &parentLocator{entries: map[string]string{}}
	str := func(off, n int64) (string, bool) {
		if off < 0 || n%2 != 0 || off+n > int64(len(b)) {
			return "", false
		}
		u := make([]uint16, n/2)
		for i := range u {
			u[i] = le.Uint16(b[off+2*int64(i):])
		}
		return string(utf16.Decode(u)), true
	}
	for i := 0; i < n; i++ {
		e := b[20+12*i:]
		k, ok1 := str(int64(le.Uint32(e)), int64(le.Uint16(e[8:])))
		v, ok2 := str(int64(le.Uint32(e[4:])), int64(le.Uint16(e[10:])))
		if !ok1 || !ok2 {
			return nil, fmt.Errorf("parent locator entry %d outside the item: %w", i, drivers.ErrCorrupt)
		}
		pl.entries[k] = v
	}
	if _, ok := pl.entries["parent_linkage"]; !ok {
		return nil, fmt.Errorf("parent locator without parent_linkage: %w", drivers.ErrCorrupt)
	}
	return pl, nil
}

// paths lists where the parent may be, in the order the spec gives:
// relative_path (relative to dir), volume_path, absolute_win32_path.
// Windows paths become slash paths; a drive-letter or volume path names
// nothing here, so its last element is looked for beside the image.
func (pl *parentLocator) paths(dir string) []string {
	var out []string
	for _, k := range []string{"relative_path", "volume_path", "absolute_win32_path"} {
		v, ok := pl.entries[k]
		if !ok || v == "" {
			continue
		}
		p := strings.ReplaceAll(v, `\`, "/")
		switch {
		case k == "relative_path":
			p = filepath.Join(dir, strings.TrimPrefix(p, "./"))
		case strings.HasPrefix(p, "//") || (len(p) >= 2 && p[1] == ':'):
			p = filepath.Join(dir, filepath.Base(p))
		}
		out = append(out, p)
	}
	return out
}

// linkage reports whether the parent whose DataWriteGuid is g is the one
// the locator names (parent_linkage, or parent_linkage2).
func (pl *parentLocator) linkage(g guid) bool {
	for _, k := range []string{"parent_linkage", "parent_linkage2"} {
		if v, ok := pl.entries[k]; ok {
			if pg, ok := parseGUID(v); ok && pg == g {
				return true
			}
		}
	}
	return false
}

// probe: the file type identifier "vhdxfile" (block/vhdx.c's probe, 100).
func probe(in drivers.ProbeInput) int {
	if len(in.Head) >= 8 && string(in.Head[:8]) == "vhdxfile" {
		return 100
	}
	return 0
}
