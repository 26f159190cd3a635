package partition

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"hash/crc32"
	"io"
	"unicode/utf16"
)

// SectorSize is the only sector size read.
const SectorSize = 512

// MaxPartitions bounds the partitions read, as the kernel's DISK_MAX_PARTS
// does: numbers stay below it.
const MaxPartitions = 256

// maxChain bounds the EBRs followed in one extended chain.
const maxChain = 256

// maxEntryBytes bounds a GPT entry array.
const maxEntryBytes = 1 << 20

// Partition is one partition: its number as the kernel would give it and
// its byte range, always inside the disk.
type Partition struct {
	Number int
	Start  int64 // bytes from the start of the disk
	Size   int64 // bytes, > 0
	// Type is the MBR type byte ("0x83") or the GPT type GUID.
	Type string
	// Name and UUID are the GPT partition name and unique GUID.
	Name string
	UUID string
}

// Table is a partition table that was read.
type Table struct {
	Kind  string // "mbr" or "gpt"
	Parts []Partition
	// Warnings are partitions skipped or clamped, one line each.
	Warnings []string
}

// ErrMalformed is wrapped by the errors of a partition table that is
// there (it has the signature) but breaks its format's rules: a bad GPT
// with no good backup, an extended chain that loops or runs too long. The
// table is guest data, not the image format's: the image itself may be
// perfectly sound, so this is not drivers.ErrCorrupt.
var ErrMalformed = errors.New("malformed partition table")

// Read reads the partition table of a disk of size bytes. It returns nil
// and no error when the disk holds no table, and an error wrapping
// ErrMalformed when the table is malformed.
func Read(r io.ReaderAt, size int64) (*Table, error) {
	if size < SectorSize {
		return nil, nil
	}
	mbr := make([]byte, SectorSize)
	if err := readFull(r, mbr, 0); err != nil {
		return nil, err
	}
	if !hasMagic(mbr) {
		return nil, nil
	}
	ents := mbrEntries(mbr)
	for _, e := range ents {
		if e.boot != 0 && e.boot != 0x80 {
			return nil, nil // a boot sector, not a table
		}
	}
	for _, e := range ents {
		if e.typ == 0xEE {
			return readGPT(r, size)
		}
	}
	return readMBR(r, size, ents)
}

func readFull(r io.ReaderAt, p []byte, off int64) error {
	n, err := r.ReadAt(p, off)
	if n == len(p) {
		return nil
	}
	if err == nil || err == io.EOF {
		err = io.ErrUnexpectedEOF
	}
	return fmt.Errorf("partition: reading %d bytes at %d: %w", len(p), off, err)
}

func corrupt(format string, args ...any) error {
	return fmt.Errorf("partition: %s: %w", fmt.Sprintf(format, args...), ErrMalformed)
}

func hasMagic(sec []byte) bool { return sec[510] == 0x55 && sec[511] == 0xAA }

type mbrEntry struct {
	boot, typ   byte
	start, size uint64 // sectors
}

func mbrEntries(sec []byte) [4]mbrEntry {
	var ents [4]mbrEntry
	for i := range ents {
		p := sec[0x1BE+16*i:]
		ents[i] = mbrEntry{
			boot:  p[0],
			typ:   p[4],
			start: uint64(binary.LittleEndian.Uint32(p[8:])),
			size:  uint64(binary.LittleEndian.Uint32(p[12:])),
		}
	}
	return ents
}

func isExtended(typ byte) bool { return typ == 0x05 || typ == 0x0F || typ == 0x85 }

// add appends partition n spanning sectors [start, start+count) to t,
// skipped or clamped at the end of the disk.
func (t *Table) add(size int64, p Partition, start, count uint64) {
	last := uint64(size) / SectorSize
	switch {
	case count == 0:
		return
	case start >= last:
		t.Warnings = append(t.Warnings, fmt.Sprintf("partition %d starts at sector %d, past the end of the disk (%d sectors): skipped", p.Number, start, last))
		return
	case count > last-start:
		t.Warnings = append(t.Warnings, fmt.Sprintf("partition %d (sectors %d+%d) runs past the end of the disk (%d sectors): clamped", p.Number, start, count, last))
		count = last - start
	}
	p.Start = int64(start) * SectorSize
	p.Size = int64(count) * SectorSize
	t.Parts = append(t.Parts, p)
}

