package vhdx

import (
	"bytes"
	"os"
	"testing"
)

// Images as Windows writes them ([MS-VHDX] v1.00; Hyper-V's New-VHD, Disk
// Management, Disk2vhd), built byte by byte in Go, with the disk they
// must read as: a model built from the specification, not from the
// driver. Windows lays a new file out as QEMU does not: the log at 1 MiB,
// the metadata region at 2 MiB before the BAT at 3 MiB, both regions
// marked required, 32 MiB blocks, 4096-byte physical (and, on 4Kn
// disks, logical) sectors, the metadata items packed from 64 KiB in
// another order, the creator "Microsoft Windows".

// hvItem is a metadata item to write: its GUID, flags (IsUser 1,
// IsVirtualDisk 2, IsRequired 4) and value.
type hvItem struct {
	g     guid
	flags uint32
	v     []byte
}

// hvRegion is a region table entry to write.
type hvRegion struct {
	g        guid
	off, len int64
	required bool
}

// hvBlock is a payload block's BAT entry: its state and, for a present
// block, its place in the file (a MiB multiple). A partly present
// block's sectors named by present are in the file, the others the
// parent's.
type hvBlock struct {
	state   uint64
	off     int64
	present func(sector int64) bool
}

// hvDisk describes a VHDX file as Windows lays it out.
type hvDisk struct {
	size, blockSize, lss, pss int64
	leave                     bool     // LeaveBlockAllocated (fixed disks)
	locator                   []string // parent locator key/value pairs: a differencing disk
	blocks                    map[int64]hvBlock
	bitmapAt                  map[int64]int64 // differencing: chunk -> its sector bitmap block
	extraItems                []hvItem        // after the standard ones, in the table
	extraRegions              []hvRegion      // after the BAT and metadata entries
	seq                       [2]uint64       // header slots' sequence numbers
	dataWrite                 guid
	// hdrPatch, if set, changes each header slot (0, 1) before its CRC.
	hdrPatch func(slot int, h []byte)
	// batAt is the BAT's place (3 MiB, after the metadata, if 0).
	batAt int64
}

// hvPattern is the byte at disk offset off of a block written by tool
// seed: distinct for every 512-byte sector of the disk, so a sector read
// from the wrong place shows.
func hvPattern(seed byte, off int64) byte {
	s := off / 512
	return byte(s) ^ byte(s>>8)*7 ^ byte(s>>16)*13 ^ seed ^ byte(off%512)*3
}

