package vhdx

import (
	"errors"
	"os"
	"path/filepath"
	"testing"

	"imgfuse/drivers"
	"imgfuse/drivers/driverstest"
)

// fixRegionCRC recomputes the CRC of both region table copies.
func (l *layout) fixRegionCRC() {
	for _, off := range []int{region1Off, region2Off} {
		r := l.b[off : off+regionSize]
		le.PutUint32(r[4:], crcOf(r, 4))
	}
}

// regionEntry returns region table entry i of both copies.
func (l *layout) regionEntries(i int) [][]byte {
	return [][]byte{l.b[region1Off+16+32*i:][:32], l.b[region2Off+16+32*i:][:32]}
}

// TestHostile: damaged images are refused with a sentinel, read-only and
// writable, and the refusal changes no byte; damaged BAT entries open
// read-only as damage and fail reads of those blocks cleanly.
func TestHostile(t *testing.T) {
	dir := t.TempDir()
	path, _ := build(t, vhdxImage{"h", []string{"-o", "block_size=1M"}, "4M", []string{"write -P 0xaa 0 2M"}}, dir)
	batIndex := func(l *layout) int {
		for i := 0; i < 2; i++ {
			if guid(l.regionEntries(i)[0][:16]) == guidBAT {
				return i
			}
		}
		t.Fatal("no BAT region entry")
		return 0
	}
	cases := []struct {
		name  string
		patch func(l *layout)
	}{
		{"both header CRCs", func(l *layout) { l.b[header1Off+100] ^= 1; l.b[header2Off+100] ^= 1 }},
		{"equal sequence numbers", func(l *layout) {
			for _, off := range []int{header1Off, header2Off} {
				h := l.b[off : off+headerSize]
				le.PutUint64(h[hSeq:], 7)
				h[hFileWrite] = byte(off >> 16)
				le.PutUint32(h[hChecksum:], crcOf(h, hChecksum))
			}
		}},
		{"region past the end", func(l *layout) {
			for _, e := range l.regionEntries(batIndex(l)) {
				le.PutUint64(e[16:], uint64(len(l.b))+mib)
			}
			l.fixRegionCRC()
		}},
		{"overlapping regions", func(l *layout) {
			for _, e := range l.regionEntries(batIndex(l)) {
				le.PutUint64(e[16:], uint64(l.rg.meta.off))
			}
			l.fixRegionCRC()
		}},
		{"region over the log", func(l *layout) {
			for _, e := range l.regionEntries(batIndex(l)) {
				le.PutUint64(e[16:], uint64(l.hdr.logOffset))
			}
			l.fixRegionCRC()
		}},
		{"huge region count", func(l *layout) {
			le.PutUint32(l.b[region1Off+8:], 1<<31)
			le.PutUint32(l.b[region2Off+8:], 1<<31)
			l.fixRegionCRC()
		}},
		{"unknown required region", func(l *layout) {
			for _, off := range []int{region1Off, region2Off} {
				n := int(le.Uint32(l.b[off+8:]))
				e := l.b[off+16+32*n:]
				copy(e, "an unknown guid!")
				le.PutUint64(e[16:], 1<<40)
				le.PutUint32(e[24:], mib)
				le.PutUint32(e[28:], 1)
				le.PutUint32(l.b[off+8:], uint32(n+1))
			}
			l.fixRegionCRC()
		}},
		{"virtual size past the BAT", func(l *layout) {
			it := l.items[guidDiskSize]
			le.PutUint64(l.b[it[0]:], 60<<40) // 64 TiB-ish: 62914560 entries, 480 MiB of BAT
		}},
		{"block size 3 MiB", func(l *layout) { le.PutUint32(l.b[l.items[guidFileParams][0]:], 3*mib) }},
		{"sector size 1024", func(l *layout) { le.PutUint32(l.b[l.items[guidLogicalSS][0]:], 1024) }},
		{"metadata item outside", func(l *layout) {
			m := l.b[l.rg.meta.off:]
			le.PutUint32(m[32+16:], uint32(l.rg.meta.length))
		}},
		{"log past the end", func(l *layout) {
			l.setHeader(func(h []byte) { le.PutUint64(h[hLogOffset:], uint64(len(l.b))) })
		}},
	}
	for _, c := range cases {
		p := filepath.Join(dir, c.name+".vhdx")
		copyFile(t, path, p)
		l := readLayout(t, p)
		c.patch(l)
		l.write(t, p)
		for _, ro := range []bool{true, false} {
			before, _ := os.ReadFile(p)
			d, err := Open(p, drivers.OpenOptions{ReadOnly: ro})
			if err == nil {
				d.Close()
				t.Errorf("%s (read-only %v): opened", c.name, ro)
				continue
			}
			if !errors.Is(err, drivers.ErrCorrupt) && !errors.Is(err, drivers.ErrUnsupported) {
				t.Errorf("%s: refused without a sentinel: %v", c.name, err)
			}
			if after, _ := os.ReadFile(p); string(before) != string(after) {
				t.Errorf("%s: the refused open changed the file", c.name)
			}
		}
	}

	// A BAT entry over the headers: read-only opens, reports damage, and
	// fails that block's reads with EIO-class errors; writable refuses.
	p := filepath.Join(dir, "bad-bat.vhdx")
	copyFile(t, path, p)
	l := readLayout(t, p)
	le.PutUint64(l.bat(1), 0|stateFull)
	l.write(t, p)
	if _, err := Open(p, drivers.OpenOptions{}); !errors.Is(err, drivers.ErrCorrupt) {
		t.Errorf("writable open of a block over the headers: %v", err)
	}
	d, err := Open(p, drivers.OpenOptions{ReadOnly: true})
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	if !errors.Is(d.Damage(), drivers.ErrCorrupt) {
		t.Errorf("damage: %v", d.Damage())
	}
	buf := make([]byte, 4096)
	if _, err := driverstest.ReadAt(d, buf, mib); !errors.Is(err, drivers.ErrCorrupt) {
		t.Errorf("read of the block over the headers: %v", err)
	}
	if _, err := driverstest.ReadAt(d, buf, 0); err != nil {
		t.Errorf("read of a good block: %v", err)
	}
}
