package vhdx

import (
	"bytes"
	"encoding/binary"
	"errors"
	"os"
	"path/filepath"
	"testing"

	"imgfuse/coroutine"
	"imgfuse/drivers"
	"imgfuse/drivers/driverstest"
	"imgfuse/internal/testenv"
)

// FuzzParse: the header, region table, metadata and parent locator
// parsers accept or refuse any bytes with a sentinel, never a panic.
func FuzzParse(f *testing.F) {
	h := make([]byte, headerSize)
	copy(h, "head")
	le.PutUint16(h[hVersion:], 1)
	le.PutUint32(h[hLogLength:], mib)
	le.PutUint64(h[hLogOffset:], mib)
	le.PutUint32(h[hChecksum:], crcOf(h, hChecksum))
	f.Add(h)
	f.Add(locatorItem("parent_linkage", "{01234567-89AB-CDEF-0123-456789ABCDEF}", "relative_path", `..\p.vhdx`))
	// As Windows writes them: a header padded with reserved bytes that
	// are not zero; a locator of Windows paths only.
	h = bytes.Clone(h)
	for i := 80; i < headerSize; i++ {
		h[i] = byte(i)
	}
	le.PutUint32(h[hChecksum:], crcOf(h, hChecksum))
	f.Add(h)
	f.Add(locatorItem("parent_linkage", "{01234567-89AB-CDEF-0123-456789ABCDEF}",
		"volume_path", `\\?\Volume{26A21BDA-A627-11D7-9931-806E6F6E6963}\VMs\base.vhdx`, "absolute_win32_path", `C:\VMs\base.vhdx`))
	f.Fuzz(func(t *testing.T, b []byte) {
		sentinel := func(what string, err error) {
			if err != nil && !errors.Is(err, drivers.ErrCorrupt) && !errors.Is(err, drivers.ErrUnsupported) {
				t.Fatalf("%s refused without a sentinel: %v", what, err)
			}
		}
		_, err := parseHeader(b)
		sentinel("header", err)
		_, _, err = pickHeader(b, append([]byte(nil), b...))
		sentinel("headers", err)
		region := make([]byte, regionSize)
		copy(region, b)
		le.PutUint32(region[4:], crcOf(region, 4))
		_, err = parseRegions(region, 1<<30, mib, mib)
		sentinel("region table", err)
		meta := make([]byte, 1<<20)
		copy(meta, b)
		copy(meta[64<<10:], b)
		_, err = parseMetadata(meta)
		sentinel("metadata", err)
		if len(b) >= 20 {
			loc := append([]byte(nil), b...)
			copy(loc, guidVHDXParentTy[:])
			if pl, err := parseLocator(loc); err == nil {
				_ = pl.paths("/x")
				_ = pl.linkage(guid{})
			} else {
				sentinel("parent locator", err)
			}
		}
		if g, ok := parseGUID(string(b)); ok {
			if g2, ok := parseGUID(g.String()); !ok || g2 != g {
				t.Fatalf("GUID %s does not round-trip", g)
			}
		}
	})
}