// build returns the file's bytes and the disk they read as, with parent
// (nil: zeros) under what the file leaves to it.
func (h *hvDisk) build(t testing.TB, seed byte, parent []byte) (file, disk []byte) {
	t.Helper()
	const logAt, metaAt = mib, 2 * mib
	batAt := h.batAt
	if batAt == 0 {
		batAt = 3 * mib
	}
	cr := (1 << 23) * h.lss / h.blockSize
	payload := (h.size + h.blockSize - 1) / h.blockSize
	entries := payload + (payload-1)/cr
	if h.locator != nil {
		entries = (payload + cr - 1) / cr * (cr + 1)
	}
	batLen := (entries*8 + mib - 1) / mib * mib
	end := max(batAt+batLen, metaAt+mib)
	for _, b := range h.blocks {
		if b.state == stateFull || b.state == statePartial {
			end = max(end, b.off+h.blockSize)
		}
	}
	for _, off := range h.bitmapAt {
		end = max(end, off+mib)
	}
	for _, r := range h.extraRegions {
		end = max(end, r.off+r.len)
	}
	f := make([]byte, end)
	copy(f, "vhdxfile")
	copy(f[8:], utf16le("Microsoft Windows 10.0.19045.0"))

	for slot, at := range []int{header1Off, header2Off} {
		b := f[at : at+headerSize]
		copy(b, "head")
		le.PutUint64(b[hSeq:], h.seq[slot])
		b[hFileWrite], b[hFileWrite+1] = 0xf1, byte(slot)
		copy(b[hDataWrite:], h.dataWrite[:])
		le.PutUint16(b[hVersion:], 1)
		le.PutUint32(b[hLogLength:], mib)
		le.PutUint64(b[hLogOffset:], logAt)
		if h.hdrPatch != nil {
			h.hdrPatch(slot, b)
		}
		le.PutUint32(b[hChecksum:], crcOf(b, hChecksum))
	}

	regs := append([]hvRegion{{guidMetadata, metaAt, mib, true}, {guidBAT, batAt, batLen, true}}, h.extraRegions...)
	for _, at := range []int{region1Off, region2Off} {
		b := f[at : at+regionSize]
		copy(b, "regi")
		le.PutUint32(b[8:], uint32(len(regs)))
		for i, r := range regs {
			e := b[16+32*i:]
			copy(e, r.g[:])
			le.PutUint64(e[16:], uint64(r.off))
			le.PutUint32(e[24:], uint32(r.len))
			if r.required {
				le.PutUint32(e[28:], 1)
			}
		}
		le.PutUint32(b[4:], crcOf(b, 4))
	}

	// Metadata: Windows' order, not QEMU's.
	fp := le.AppendUint32(nil, uint32(h.blockSize))
	var flags uint32
	if h.leave {
		flags |= 1
	}
	if h.locator != nil {
		flags |= 2
	}
	fp = le.AppendUint32(fp, flags)
	items := []hvItem{
		{guidFileParams, 4, fp},
		{guidPage83, 6, []byte{0x83, seed, 0x53, 15: 1}},
		{guidLogicalSS, 6, le.AppendUint32(nil, uint32(h.lss))},
		{guidDiskSize, 6, le.AppendUint64(nil, uint64(h.size))},
		{guidPhysicalSS, 6, le.AppendUint32(nil, uint32(h.pss))},
	}
	if h.locator != nil {
		items = append(items, hvItem{guidParentLoc, 4, locatorItem(h.locator...)})
	}
	items = append(items, h.extraItems...)
	m := f[metaAt : metaAt+mib]
	copy(m, "metadata")
	le.PutUint16(m[10:], uint16(len(items)))
	at := int64(64 << 10)
	for i, it := range items {
		e := m[32+32*i:]
		copy(e, it.g[:])
		le.PutUint32(e[16:], uint32(at))
		le.PutUint32(e[20:], uint32(len(it.v)))
		le.PutUint32(e[24:], it.flags)
		copy(m[at:], it.v)
		at += int64(len(it.v))
	}

	for _, r := range h.extraRegions {
		copy(f[r.off:r.off+r.len], bytes.Repeat([]byte{0xab}, int(r.len)))
	}
	disk = make([]byte, h.size)
	if parent != nil {
		copy(disk, parent)
	}
	bat := f[batAt:]
	for n := int64(0); n < payload; n++ {
		b, ok := h.blocks[n]
		if !ok {
			continue
		}
		le.PutUint64(bat[8*(n+n/cr):], uint64(b.off)|b.state)
		lo, hi := n*h.blockSize, min((n+1)*h.blockSize, h.size)
		switch b.state {
		case stateFull, statePartial:
			for off := lo; off < hi; off += h.lss {
				if b.state == statePartial && !b.present(off/h.lss-lo/h.lss) {
					// What the file holds there is not the disk's.
					copy(f[b.off+off-lo:], bytes.Repeat([]byte{0xee}, int(h.lss)))
					continue
				}
				for k := off; k < off+h.lss; k++ {
					f[b.off+k-lo] = hvPattern(seed, k)
				}
				copy(disk[off:off+h.lss], f[b.off+off-lo:])
			}
			if b.state == statePartial {
				bm := f[h.bitmapAt[n/cr]:]
				first := (n % cr) * (h.blockSize / h.lss)
				for s := int64(0); s < h.blockSize/h.lss; s++ {
					if b.present(s) {
						bm[(first+s)/8] |= 1 << ((first + s) % 8)
					}
				}
			}
		case stateNotPresent:
		default: // ZERO, UNMAPPED, UNDEFINED
			clear(disk[lo:hi])
		}
	}
	for k, off := range h.bitmapAt {
		le.PutUint64(bat[8*(k*(cr+1)+cr):], uint64(off)|stateFull)
	}
	return f, disk
}

// writeSparse writes b to path leaving its zero 64 KiB runs holes.
func writeSparse(t testing.TB, path string, b []byte) {
	t.Helper()
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(int64(len(b))); err != nil {
		t.Fatal(err)
	}
	var zero [64 << 10]byte
	for off := 0; off < len(b); off += len(zero) {
		p := b[off:min(off+len(zero), len(b))]
		if bytes.Equal(p, zero[:len(p)]) {
			continue
		}
		if _, err := f.WriteAt(p, int64(off)); err != nil {
			t.Fatal(err)
		}
	}
}

