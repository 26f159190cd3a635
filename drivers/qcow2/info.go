package qcow2

import "fmt"

// formatInfo is the qcow2-specific part of `imgfuse info`, with the field
// names qemu-img uses in its format-specific data where it has them.
type formatInfo struct {
	Compat          string      `json:"compat"` // "0.10" (v2) or "1.1" (v3)
	ClusterSize     int64       `json:"cluster-size"`
	RefcountBits    int         `json:"refcount-bits"`
	LazyRefcounts   bool        `json:"lazy-refcounts"`
	Corrupt         bool        `json:"corrupt"`
	Dirty           bool        `json:"dirty"`
	ExtendedL2      bool        `json:"extended-l2"`
	CompressionType string      `json:"compression-type"` // "zlib" or "zstd"
	DataFile        string      `json:"data-file,omitempty"`
	DataFileRaw     bool        `json:"data-file-raw,omitempty"`
	Bitmaps         bool        `json:"bitmaps,omitempty"`
	Incompatible    featureBits `json:"incompatible-features"`
	Compatible      featureBits `json:"compatible-features"`
	Autoclear       featureBits `json:"autoclear-features"`
	BackingFile     string      `json:"backing-file,omitempty"`
	BackingFormat   string      `json:"backing-format,omitempty"`
}

// qemuSpecific is the "data" of QEMU's ImageInfoSpecificQCow2, field for
// field: lazy-refcounts, corrupt and extended-l2 exist only in version 3
// images; data-file and data-file-raw only with an external data file.
// bitmaps lists the persistent dirty bitmaps, when there are any.
type qemuSpecific struct {
	Compat          string       `json:"compat"`
	CompressionType string       `json:"compression-type"`
	LazyRefcounts   *bool        `json:"lazy-refcounts,omitempty"`
	Bitmaps         []qemuBitmap `json:"bitmaps,omitempty"`
	RefcountBits    int          `json:"refcount-bits"`
	DataFile        string       `json:"data-file,omitempty"`
	DataFileRaw     *bool        `json:"data-file-raw,omitempty"`
	Corrupt         *bool        `json:"corrupt,omitempty"`
	ExtendedL2      *bool        `json:"extended-l2,omitempty"`
}

func (h *header) qemuSpecific() qemuSpecific {
	fi := h.formatInfo()
	q := qemuSpecific{Compat: fi.Compat, CompressionType: fi.CompressionType, RefcountBits: fi.RefcountBits}
	if h.Version >= 3 {
		q.LazyRefcounts, q.Corrupt, q.ExtendedL2 = &fi.LazyRefcounts, &fi.Corrupt, &fi.ExtendedL2
	}
	if h.hasDataFile() {
		q.DataFile, q.DataFileRaw = fi.DataFile, &fi.DataFileRaw
	}
	return q
}

// qemuBitmap is QEMU's Qcow2BitmapInfo.
type qemuBitmap struct {
	Flags       []string `json:"flags"`
	Name        string   `json:"name"`
	Granularity uint64   `json:"granularity"`
}

// bitmapDirEntryLen is the fixed part of a bitmap directory entry:
// table offset u64, table size u32, flags u32, type u8, granularity bits
// u8, name size u16, extra data size u32.
const bitmapDirEntryLen = 24

// parseBitmapDirectory describes the n bitmaps of a bitmap directory as
// QEMU's info does (flags in-use and auto, name, granularity).
func parseBitmapDirectory(dir []byte, n uint32) ([]qemuBitmap, error) {
	out := []qemuBitmap{}
	p := 0
	for k := uint32(0); k < n; k++ {
		if p+bitmapDirEntryLen > len(dir) {
			return nil, corruptf("bitmap directory entry %d runs past the directory", k)
		}
		e := dir[p:]
		flags := be.Uint32(e[12:])
		gbits := e[17]
		nameLen := int(be.Uint16(e[18:]))
		extraLen := int(be.Uint32(e[20:]))
		if extraLen > len(dir) || p+bitmapDirEntryLen+extraLen+nameLen > len(dir) {
			return nil, corruptf("bitmap directory entry %d runs past the directory", k)
		}
		if gbits > 63 {
			return nil, corruptf("bitmap %d has granularity bits %d", k, gbits)
		}
		nameOff := p + bitmapDirEntryLen + extraLen
		b := qemuBitmap{Flags: []string{}, Name: string(dir[nameOff : nameOff+nameLen]), Granularity: 1 << gbits}
		if flags&1 != 0 {
			b.Flags = append(b.Flags, "in-use")
		}
		if flags&2 != 0 {
			b.Flags = append(b.Flags, "auto")
		}
		out = append(out, b)
		p += (bitmapDirEntryLen + extraLen + nameLen + 7) &^ 7
	}
	return out, nil
}

// qemuSpecific is h.qemuSpecific with the persistent bitmaps listed (QEMU
// lists them only while the autoclear bit says they are maintained).
func (img *image) qemuSpecific() qemuSpecific {
	q := img.h.qemuSpecific()
	h := img.h
	if !h.HasBitmaps || h.Autoclear&autoclearBitmaps == 0 || h.BitmapDirSize > maxBitmapDirectorySize {
		return q
	}
	dir := make([]byte, h.BitmapDirSize)
	if err := img.file.Pread(dir, int64(h.BitmapDirOffset)); err != nil {
		return q
	}
	if bm, err := parseBitmapDirectory(dir, h.NbBitmaps); err == nil && len(bm) > 0 {
		q.Bitmaps = bm
	}
	return q
}

// featureBits is one feature word: its value and the names of its set bits.
type featureBits struct {
	Bits  uint64   `json:"bits"`
	Names []string `json:"names,omitempty"`
}

// formatInfo describes h. Bit names come from the image's own feature
// table, then from the names QEMU uses, else "bit N".
func (h *header) formatInfo() formatInfo {
	fi := formatInfo{
		Compat:          "1.1",
		ClusterSize:     h.clusterSize(),
		RefcountBits:    1 << h.RefcountOrder,
		LazyRefcounts:   h.Compatible&compatLazyRefcounts != 0,
		Corrupt:         h.Incompatible&incompatCorrupt != 0,
		Dirty:           h.Incompatible&incompatDirty != 0,
		ExtendedL2:      h.extendedL2(),
		CompressionType: compressionName(h.CompressionType),
		DataFile:        h.DataFile,
		DataFileRaw:     h.Autoclear&autoclearDataFileRaw != 0,
		Bitmaps:         h.HasBitmaps,
		Incompatible:    h.featureBits(featIncompat, h.Incompatible),
		Compatible:      h.featureBits(featCompat, h.Compatible),
		Autoclear:       h.featureBits(featAutoclear, h.Autoclear),
		BackingFile:     h.BackingFile,
		BackingFormat:   h.BackingFormat,
	}
	if h.Version == 2 {
		fi.Compat = "0.10"
	}
	return fi
}

func (h *header) featureBits(typ uint16, v uint64) featureBits {
	fb := featureBits{Bits: v}
	std := qemuFeatureNames()
	for bit := uint16(0); bit < 64; bit++ {
		if v&(1<<bit) == 0 {
			continue
		}
		key := typ<<8 | bit
		name, ok := h.FeatureNames[key]
		if !ok {
			name, ok = std[key]
		}
		if !ok {
			name = fmt.Sprintf("bit %d", bit)
		}
		fb.Names = append(fb.Names, name)
	}
	return fb
}
