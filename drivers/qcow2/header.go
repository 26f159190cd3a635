package qcow2

import (
	"bytes"
	"encoding/binary"
	"fmt"
	"math"
	"math/bits"
	"sort"
	"strings"

	"imgfuse/drivers"
)

// Header layout (qcow2.txt "Header"): byte offsets of the fields.
const (
	hdrV2Len          = 72  // the whole v2 header
	hdrV3MinLen       = 104 // v3 header without compression_type
	hdrCompressionOff = 104
	hdrExtraOff       = 105 // first byte past compression_type
	hdrV3DefaultLen   = 112 // what QEMU writes: 104 + compression_type + padding

	featureEntryLen  = 48 // {u8 type, u8 bit, char name[46]}
	featureNameLen   = 46
	maxBackingFmtLen = 15 // QEMU: len < sizeof(backing_format) == 16

	bitmapsExtLen          = 24
	cryptoExtLen           = 16
	maxBitmaps             = 65535
	maxBitmapDirectorySize = 1024 * maxBitmaps

	// Feature table types.
	featIncompat  = 0
	featCompat    = 1
	featAutoclear = 2

	// crypt_method values (header offset 32).
	cryptAES  = 1
	cryptLUKS = 2
)

var be = binary.BigEndian

// corruptf wraps drivers.ErrCorrupt; the driver adds "qcow2: PATH:" above.
func corruptf(format string, args ...any) error {
	return fmt.Errorf(format+": %w", append(args, drivers.ErrCorrupt)...)
}

// unsupportedf wraps drivers.ErrUnsupported; the driver adds "qcow2: PATH:" above.
func unsupportedf(format string, args ...any) error {
	return fmt.Errorf(format+": %w", append(args, drivers.ErrUnsupported)...)
}

// cstring returns b up to its first NUL: QEMU copies names into
// NUL-terminated C strings, so a NUL inside a stored name ends it.
func cstring(b []byte) string {
	if i := bytes.IndexByte(b, 0); i >= 0 {
		b = b[:i]
	}
	return string(b)
}

// validateTable applies QEMU's qcow2_validate_table: entries*entryLen is at
// most maxBytes, offset+size does not pass INT64_MAX, and the table starts
// on a cluster boundary.
func validateTable(name string, offset, entries, entryLen, maxBytes uint64, clusterBits uint32) error {
	if entries > maxBytes/entryLen {
		return corruptf("%s too large (%d entries of %d bytes, limit %d bytes)", name, entries, entryLen, maxBytes)
	}
	size := entries * entryLen // cannot overflow: bounded by maxBytes
	if offset > math.MaxInt64-size {
		return corruptf("%s offset %#x invalid: table end overflows", name, offset)
	}
	if offset&(1<<clusterBits-1) != 0 {
		return corruptf("%s offset %#x not cluster-aligned", name, offset)
	}
	return nil
}

