package qcow2

import (
	"errors"
	"testing"

	"imgfuse/drivers"
)

// geometryImage returns an image with just the fields the entry decoders
// use.
func geometryImage(version uint32, clusterBits uint32, extL2, dataFile bool) *image {
	h := &header{Version: version, ClusterBits: clusterBits}
	if extL2 {
		h.Incompatible |= incompatExtendedL2
	}
	if dataFile {
		h.Incompatible |= incompatDataFile
	}
	return &image{h: h, l2Format: newL2Format(h)}
}

func TestEntryRange(t *testing.T) {
	const host = 0x50000
	bm := func(alloc, zero uint32) uint64 { return uint64(zero)<<32 | uint64(alloc) }
	tests := []struct {
		name            string
		version         uint32
		extL2, dataFile bool
		entry, bitmap   uint64
		sc              int
		wantType        clusterType
		wantCount       int
		wantCorrupt     bool
	}{
		{name: "unallocated", version: 3, entry: 0, wantType: ctUnallocated, wantCount: 1},
		{name: "normal", version: 3, entry: host | oflagCopied, wantType: ctNormal, wantCount: 1},
		{name: "normal without COPIED", version: 2, entry: host, wantType: ctNormal, wantCount: 1},
		{name: "zero plain", version: 3, entry: oflagZero, wantType: ctZeroPlain, wantCount: 1},
		{name: "zero alloc", version: 3, entry: host | oflagZero, wantType: ctZeroAlloc, wantCount: 1},
		{name: "zero flag in v2", version: 2, entry: oflagZero, wantCorrupt: true},
		{name: "reserved bit 1", version: 3, entry: host | 2, wantCorrupt: true},
		{name: "reserved bit 56", version: 3, entry: host | 1<<56, wantCorrupt: true},
		{name: "compressed", version: 3, entry: oflagCompressed | 0x12345, wantType: ctCompressed, wantCount: 1},
		{name: "compressed with data file", version: 3, dataFile: true, entry: oflagCompressed | 0x12345, wantCorrupt: true},
		{name: "data file offset 0 COPIED", version: 3, dataFile: true, entry: oflagCopied, wantType: ctNormal, wantCount: 1},
		{name: "data file offset 0", version: 3, dataFile: true, entry: 0, wantType: ctUnallocated, wantCount: 1},

		{name: "ext unallocated", version: 3, extL2: true, sc: 3, wantType: ctUnallocated, wantCount: 29},
		{name: "ext unallocated up to zero", version: 3, extL2: true, bitmap: bm(0, 1<<10), sc: 3, wantType: ctUnallocated, wantCount: 7},
		{name: "ext zero plain run", version: 3, extL2: true, bitmap: bm(0, 0xf0), sc: 5, wantType: ctZeroPlain, wantCount: 3},
		{name: "ext alloc bit on unallocated", version: 3, extL2: true, bitmap: bm(1<<31, 0), sc: 0, wantCorrupt: true},
		{name: "ext normal run", version: 3, extL2: true, entry: host | oflagCopied, bitmap: bm(0x0ff0, 0), sc: 4, wantType: ctNormal, wantCount: 8},
		{name: "ext normal to end", version: 3, extL2: true, entry: host, bitmap: bm(0xffffffff, 0), sc: 31, wantType: ctNormal, wantCount: 1},
		{name: "ext unallocated alloc", version: 3, extL2: true, entry: host, bitmap: bm(0x1, 0x100), sc: 1, wantType: ctUnallocatedAlloc, wantCount: 7},
		{name: "ext unallocated alloc bitmap 0", version: 3, extL2: true, entry: host, bitmap: 0, sc: 0, wantType: ctUnallocatedAlloc, wantCount: 32},
		{name: "ext zero alloc", version: 3, extL2: true, entry: host, bitmap: bm(0x3, 0xc), sc: 2, wantType: ctZeroAlloc, wantCount: 2},
		{name: "ext alloc and zero", version: 3, extL2: true, entry: host, bitmap: bm(0x3, 0x2), sc: 0, wantCorrupt: true},
		{name: "ext compressed bitmap", version: 3, extL2: true, entry: oflagCompressed | 0x12345, bitmap: 1, wantCorrupt: true},
		{name: "ext compressed", version: 3, extL2: true, entry: oflagCompressed | 0x12345, sc: 7, wantType: ctCompressed, wantCount: 25},
		{name: "ext zero flag", version: 3, extL2: true, entry: host | oflagZero, wantCorrupt: true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			img := geometryImage(tc.version, 16, tc.extL2, tc.dataFile)
			typ, n, err := img.entryRange(tc.entry, tc.bitmap, tc.sc)
			if tc.wantCorrupt {
				if !errors.Is(err, drivers.ErrCorrupt) {
					t.Fatalf("entryRange(%#x, %#x, %d) = %v, %d, %v; want ErrCorrupt", tc.entry, tc.bitmap, tc.sc, typ, n, err)
				}
				return
			}
			if err != nil || typ != tc.wantType || n != tc.wantCount {
				t.Fatalf("entryRange(%#x, %#x, %d) = %v, %d, %v; want %v, %d", tc.entry, tc.bitmap, tc.sc, typ, n, err, tc.wantType, tc.wantCount)
			}
		})
	}
}

