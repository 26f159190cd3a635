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
// (QEMU also lists persistent bitmaps; imgfuse reports only their presence,
// under its own "imgfuse" key.)
type qemuSpecific struct {
	Compat          string `json:"compat"`
	CompressionType string `json:"compression-type"`
	LazyRefcounts   *bool  `json:"lazy-refcounts,omitempty"`
	RefcountBits    int    `json:"refcount-bits"`
	DataFile        string `json:"data-file,omitempty"`
	DataFileRaw     *bool  `json:"data-file-raw,omitempty"`
	Corrupt         *bool  `json:"corrupt,omitempty"`
	ExtendedL2      *bool  `json:"extended-l2,omitempty"`
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
