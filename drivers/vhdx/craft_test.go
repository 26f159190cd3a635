package vhdx

import (
	"os/exec"

	"imgfuse/aio"
	"os"
	"testing"
	"unicode/utf16"
)

// layout is where a file's structures are, read with the driver's own
// parsers, for tests that patch images.
type layout struct {
	b     []byte
	hdr   *header
	slot  int
	rg    *regions
	items map[guid][2]int64 // absolute offset, length
	count int               // metadata entries
}

func readLayout(t testing.TB, path string) *layout {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	l := &layout{b: b, items: map[guid][2]int64{}}
	l.hdr, l.slot, err = pickHeader(b[header1Off:], b[header2Off:])
	if err != nil {
		t.Fatal(err)
	}
	l.rg, err = parseRegions(b[region1Off:], int64(len(b)), l.hdr.logOffset, l.hdr.logLength)
	if err != nil {
		t.Fatal(err)
	}
	m := b[l.rg.meta.off:]
	l.count = int(le.Uint16(m[10:]))
	for i := 0; i < l.count; i++ {
		e := m[32+32*i:]
		var g guid
		copy(g[:], e)
		l.items[g] = [2]int64{l.rg.meta.off + int64(le.Uint32(e[16:])), int64(le.Uint32(e[20:]))}
	}
	return l
}

func (l *layout) write(t testing.TB, path string) {
	t.Helper()
	if err := os.WriteFile(path, l.b, 0o644); err != nil {
		t.Fatal(err)
	}
}

// setItem overwrites the value of metadata item g.
func setItem(t testing.TB, path string, g guid, v []byte) {
	t.Helper()
	l := readLayout(t, path)
	it, ok := l.items[g]
	if !ok || int64(len(v)) > it[1] {
		t.Fatalf("no item %s of room for %d bytes", g, len(v))
	}
	copy(l.b[it[0]:], v)
	l.write(t, path)
}

// setHeader changes the current header of the image in b and fixes its
// CRC.
func (l *layout) setHeader(change func(h []byte)) {
	h := l.b[header1Off+l.slot*(header2Off-header1Off):][:headerSize]
	change(h)
	le.PutUint32(h[hChecksum:], crcOf(h, hChecksum))
}

// batEntry returns a pointer to BAT entry i.
func (l *layout) bat(i int64) []byte { return l.b[l.rg.bat.off+8*i:][:8] }

// utf16le encodes s without a NUL.
func utf16le(s string) []byte {
	var b []byte
	for _, c := range utf16.Encode([]rune(s)) {
		b = le.AppendUint16(b, c)
	}
	return b
}

// locatorItem builds a parent locator item holding kv (in order).
func locatorItem(kv ...string) []byte {
	n := len(kv) / 2
	b := make([]byte, 20+12*n)
	copy(b, guidVHDXParentTy[:])
	le.PutUint16(b[18:], uint16(n))
	for i := 0; i < n; i++ {
		k, v := utf16le(kv[2*i]), utf16le(kv[2*i+1])
		e := b[20+12*i:]
		le.PutUint32(e, uint32(len(b)))
		le.PutUint16(e[8:], uint16(len(k)))
		b = append(b, k...)
		e = b[20+12*i:]
		le.PutUint32(e[4:], uint32(len(b)))
		le.PutUint16(e[10:], uint16(len(v)))
		b = append(b, v...)
	}
	return b
}

// makeDiff turns child (a dynamic image made with block_state_zero=off,
// its unwritten blocks NOT_PRESENT) into a differencing image of parent:
// HasParent set, a parent locator naming parent by rel with the linkage
// given (the parent's DataWriteGuid if link is zero).
func makeDiff(t testing.TB, child, parent, rel string, link guid) {
	t.Helper()
	if link.zero() {
		link = readLayout(t, parent).hdr.dataWrite
	}
	l := readLayout(t, child)
	fp := l.items[guidFileParams]
	le.PutUint32(l.b[fp[0]+4:], le.Uint32(l.b[fp[0]+4:])|2)
	item := locatorItem("parent_linkage", link.String(), "relative_path", rel, "absolute_win32_path", `C:\nowhere\x.vhdx`)
	m := l.b[l.rg.meta.off:]
	if old, ok := l.items[guidParentLoc]; ok {
		copy(l.b[old[0]:], item)
		e := m[32:]
		for i := 0; i < l.count; i++ {
			if guid(e[32*i:32*i+16]) == guidParentLoc {
				le.PutUint32(e[32*i+20:], uint32(len(item)))
			}
		}
	} else {
		const at = 512 << 10
		copy(m[at:], item)
		e := m[32+32*l.count:]
		copy(e, guidParentLoc[:])
		le.PutUint32(e[16:], at)
		le.PutUint32(e[20:], uint32(len(item)))
		le.PutUint32(e[24:], 4) // IsRequired
		le.PutUint16(m[10:], uint16(l.count+1))
	}
	l.write(t, child)
}

// makePartial marks present block blk of path partly present: a sector
// bitmap block appended at the end of the file, its bits for blk set
// except [first, first+n) logical sectors, which fall to the parent.
func makePartial(t testing.TB, path string, blk, first, n int64) {
	t.Helper()
	l := readLayout(t, path)
	md, err := parseMetadata(l.b[l.rg.meta.off : l.rg.meta.off+l.rg.meta.length])
	if err != nil {
		t.Fatal(err)
	}
	cr := (1 << 23) * md.logicalSS / md.blockSize
	pi := blk + blk/cr
	e := le.Uint64(l.bat(pi))
	if e&stateMask != stateFull {
		t.Fatalf("block %d is in state %d", blk, e&stateMask)
	}
	le.PutUint64(l.bat(pi), e&offMask|statePartial)
	bmOff := (int64(len(l.b)) + mib - 1) / mib * mib
	bm := make([]byte, bmOff-int64(len(l.b))+mib)
	l.b = append(l.b, bm...)
	bits := md.blockSize / md.logicalSS
	base := (blk % cr) * bits
	for k := int64(0); k < bits; k++ {
		if k < first || k >= first+n {
			l.b[bmOff+(base+k)/8] |= 1 << ((base + k) % 8)
		}
	}
	le.PutUint64(l.bat(blk/cr*(cr+1)+cr), uint64(bmOff)|stateFull)
	l.write(t, path)
}

// writeLog plants a log entry in the image at path: zeros over zs and
// the sectors ws, at log offset 0, with a fresh log GUID set in the
// current header. last is the entry's LastFileOffset.
func writeLog(t testing.TB, path string, ws []sectorWrite, zs []region, last int64) {
	t.Helper()
	l := readLayout(t, path)
	g, err := newGUID()
	if err != nil {
		t.Fatal(err)
	}
	e := buildEntry(ws, zs, g, 7, 0, int64(len(l.b)), last)
	copy(l.b[l.hdr.logOffset:], e)
	l.setHeader(func(h []byte) { copy(h[hLogGUID:], g[:]) })
	l.write(t, path)
}

func runQemu(args ...string) ([]byte, error) {
	return exec.Command("qemu-img", args...).CombinedOutput()
}

func runQemuIO(path string, cmds ...string) ([]byte, error) {
	args := []string{"-f", "vhdx"}
	for _, c := range cmds {
		args = append(args, "-c", c)
	}
	return exec.Command("qemu-io", append(args, path)...).CombinedOutput()
}

func openAIO(path string) (*aio.File, error) {
	return aio.Open(path, aio.Options{ReadOnly: true, NoDirectIO: true})
}