func readMBR(r io.ReaderAt, size int64, ents [4]mbrEntry) (*Table, error) {
	t := &Table{Kind: "mbr"}
	for i, e := range ents {
		if e.size == 0 || isExtended(e.typ) {
			continue
		}
		t.add(size, Partition{Number: i + 1, Type: fmt.Sprintf("0x%02x", e.typ)}, e.start, e.size)
	}
	next := 5
	for _, e := range ents {
		if e.size == 0 || !isExtended(e.typ) {
			continue
		}
		var err error
		if next, err = t.readExtended(r, size, e.start, e.size, next); err != nil {
			return nil, err
		}
	}
	return t, nil
}

// readExtended follows the chain of the extended partition at sector first
// (of length firstSize sectors) as the kernel's parse_extended does,
// numbering logical partitions from next. It returns the next free number.
func (t *Table) readExtended(r io.ReaderAt, size int64, first, firstSize uint64, next int) (int, error) {
	seen := make(map[uint64]bool)
	sec := make([]byte, SectorSize)
	this, thisSize := first, firstSize
	for range maxChain {
		if next >= MaxPartitions {
			return next, nil
		}
		if seen[this] {
			return next, corrupt("extended partition chain loops at sector %d", this)
		}
		seen[this] = true
		if this >= uint64(size)/SectorSize {
			return next, nil // as the kernel: an unreadable EBR ends the chain
		}
		if err := readFull(r, sec, int64(this)*SectorSize); err != nil {
			return next, err
		}
		if !hasMagic(sec) {
			return next, nil
		}
		ents := mbrEntries(sec)
		for i, e := range ents {
			if e.size == 0 || isExtended(e.typ) {
				continue
			}
			start := this + e.start
			if i >= 2 {
				// The kernel distrusts the 3rd and 4th entries.
				if e.start+e.size > thisSize || start < first || start+e.size > first+firstSize {
					continue
				}
			}
			t.add(size, Partition{Number: next, Type: fmt.Sprintf("0x%02x", e.typ)}, start, e.size)
			next++
			if next >= MaxPartitions {
				return next, nil
			}
		}
		link := -1
		for i, e := range ents {
			if e.size != 0 && isExtended(e.typ) {
				link = i
				break
			}
		}
		if link < 0 {
			return next, nil
		}
		this, thisSize = first+ents[link].start, ents[link].size
	}
	return next, corrupt("extended partition chain longer than %d", maxChain)
}

var gptSignature = []byte("EFI PART")

type gptHeader struct {
	entryLBA   uint64
	count      uint32
	entrySize  uint32
	entriesCRC uint32
}

// readGPT reads the primary GPT, or the backup if the primary is bad.
func readGPT(r io.ReaderAt, size int64) (*Table, error) {
	lastLBA := uint64(size)/SectorSize - 1
	t, errPrimary := readGPTAt(r, size, 1, lastLBA)
	if errPrimary == nil {
		return t, nil
	}
	t, errBackup := readGPTAt(r, size, lastLBA, lastLBA)
	if errBackup == nil {
		t.Warnings = append(t.Warnings, fmt.Sprintf("primary GPT unusable (%v): using the backup", errPrimary))
		return t, nil
	}
	return nil, corrupt("no valid GPT: primary: %v; backup: %v", errPrimary, errBackup)
}