// FuzzOpen: patches of fuzzed bytes at fuzzed places of a small image
// with a dirty log (headers, region tables, log, metadata, BAT, data)
// never make a read-only open panic, allocate without bound or read
// short without an error; a refused open says why with a sentinel.
func FuzzOpen(f *testing.F) {
	dir := f.TempDir()
	base := filepath.Join(dir, "base.vhdx")
	if out, err := runQemu("create", "-q", "-f", "vhdx", "-o", "block_size=1M", base, "3M"); err != nil {
		testenv.Skip(f, "qemu-img create for the seed: %v %s", err, out)
	}
	if out, err := runQemuIO(base, "write -P 0x5a 0 1M"); err != nil {
		testenv.Skip(f, "qemu-io for the seed: %v %s", err, out)
	}
	// The dirty log: the BAT sector again, and a data sector of block 2.
	l := readLayout(f, base)
	writeLog(f, base, []sectorWrite{{l.rg.bat.off, bytes.Clone(l.b[l.rg.bat.off : l.rg.bat.off+sectorSize])},
		{int64(len(l.b)) + sectorSize, make([]byte, sectorSize)}}, []region{{int64(len(l.b)), sectorSize}}, int64(len(l.b))+mib)
	img, err := os.ReadFile(base)
	if err != nil {
		f.Fatal(err)
	}
	for _, off := range []uint32{header1Off, header2Off, region1Off, mib, mib + 64, mib + 4096, 2 * mib, 3 * mib, 3*mib + 64<<10} {
		f.Add(binary.LittleEndian.AppendUint32(nil, off), img[off:off+64])
	}
	if d, err := os.MkdirTemp("/dev/shm", "vhdxfuzz"); err == nil {
		dir = d
		f.Cleanup(func() { os.RemoveAll(d) })
	}
	path := filepath.Join(dir, "f.vhdx")
	f.Fuzz(func(t *testing.T, at []byte, patch []byte) {
		b := append([]byte(nil), img...)
		if len(at) >= 4 {
			off := int(binary.LittleEndian.Uint32(at)) % len(b)
			copy(b[off:], patch)
			// Keep the CRCs of what was patched right, so that the
			// parsers behind them are reached.
			switch {
			case off >= header1Off && off < header1Off+headerSize:
				le.PutUint32(b[header1Off+hChecksum:], crcOf(b[header1Off:header1Off+headerSize], hChecksum))
			case off >= header2Off && off < header2Off+headerSize:
				le.PutUint32(b[header2Off+hChecksum:], crcOf(b[header2Off:header2Off+headerSize], hChecksum))
			case off >= region1Off && off < region1Off+regionSize:
				le.PutUint32(b[region1Off+4:], crcOf(b[region1Off:region1Off+regionSize], 4))
			}
		}
		if err := os.WriteFile(path, b, 0o644); err != nil {
			t.Fatal(err)
		}
		d, err := Open(path, drivers.OpenOptions{ReadOnly: true, NoDirectIO: true})
		if err != nil {
			if !errors.Is(err, drivers.ErrCorrupt) && !errors.Is(err, drivers.ErrUnsupported) && !errors.Is(err, os.ErrNotExist) {
				t.Fatalf("open failed without a sentinel: %v", err)
			}
			return
		}
		defer d.Close()
		_ = d.Info()
		_, _ = d.Check(drivers.CheckOnly, nil)
		driverstest.Poke(t, d)
	})
}

// FuzzLog: any log region is scanned within its budget, and what it
// yields is applied to a read without a panic.
func FuzzLog(f *testing.F) {
	g := guid{1}
	data := make([]byte, sectorSize)
	f.Add(buildEntry([]sectorWrite{{2 * mib, data}}, []region{{3 * mib, sectorSize}}, g, 1, 0, 4*mib, 4*mib))
	// Logs as Windows leaves them (windowsLog): several entries, two
	// descriptor sectors, a torn entry, stale ones.
	for _, v := range []string{"windows", "newer", "tail"} {
		log, _, _ := windowsLog(g, data, 3*mib, v)
		f.Add(log[:64<<10])
	}
	dir := f.TempDir()
	if d, err := os.MkdirTemp("/dev/shm", "vhdxlog"); err == nil {
		dir = d
		f.Cleanup(func() { os.RemoveAll(d) })
	}
	path := filepath.Join(dir, "log")
	f.Fuzz(func(t *testing.T, log []byte) {
		b := make([]byte, 4*mib)
		copy(b[mib:2*mib], log)
		if err := os.WriteFile(path, b, 0o644); err != nil {
			t.Fatal(err)
		}
		file, err := openAIO(path)
		if err != nil {
			t.Fatal(err)
		}
		defer file.Close()
		coroutine.Run(func(co *coroutine.Co) {
			rp, err := scanLog(co, file, mib, mib, g, 8*mib) // as if 8 MiB long: the seeds say so
			if err != nil {
				if !errors.Is(err, drivers.ErrCorrupt) && !errors.Is(err, drivers.ErrUnsupported) {
					t.Errorf("scan failed without a sentinel: %v", err)
				}
				return
			}
			if rp != nil {
				p := make([]byte, 64<<10)
				_ = rp.patch(co, file, p, 2*mib)
			}
		})
	})
}