// parseHeader parses and validates the header, its extensions, and the
// backing file name.
//
// buf holds the start of the file: at least min(clusterSize, fileSize)
// bytes (callers pass min(2 MiB, fileSize) bytes, which covers every legal
// cluster size); fileSize is the image file's length. Bytes of cluster 0
// past the end of the file read as zeros, as they do for QEMU.
//
// Errors wrap drivers.ErrCorrupt when the header contradicts the format and
// drivers.ErrUnsupported when it is valid but uses something imgfuse does
// not implement (encryption, unknown incompatible features, versions other
// than 2 and 3, cluster sizes over 2 MiB). The dirty and corrupt bits are
// accepted: the caller decides what they mean for the open.
//
// The checks follow QEMU's qcow2_do_open and qcow2_read_extensions, in
// QEMU's order where the order decides which error is reported.
func parseHeader(buf []byte, fileSize int64) (*header, error) {
	if fileSize < 0 {
		return nil, fmt.Errorf("negative file size %d", fileSize)
	}
	if int64(len(buf)) > fileSize {
		buf = buf[:fileSize]
	}
	if len(buf) < hdrV2Len {
		return nil, corruptf("file of %d bytes is too short for a header", fileSize)
	}
	if m := be.Uint32(buf[0:]); m != magic {
		return nil, corruptf("bad magic %#08x, not a qcow2 image", m)
	}
	h := &header{
		Version:          be.Uint32(buf[4:]),
		BackingOffset:    be.Uint64(buf[8:]),
		BackingSize:      be.Uint32(buf[16:]),
		ClusterBits:      be.Uint32(buf[20:]),
		Size:             be.Uint64(buf[24:]),
		CryptMethod:      be.Uint32(buf[32:]),
		L1Size:           be.Uint32(buf[36:]),
		L1Offset:         be.Uint64(buf[40:]),
		ReftableOffset:   be.Uint64(buf[48:]),
		ReftableClusters: be.Uint32(buf[56:]),
		NbSnapshots:      be.Uint32(buf[60:]),
		SnapshotsOffset:  be.Uint64(buf[64:]),
	}
	switch h.Version {
	case 2, 3:
	case 1:
		return nil, unsupportedf("version 1 (qcow) images")
	default:
		return nil, unsupportedf("version %d", h.Version)
	}
	switch cb := h.ClusterBits; {
	case cb < minClusterBits:
		return nil, corruptf("cluster_bits %d below the minimum %d", cb, minClusterBits)
	case cb > 55:
		// Host offsets live in bits 9..55 of L1/L2 entries: a cluster
		// larger than that address space is not a valid image.
		return nil, corruptf("cluster_bits %d out of range", cb)
	case cb > maxClusterBits:
		return nil, unsupportedf("cluster size 2^%d (more than 2 MiB)", cb)
	}
	cs := uint64(1) << h.ClusterBits

	if int64(len(buf)) < min(int64(cs), fileSize) {
		return nil, fmt.Errorf("header buffer holds %d bytes, need %d", len(buf), min(int64(cs), fileSize))
	}
	// Cluster 0 as QEMU sees it: past EOF reads as zeros. The header,
	// extensions and backing name all live in it, so every later access
	// is a bounds-checked slice of c0.
	c0 := buf
	if uint64(len(c0)) > cs {
		c0 = c0[:cs]
	} else if uint64(len(c0)) < cs {
		c0 = make([]byte, cs)
		copy(c0, buf)
	}

	if h.Version == 2 {
		h.RefcountOrder = 4
		h.HeaderLength = hdrV2Len
	} else {
		if fileSize < hdrV3MinLen {
			return nil, corruptf("file of %d bytes is too short for a version 3 header", fileSize)
		}
		h.Incompatible = be.Uint64(c0[72:])
		h.Compatible = be.Uint64(c0[80:])
		h.Autoclear = be.Uint64(c0[88:])
		h.RefcountOrder = be.Uint32(c0[96:])
		h.HeaderLength = be.Uint32(c0[100:])
		if h.HeaderLength < hdrV3MinLen {
			return nil, corruptf("header_length %d below %d", h.HeaderLength, hdrV3MinLen)
		}
		if h.HeaderLength%8 != 0 {
			return nil, corruptf("header_length %d not a multiple of 8", h.HeaderLength)
		}
	}
	if uint64(h.HeaderLength) > cs {
		return nil, corruptf("header_length %d exceeds the cluster size %d", h.HeaderLength, cs)
	}
	if int64(h.HeaderLength) > fileSize {
		return nil, corruptf("header_length %d runs past the end of the %d-byte file", h.HeaderLength, fileSize)
	}
	if h.HeaderLength > hdrCompressionOff {
		h.CompressionType = c0[hdrCompressionOff]
	}
	if h.HeaderLength > hdrExtraOff {
		h.ExtraHeader = bytes.Clone(c0[hdrExtraOff:h.HeaderLength])
	}

	if h.BackingOffset > cs {
		return nil, corruptf("backing file offset %#x outside cluster 0", h.BackingOffset)
	}
	extEnd := cs
	if h.BackingOffset != 0 {
		extEnd = h.BackingOffset
	}

	// Compression type (QEMU validate_compression_type): the field and
	// incompatible bit 3 must agree both ways.
	hasBit := h.Incompatible&incompatCompression != 0
	switch {
	case h.CompressionType == compressionDeflate && hasBit:
		return nil, corruptf("compression type incompatible feature bit set with compression type zlib")
	case h.CompressionType != compressionDeflate && !hasBit:
		return nil, corruptf("compression type %d without the compression type incompatible feature bit", h.CompressionType)
	case h.CompressionType > compressionZstd:
		return nil, unsupportedf("compression type %d", h.CompressionType)
	}

	if unknown := h.Incompatible &^ incompatKnown; unknown != 0 {
		// The layout of the rest may depend on the unknown feature, so
		// only the feature names are looked for, leniently, to name the
		// bits in the error (as QEMU's report_unsupported_feature does).
		names := scanFeatureNames(c0, uint64(h.HeaderLength), extEnd)
		return nil, unsupportedFeatures(unknown, names)
	}

	if h.RefcountOrder > 6 {
		return nil, corruptf("refcount_order %d above 6", h.RefcountOrder)
	}
	if h.extendedL2() && h.ClusterBits < 14 {
		return nil, corruptf("extended L2 entries with cluster_bits %d (need at least 14)", h.ClusterBits)
	}
	if h.ReftableClusters == 0 {
		return nil, corruptf("no refcount table (refcount_table_clusters is 0)")
	}
	if err := validateTable("refcount table", h.ReftableOffset, uint64(h.ReftableClusters), cs, maxReftableBytes, h.ClusterBits); err != nil {
		return nil, err
	}
	if h.NbSnapshots > maxSnapshots {
		return nil, corruptf("%d snapshots (limit %d)", h.NbSnapshots, maxSnapshots)
	}
	if err := validateTable("snapshot table", h.SnapshotsOffset, uint64(h.NbSnapshots), snapshotHeaderLen, snapshotHeaderLen*maxSnapshots, h.ClusterBits); err != nil {
		return nil, err
	}
	if err := validateTable("active L1 table", h.L1Offset, uint64(h.L1Size), 8, maxL1Bytes, h.ClusterBits); err != nil {
		return nil, err
	}
	if need := h.l1EntriesFor(h.Size); uint64(h.L1Size) < need {
		return nil, corruptf("L1 table of %d entries too small for a virtual size of %d bytes (need %d)", h.L1Size, h.Size, need)
	}

	if err := h.parseExtensions(c0, uint64(h.HeaderLength), extEnd); err != nil {
		return nil, err
	}
	if h.Autoclear&autoclearDataFileRaw != 0 && !h.hasDataFile() {
		return nil, corruptf("data-file-raw autoclear bit without an external data file")
	}
	if h.HasCrypto && h.CryptMethod != cryptLUKS {
		return nil, corruptf("crypto header extension with encryption method %d", h.CryptMethod)
	}

	if h.BackingOffset != 0 {
		if uint64(h.BackingSize) > min(maxBackingName, cs-h.BackingOffset) {
			return nil, corruptf("backing file name of %d bytes at %#x does not fit in cluster 0 (or exceeds %d bytes)", h.BackingSize, h.BackingOffset, maxBackingName)
		}
		h.BackingFile = cstring(c0[h.BackingOffset : h.BackingOffset+uint64(h.BackingSize)])
	}

	switch h.CryptMethod {
	case 0:
	case cryptAES:
		return nil, unsupportedf("AES-encrypted qcow2 images are not supported")
	case cryptLUKS:
		return nil, unsupportedf("LUKS-encrypted qcow2 images are not supported")
	default:
		return nil, unsupportedf("encrypted qcow2 images are not supported (crypt_method %d)", h.CryptMethod)
	}
	return h, nil
}

