package driverstest

import (
	"bytes"
	"encoding/binary"
	"fmt"
)

// Want is what a read of one guest cluster of a damaged qcow2 image must
// return, as Qcow2Oracle decodes it.
type Want struct {
	// Fail: the read must fail (EIO): the mapping is invalid, or its host
	// range holds metadata, whose bytes are never guest data. Why says
	// which.
	Fail bool
	Why  string
	// Compressed: a compressed cluster whose host range holds no
	// metadata; what it decodes to is for the caller to say.
	Compressed bool
	// Data is what the cluster reads as otherwise.
	Data []byte
}

// Qcow2Oracle decodes, independently of the driver, what every guest
// cluster of the qcow2 image b reads as: from the header, the L1 table
// and the L2 tables as they are in the file, damaged or not. It knows the
// metadata a reader can locate without guessing — the header cluster, the
// L1 table, the L2 tables it names, the refcount table, the refcount
// blocks it names, the first cluster of the snapshot table — and a data
// cluster (or a compressed cluster's byte range) that overlaps any of it
// must fail. It models what the hostile-image tests build: standard L2
// entries (no extended L2), no external data file, nothing below the image
// (unallocated clusters read as zeros); other images are an error.
//
// A reader passes a damaged image when every cluster that must fail
// fails, every other cluster reads as Data (or, inside the range the
// damage may affect, fails), and compressed clusters read what the test
// knows their stream decodes to, or fail.
func Qcow2Oracle(b []byte) ([]Want, error) {
	be64 := func(off uint64) uint64 {
		if off+8 > uint64(len(b)) {
			return 0 // past EOF reads as zeros
		}
		return binary.BigEndian.Uint64(b[off:])
	}
	be32 := func(off uint64) uint32 { return uint32(be64(off) >> 32) }
	version := be32(4)
	clusterBits := be32(20)
	size := be64(24)
	if version >= 3 && be64(72)&(1<<2|1<<4) != 0 {
		return nil, fmt.Errorf("Qcow2Oracle: external data files and extended L2 entries are not modelled")
	}
	if clusterBits < 9 || clusterBits > 21 || size > 1<<40 {
		return nil, fmt.Errorf("Qcow2Oracle: cluster_bits %d, size %d: the header itself is damaged", clusterBits, size)
	}
	cs := uint64(1) << clusterBits
	fileSize := uint64(len(b))
	l1Off, l1Entries := be64(40), uint64(be32(36))
	rtOff, rtClusters := be64(48), uint64(be32(56))

	// The metadata a reader knows without guessing, as [start, end).
	type span struct {
		start, end uint64
		what       string
	}
	meta := []span{{0, cs, "the header"}, {l1Off, l1Off + 8*l1Entries, "the L1 table"},
		{rtOff, rtOff + rtClusters*cs, "the refcount table"}}
	for i := range rtClusters * cs / 8 {
		if e := be64(rtOff + 8*i); e&^0x1ff != 0 {
			meta = append(meta, span{e &^ 0x1ff, e&^0x1ff + cs, "a refcount block"})
		}
	}
	if be32(60) > 0 {
		s := be64(64)
		meta = append(meta, span{s, s + cs, "the snapshot table"})
	}
	l1 := make([]uint64, l1Entries)
	for i := range l1 {
		l1[i] = be64(l1Off + 8*uint64(i))
		if o := l1[i] & 0x00fffffffffffe00; o != 0 {
			meta = append(meta, span{o, o + cs, "an L2 table"})
		}
	}
	metaAt := func(start, end uint64) string {
		for _, m := range meta {
			if start < m.end && m.start < end {
				return fmt.Sprintf("%s at %#x", m.what, m.start)
			}
		}
		return ""
	}

	l2Entries := cs / 8
	out := make([]Want, (size+cs-1)/cs)
	for g := range out {
		w := &out[g]
		fail := func(format string, args ...any) { w.Fail, w.Why = true, fmt.Sprintf(format, args...) }
		e1 := uint64(0)
		if i := uint64(g) / l2Entries; i < l1Entries {
			e1 = l1[i]
		}
		l2 := e1 & 0x00fffffffffffe00
		switch {
		case e1&0x7f000000000001ff != 0:
			fail("L1 entry %#x has reserved bits", e1)
			continue
		case l2 == 0:
			w.Data = make([]byte, cs)
			continue
		case l2&(cs-1) != 0 || l2 >= fileSize:
			fail("L2 table offset %#x is unaligned or past EOF", l2)
			continue
		}
		e := be64(l2 + 8*(uint64(g)%l2Entries))
		host := e & 0x00fffffffffffe00
		if e&(1<<62) != 0 {
			x := 62 - (clusterBits - 8)
			coff := e & (1<<x - 1)
			sectors := (e>>x)&(1<<(clusterBits-8)-1) + 1
			cend := coff&^511 + sectors*512
			switch m := metaAt(coff, cend); {
			case coff >= fileSize:
				fail("compressed data at %#x past EOF", coff)
			case m != "":
				fail("compressed data [%#x, %#x) overlaps %s", coff, cend, m)
			default:
				w.Compressed = true
			}
			continue
		}
		switch m := metaAt(host, host+cs); {
		case e&0x3f000000000001fe != 0:
			fail("L2 entry %#x has reserved bits", e)
		case e&1 != 0 && version < 3:
			fail("L2 entry %#x has the zero flag in a v2 image", e)
		case host&(cs-1) != 0:
			fail("host cluster %#x is unaligned", host)
		case e&1 != 0 || host == 0:
			w.Data = make([]byte, cs)
		case host >= fileSize:
			fail("data cluster %#x is past EOF", host)
		case m != "":
			fail("data cluster %#x overlaps %s", host, m)
		default:
			w.Data = make([]byte, cs)
			copy(w.Data, b[host:min(host+cs, fileSize)])
		}
	}
	return out, nil
}

// CheckHostileRead judges one read of guest cluster w of a damaged image:
// failed says whether it failed (with EIO, or an error wrapping
// drivers.ErrCorrupt: the caller checks which), got is what it returned
// otherwise. damaged says the cluster lies where the damage may reach,
// where a read may fail instead of returning Data; compressed is what a
// compressed cluster decodes to (nil: it must fail). It returns "" if the
// read is right, else what is wrong.
func CheckHostileRead(w Want, failed bool, got []byte, damaged bool, compressed []byte) string {
	switch {
	case w.Fail && !failed:
		return "read succeeded; it must fail: " + w.Why
	case w.Fail:
		return ""
	case w.Compressed && compressed == nil:
		if !failed {
			return "a compressed cluster whose stream cannot decode read successfully"
		}
		return ""
	case failed && !damaged:
		return "read failed outside the damaged range"
	case failed:
		return ""
	}
	want := w.Data
	if w.Compressed {
		want = compressed
	}
	if !bytes.Equal(got, want) {
		i := 0
		for i < len(got) && i < len(want) && got[i] == want[i] {
			i++
		}
		return fmt.Sprintf("wrong bytes from offset %#x in the cluster (got %d bytes, want %d)", i, len(got), len(want))
	}
	return ""
}