// windowsLog is a log as Windows may leave it after a crash, for an
// image of 1 MiB blocks whose BAT sector (at batAt) is bat, file 6 MiB
// long: the active sequence, seq 10 to 12, all with Tail at 8 KiB, so
// all three are to replay:
//
//   - 10 at 8 KiB: the BAT sector making block 2 present at 6 MiB (past
//     the end of the file), and a zero range over the second and third 4
//     KiB of block 0 (at 4 MiB);
//   - 11: 128 zero descriptors (every other 4 KiB of block 1, at 5 MiB)
//     and 2 data ones (block 2's first sector, and its 17th): two
//     descriptor sectors;
//   - 12: a sector of block 0 at 100 KiB; FlushedFileOffset 6 MiB (the
//     file's size), LastFileOffset 7 MiB (past it);
//
// then what must not be replayed: 13, whose CRC is bad (a torn write:
// it ends the sequence), and after it 4, an older entry of a previous
// pass over the ring. variant "newer" adds 14 after them, valid but
// with its Tail at 8 KiB: the sequence it belongs to is torn at 13.
// variant "tail" puts 9 at 0, chained to 10, but before the sequence's
// Tail: already in place, not to replay. variant "qemu" has 11 with 62
// zero descriptors, in one descriptor sector: QEMU cannot read an entry
// of more (its vhdx_log_read_sectors reads every sector into the same
// 4 KiB). Entries not to replay write
// 0xee sectors. It returns the log (1 MiB) and the sectors to replay.
func windowsLog(g guid, bat []byte, batAt int64, variant string) (log []byte, ws []sectorWrite, zs []region) {
	log = make([]byte, mib)
	sec := func(b byte) []byte {
		s := bytes.Repeat([]byte{b}, sectorSize)
		copy(s, "LEADBYTE")
		copy(s[4092:], "TAIL")
		return s
	}
	junk := sec(0xee)
	pos := int64(8 << 10)
	put := func(e []byte) {
		copy(log[pos:], e)
		pos += int64(len(e))
	}
	const tail, flushed, last = 8 << 10, 6 * mib, 7 * mib
	bat = bytes.Clone(bat[:sectorSize])
	le.PutUint64(bat[16:], 6*mib|stateFull)
	w10 := []sectorWrite{{batAt, bat}}
	z10 := []region{{4*mib + sectorSize, 2 * sectorSize}}
	put(buildEntry(w10, z10, g, 10, tail, flushed, last))
	nz := int64(128)
	if variant == "qemu" {
		nz = 62 // one descriptor sector: QEMU reads no more
	}
	var z11 []region
	for i := int64(0); i < nz; i++ {
		z11 = append(z11, region{5*mib + 2*i*sectorSize, sectorSize})
	}
	w11 := []sectorWrite{{6 * mib, sec(0x61)}, {6*mib + 64<<10, sec(0x62)}}
	if variant == "qemu" {
		// Block 2's last sector too: QEMU's replay extends the file
		// only by these writes, and refuses a block past its end.
		w11 = append(w11, sectorWrite{7*mib - sectorSize, sec(0x64)})
	}
	put(buildEntry(w11, z11, g, 11, tail, flushed, last))
	w12 := []sectorWrite{{4*mib + 100<<10, sec(0x63)}}
	put(buildEntry(w12, nil, g, 12, tail, flushed, last))
	e13 := buildEntry([]sectorWrite{{5 * mib, junk}}, nil, g, 13, tail, flushed, last)
	e13[sectorSize+100] ^= 0xff // torn: the data sector is not what the CRC covered
	put(e13)
	put(buildEntry([]sectorWrite{{4 * mib, junk}}, nil, g, 4, pos, flushed, last))
	switch variant {
	case "newer":
		put(buildEntry([]sectorWrite{{4*mib + 200<<10, junk}}, nil, g, 14, tail, flushed, last))
	case "tail":
		copy(log, buildEntry([]sectorWrite{{4*mib + 200<<10, junk}}, nil, g, 9, 0, flushed, last))
	}
	ws = append(append(w10, w11...), w12...)
	return log, ws, append(z10, z11...)
}