// l1EntriesFor is how many L1 entries map a disk of size bytes (QEMU's
// size_to_l1). It cannot overflow: the shift is at most 21+18.
func (h *header) l1EntriesFor(size uint64) uint64 {
	shift := h.ClusterBits + uint32(bits.TrailingZeros64(uint64(h.l2Entries())))
	n := size >> shift
	if size&(1<<shift-1) != 0 {
		n++
	}
	return n
}

// parseExtensions reads the header extensions in c0[start:end) (QEMU's
// qcow2_read_extensions, with its bounds) into h.
func (h *header) parseExtensions(c0 []byte, start, end uint64) error {
	seen := map[uint32]bool{}
	for off := start; off < end; {
		// QEMU reads the 8-byte extension header even when it crosses
		// the bound and then rejects it; c0 is a whole cluster and
		// end <= len(c0), so the slice below is in range whenever the
		// check passes.
		if end-off < 8 {
			return corruptf("header extension at %#x crosses the extension area end %#x", off, end)
		}
		typ := be.Uint32(c0[off:])
		n := uint64(be.Uint32(c0[off+4:]))
		off += 8
		if n > end-off {
			return corruptf("header extension %#08x at %#x: length %d runs past %#x", typ, off-8, n, end)
		}
		data := c0[off : off+n]
		off += (n + 7) &^ 7
		if typ == extEnd {
			return nil
		}
		switch typ {
		case extBackingFmt, extFeatureTable, extBitmaps, extCrypto, extDataFile:
			if seen[typ] {
				return corruptf("duplicate header extension %#08x", typ)
			}
			seen[typ] = true
		}
		switch typ {
		case extBackingFmt:
			if n > maxBackingFmtLen {
				return corruptf("backing format extension of %d bytes (limit %d)", n, maxBackingFmtLen)
			}
			h.BackingFormat = cstring(data)
		case extFeatureTable:
			h.FeatureNames = parseFeatureTable(data)
		case extBitmaps:
			if n != bitmapsExtLen {
				return corruptf("bitmaps extension of %d bytes, want %d", n, bitmapsExtLen)
			}
			if h.Autoclear&autoclearBitmaps == 0 {
				// A bitmap-unaware writer touched the image: the
				// bitmaps are stale and QEMU drops the extension
				// on its next header write. So do we.
				continue
			}
			nb := be.Uint32(data[0:])
			if be.Uint32(data[4:]) != 0 {
				return corruptf("bitmaps extension: reserved field is not zero")
			}
			dirSize := be.Uint64(data[8:])
			dirOff := be.Uint64(data[16:])
			if nb == 0 || nb > maxBitmaps {
				return corruptf("bitmaps extension: %d bitmaps (want 1..%d)", nb, maxBitmaps)
			}
			if dirSize > maxBitmapDirectorySize {
				return corruptf("bitmaps extension: directory of %d bytes (limit %d)", dirSize, maxBitmapDirectorySize)
			}
			if dirOff&(1<<h.ClusterBits-1) != 0 || dirOff > math.MaxInt64-dirSize {
				return corruptf("bitmaps extension: invalid directory offset %#x", dirOff)
			}
			h.HasBitmaps = true
			h.NbBitmaps, h.BitmapDirSize, h.BitmapDirOffset = nb, dirSize, dirOff
		case extCrypto:
			if n != cryptoExtLen {
				return corruptf("crypto header extension of %d bytes, want %d", n, cryptoExtLen)
			}
			h.CryptoOffset = be.Uint64(data[0:])
			h.CryptoLength = be.Uint64(data[8:])
			if h.CryptoOffset&(1<<h.ClusterBits-1) != 0 {
				return corruptf("crypto header offset %#x not cluster-aligned", h.CryptoOffset)
			}
			h.HasCrypto = true
		case extDataFile:
			// QEMU only uses (and only rewrites) the name when the
			// data file bit is set.
			if h.hasDataFile() {
				h.DataFile = cstring(data)
			}
		default:
			h.UnknownExts = append(h.UnknownExts, extension{Type: typ, Data: bytes.Clone(data)})
		}
	}
	return nil
}