func TestCompressedRange(t *testing.T) {
	tests := []struct {
		name        string
		clusterBits uint32
		entry       uint64
		coff, csize int64
	}{
		// qcow2.md §1.7: at 64 KiB, 0x4740000000050000 has sector field
		// 0x1d: 30 sectors from the aligned offset 0x50000.
		{"64k documented", 16, 0x4740000000050000, 0x50000, 30 * 512},
		// An unaligned start shortens the first sector.
		{"64k unaligned", 16, oflagCompressed | 2<<54 | 0x50123, 0x50123, 3*512 - 0x123},
		// 512 B clusters: x = 61, one sector bit.
		{"512 one sector", 9, oflagCompressed | 0x1000, 0x1000, 512},
		{"512 two sectors", 9, oflagCompressed | 1<<61 | 0x1010, 0x1010, 1024 - 0x10},
		// 2 MiB clusters: x = 49, 13 sector bits, all set = 8192 sectors.
		{"2M max", 21, oflagCompressed | 0x1fff<<49 | 0x200000, 0x200000, 8192 * 512},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			img := geometryImage(3, tc.clusterBits, false, false)
			coff, csize := img.compressedRange(tc.entry)
			if coff != tc.coff || csize != tc.csize {
				t.Fatalf("compressedRange(%#x) = %#x, %d; want %#x, %d", tc.entry, coff, csize, tc.coff, tc.csize)
			}
		})
	}
}

func TestBitRuns(t *testing.T) {
	tests := []struct {
		b           uint32
		i           int
		ones, zeros int
	}{
		{0, 0, 0, 32},
		{0, 31, 0, 1},
		{0xffffffff, 0, 32, 0},
		{0xffffffff, 31, 1, 0},
		{0x0ff0, 4, 8, 0},
		{0x0ff0, 0, 0, 4},
		{0x0ff0, 12, 0, 20},
		{1 << 31, 30, 0, 1},
	}
	for _, tc := range tests {
		if got := onesFrom(tc.b, tc.i); got != tc.ones {
			t.Errorf("onesFrom(%#x, %d) = %d, want %d", tc.b, tc.i, got, tc.ones)
		}
		if got := zerosFrom(tc.b, tc.i); got != tc.zeros {
			t.Errorf("zerosFrom(%#x, %d) = %d, want %d", tc.b, tc.i, got, tc.zeros)
		}
	}
}

func TestProbe(t *testing.T) {
	tests := []struct {
		name string
		hdr  []byte
		want int
	}{
		{"magic only", []byte("QFI\xfb"), 100},
		{"corrupt header after magic", append([]byte("QFI\xfb\x00\x00\x00\x63"), make([]byte, 100)...), 100},
		{"short", []byte("QFI"), 0},
		{"raw zeros", make([]byte, 512), 0},
		{"qcow v1 magic", []byte("QFI\xfb"[:3] + "\xfa"), 0},
		// Version 1 is qcow, a format of its own (drivers/foreign).
		{"qcow version 1", []byte("QFI\xfb\x00\x00\x00\x01"), 0},
		{"version 2", []byte("QFI\xfb\x00\x00\x00\x02"), 100},
		{"version 0", []byte("QFI\xfb\x00\x00\x00\x00"), 100},
		{"magic, 7 bytes", []byte("QFI\xfb\x00\x00\x00"), 100},
	}
	for _, tc := range tests {
		if got := (Format{}).Probe(drivers.ProbeInput{Head: tc.hdr}); got != tc.want {
			t.Errorf("%s: Probe = %d, want %d", tc.name, got, tc.want)
		}
	}
}