func readGPTAt(r io.ReaderAt, size int64, lba, lastLBA uint64) (*Table, error) {
	if lba < 1 || lba > lastLBA {
		return nil, errors.New("header beyond the disk")
	}
	sec := make([]byte, SectorSize)
	if err := readFull(r, sec, int64(lba)*SectorSize); err != nil {
		return nil, err
	}
	if !bytes.Equal(sec[:8], gptSignature) {
		return nil, fmt.Errorf("no GPT signature at LBA %d", lba)
	}
	hsize := binary.LittleEndian.Uint32(sec[12:])
	if hsize < 92 || hsize > SectorSize {
		return nil, fmt.Errorf("header size %d", hsize)
	}
	want := binary.LittleEndian.Uint32(sec[16:])
	hdr := append([]byte(nil), sec[:hsize]...)
	clear(hdr[16:20])
	if got := crc32.ChecksumIEEE(hdr); got != want {
		return nil, fmt.Errorf("header CRC32 %#08x, expected %#08x", got, want)
	}
	if my := binary.LittleEndian.Uint64(sec[24:]); my != lba {
		return nil, fmt.Errorf("header at LBA %d says it is at LBA %d", lba, my)
	}
	firstUsable := binary.LittleEndian.Uint64(sec[40:])
	lastUsable := binary.LittleEndian.Uint64(sec[48:])
	if firstUsable > lastUsable || lastUsable > lastLBA {
		return nil, fmt.Errorf("usable LBAs %d–%d outside the disk", firstUsable, lastUsable)
	}
	h := gptHeader{
		entryLBA:   binary.LittleEndian.Uint64(sec[72:]),
		count:      binary.LittleEndian.Uint32(sec[80:]),
		entrySize:  binary.LittleEndian.Uint32(sec[84:]),
		entriesCRC: binary.LittleEndian.Uint32(sec[88:]),
	}
	if h.entrySize != 128 {
		return nil, fmt.Errorf("entry size %d (only 128 is supported)", h.entrySize)
	}
	n := uint64(h.count) * uint64(h.entrySize)
	if n > maxEntryBytes {
		return nil, fmt.Errorf("%d entries of %d bytes: too many", h.count, h.entrySize)
	}
	if h.entryLBA > lastLBA || n > (lastLBA+1-h.entryLBA)*SectorSize {
		return nil, errors.New("entry array beyond the disk")
	}
	arr := make([]byte, n)
	if err := readFull(r, arr, int64(h.entryLBA)*SectorSize); err != nil {
		return nil, err
	}
	if got := crc32.ChecksumIEEE(arr); got != h.entriesCRC {
		return nil, fmt.Errorf("entry array CRC32 %#08x, expected %#08x", got, h.entriesCRC)
	}
	t := &Table{Kind: "gpt"}
	for i := 0; i < int(h.count) && i < MaxPartitions-1; i++ {
		e := arr[i*128 : (i+1)*128]
		typ := e[0:16]
		if allZero(typ) {
			continue
		}
		start := binary.LittleEndian.Uint64(e[32:])
		end := binary.LittleEndian.Uint64(e[40:])
		if end < start {
			t.Warnings = append(t.Warnings, fmt.Sprintf("partition %d ends (LBA %d) before it starts (LBA %d): skipped", i+1, end, start))
			continue
		}
		t.add(size, Partition{
			Number: i + 1,
			Type:   guid(typ),
			UUID:   guid(e[16:32]),
			Name:   utf16Name(e[56:128]),
		}, start, end-start+1)
	}
	return t, nil
}

func allZero(p []byte) bool {
	for _, b := range p {
		if b != 0 {
			return false
		}
	}
	return true
}

// guid formats a GUID stored in the mixed-endian on-disk form.
func guid(b []byte) string {
	return fmt.Sprintf("%08X-%04X-%04X-%X-%X",
		binary.LittleEndian.Uint32(b[0:]), binary.LittleEndian.Uint16(b[4:]),
		binary.LittleEndian.Uint16(b[6:]), b[8:10], b[10:16])
}

func utf16Name(b []byte) string {
	u := make([]uint16, 0, len(b)/2)
	for i := 0; i+1 < len(b); i += 2 {
		c := binary.LittleEndian.Uint16(b[i:])
		if c == 0 {
			break
		}
		u = append(u, c)
	}
	return string(utf16.Decode(u))
}