// parseFeatureTable decodes the feature name table. A trailing partial
// entry is ignored and so are entries of unknown type or with an empty
// name; the table only names bits, it never changes what they mean. The
// result is nil when the table names nothing.
func parseFeatureTable(data []byte) map[uint16]string {
	var names map[uint16]string
	for ; len(data) >= featureEntryLen; data = data[featureEntryLen:] {
		typ, bit := data[0], data[1]
		name := cstring(data[2:featureEntryLen])
		if typ > featAutoclear || bit > 63 || name == "" {
			continue
		}
		if names == nil {
			names = map[uint16]string{}
		}
		names[uint16(typ)<<8|uint16(bit)] = name
	}
	return names
}

// scanFeatureNames looks for the feature name table without validating
// anything else, for naming unknown feature bits in an error.
func scanFeatureNames(c0 []byte, start, end uint64) map[uint16]string {
	for off := start; off < end && end-off >= 8; {
		typ := be.Uint32(c0[off:])
		n := uint64(be.Uint32(c0[off+4:]))
		off += 8
		if typ == extEnd || n > end-off {
			return nil
		}
		if typ == extFeatureTable {
			return parseFeatureTable(c0[off : off+n])
		}
		off += (n + 7) &^ 7
	}
	return nil
}

// unsupportedFeatures names every bit of unknown, from the image's own
// feature table when it has the name.
func unsupportedFeatures(unknown uint64, names map[uint16]string) error {
	var parts []string
	for bit := 0; bit < 64; bit++ {
		if unknown&(1<<bit) == 0 {
			continue
		}
		if name, ok := names[uint16(featIncompat)<<8|uint16(bit)]; ok {
			parts = append(parts, fmt.Sprintf("%q (incompatible feature bit %d)", name, bit))
		} else {
			parts = append(parts, fmt.Sprintf("unknown incompatible feature bit %d", bit))
		}
	}
	return unsupportedf("unsupported qcow2 feature(s): %s", strings.Join(parts, ", "))
}

// qemuFeatureNames is the feature name table QEMU 7.2 writes into v3
// images whose clusters are larger than 4 KiB (verified: 512-byte and 4 KiB
// images get no table, 8 KiB ones do; the table's 392 bytes would crowd out
// the backing file name). A writer creating such an image sets
// h.FeatureNames to it.
func qemuFeatureNames() map[uint16]string {
	return map[uint16]string{
		featIncompat<<8 | 0:  "dirty bit",
		featIncompat<<8 | 1:  "corrupt bit",
		featIncompat<<8 | 2:  "external data file",
		featIncompat<<8 | 3:  "compression type",
		featIncompat<<8 | 4:  "extended L2 entries",
		featCompat<<8 | 0:    "lazy refcounts",
		featAutoclear<<8 | 0: "bitmaps",
		featAutoclear<<8 | 1: "raw external data",
	}
}

// marshalHeaderCluster renders cluster 0 the way QEMU's qcow2_update_header
// writes it: the header fields (with ExtraHeader preserved up to
// HeaderLength), then the extensions in QEMU's order — backing format, data
// file name, crypto header pointer, feature table (v3), bitmaps, unknown
// extensions in their original order — the end marker, and the backing file
// name. The result is exactly one cluster long.
//
// Layout fields are outputs, not inputs: BackingOffset and BackingSize are
// recomputed, and HeaderLength is kept when it is a valid v3 length that
// holds ExtraHeader (else 112, or more for a long ExtraHeader). h is not
// modified. The feature table written is exactly h.FeatureNames (sorted by
// type and bit), so parse→marshal→parse is the identity on the fields
// parseHeader fills.
func marshalHeaderCluster(h *header) ([]byte, error) {
	if h.ClusterBits < minClusterBits || h.ClusterBits > maxClusterBits {
		return nil, fmt.Errorf("marshal header: cluster_bits %d out of range", h.ClusterBits)
	}
	cs := 1 << h.ClusterBits
	var hl int
	switch h.Version {
	case 2:
		if h.Incompatible != 0 || h.Compatible != 0 || h.Autoclear != 0 || h.RefcountOrder != 4 ||
			h.CompressionType != 0 || len(h.ExtraHeader) != 0 {
			return nil, fmt.Errorf("marshal header: version 2 cannot carry v3 fields")
		}
		hl = hdrV2Len
	case 3:
		hl = int(h.HeaderLength)
		fits := hl%8 == 0 && (hl == hdrV3MinLen && h.CompressionType == 0 && len(h.ExtraHeader) == 0 ||
			hl > hdrV3MinLen && hdrExtraOff+len(h.ExtraHeader) <= hl)
		if !fits {
			hl = max(hdrV3DefaultLen, (hdrExtraOff+len(h.ExtraHeader)+7)&^7)
		}
	default:
		return nil, fmt.Errorf("marshal header: version %d", h.Version)
	}
	if len(h.BackingFile) > maxBackingName {
		return nil, fmt.Errorf("marshal header: backing file name of %d bytes (limit %d)", len(h.BackingFile), maxBackingName)
	}
	if len(h.BackingFormat) > maxBackingFmtLen {
		return nil, fmt.Errorf("marshal header: backing format of %d bytes (limit %d)", len(h.BackingFormat), maxBackingFmtLen)
	}

	out := make([]byte, cs)
	if hl > cs {
		return nil, fmt.Errorf("marshal header: header of %d bytes exceeds the cluster", hl)
	}
	be.PutUint32(out[0:], magic)
	be.PutUint32(out[4:], h.Version)
	be.PutUint32(out[20:], h.ClusterBits)
	be.PutUint64(out[24:], h.Size)
	be.PutUint32(out[32:], h.CryptMethod)
	be.PutUint32(out[36:], h.L1Size)
	be.PutUint64(out[40:], h.L1Offset)
	be.PutUint64(out[48:], h.ReftableOffset)
	be.PutUint32(out[56:], h.ReftableClusters)
	be.PutUint32(out[60:], h.NbSnapshots)
	be.PutUint64(out[64:], h.SnapshotsOffset)
	if h.Version == 3 {
		be.PutUint64(out[72:], h.Incompatible)
		be.PutUint64(out[80:], h.Compatible)
		be.PutUint64(out[88:], h.Autoclear)
		be.PutUint32(out[96:], h.RefcountOrder)
		be.PutUint32(out[100:], uint32(hl))
		if hl > hdrCompressionOff {
			out[hdrCompressionOff] = h.CompressionType
			copy(out[hdrExtraOff:hl], h.ExtraHeader)
		}
	}

	off := hl
	var errFull bool
	add := func(typ uint32, data []byte) {
		padded := (len(data) + 7) &^ 7
		if errFull || off+8+padded > cs {
			errFull = true
			return
		}
		be.PutUint32(out[off:], typ)
		be.PutUint32(out[off+4:], uint32(len(data)))
		copy(out[off+8:], data)
		off += 8 + padded
	}
	if h.BackingFormat != "" {
		add(extBackingFmt, []byte(h.BackingFormat))
	}
	if h.hasDataFile() && h.DataFile != "" {
		add(extDataFile, []byte(h.DataFile))
	}
	if h.HasCrypto {
		var b [cryptoExtLen]byte
		be.PutUint64(b[0:], h.CryptoOffset)
		be.PutUint64(b[8:], h.CryptoLength)
		add(extCrypto, b[:])
	}
	if h.Version == 3 && len(h.FeatureNames) > 0 {
		add(extFeatureTable, marshalFeatureTable(h.FeatureNames))
	}
	if h.HasBitmaps {
		var b [bitmapsExtLen]byte
		be.PutUint32(b[0:], h.NbBitmaps)
		be.PutUint64(b[8:], h.BitmapDirSize)
		be.PutUint64(b[16:], h.BitmapDirOffset)
		add(extBitmaps, b[:])
	}
	for _, e := range h.UnknownExts {
		switch e.Type {
		case extEnd, extBackingFmt, extFeatureTable, extBitmaps, extCrypto, extDataFile:
			return nil, fmt.Errorf("marshal header: unknown extension with known type %#08x", e.Type)
		}
		add(e.Type, e.Data)
	}
	add(extEnd, nil)
	if errFull {
		return nil, fmt.Errorf("marshal header: extensions do not fit in a %d-byte cluster", cs)
	}
	if h.BackingFile != "" {
		if strings.IndexByte(h.BackingFile, 0) >= 0 {
			return nil, fmt.Errorf("marshal header: NUL in backing file name")
		}
		if off+len(h.BackingFile) > cs {
			return nil, fmt.Errorf("marshal header: backing file name does not fit in cluster 0")
		}
		be.PutUint64(out[8:], uint64(off))
		be.PutUint32(out[16:], uint32(len(h.BackingFile)))
		copy(out[off:], h.BackingFile)
	}
	return out, nil
}

// marshalFeatureTable renders names sorted by (type, bit), the order QEMU
// writes its own table in.
func marshalFeatureTable(names map[uint16]string) []byte {
	keys := make([]int, 0, len(names))
	for k := range names {
		keys = append(keys, int(k))
	}
	sort.Ints(keys)
	out := make([]byte, 0, len(keys)*featureEntryLen)
	for _, k := range keys {
		var e [featureEntryLen]byte
		e[0], e[1] = byte(k>>8), byte(k)
		copy(e[2:], names[uint16(k)]) // longer names are cut to 46 bytes
		out = append(out, e[:]...)
	}
	return out
}
