package qcow2

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"reflect"
	"testing"

	"imgfuse/drivers"
)

// Seed files in testdata/seeds are real qemu-img output, regenerated with
//
//	IMGFUSE_UPDATE_SEEDS=1 go test -run TestUpdateFuzzSeeds ./drivers/qcow2/
//
// headers-*.bin hold cluster 0 of each qemuCreateCases image, cut after its
// last non-zero byte; snaps-v*-*.bin hold the snapshot table of an image
// with snapshots.
const seedDir = "testdata/seeds"

func TestUpdateFuzzSeeds(t *testing.T) {
	if os.Getenv("IMGFUSE_UPDATE_SEEDS") == "" {
		t.Skip("set IMGFUSE_UPDATE_SEEDS=1 to regenerate the seeds from qemu-img")
	}
	if err := os.MkdirAll(seedDir, 0o755); err != nil {
		t.Fatal(err)
	}
	for i, c := range qemuCreateCases {
		path := buildQemuImage(t, t.TempDir(), i)
		buf, _ := readImageHead(t, path)
		cs := 1 << be.Uint32(buf[20:])
		c0 := buf[:min(cs, len(buf))]
		n := len(c0)
		for n > 0 && c0[n-1] == 0 {
			n--
		}
		// Keep the whole header even where it ends in zeros.
		hl := 72
		if be.Uint32(buf[4:]) == 3 {
			hl = int(be.Uint32(buf[100:]))
		}
		n = max((n+7)&^7, hl)
		if err := os.WriteFile(filepath.Join(seedDir, "header-"+c.name+".bin"), c0[:n], 0o644); err != nil {
			t.Fatal(err)
		}
		if c.name != "snapshots" {
			continue
		}
		file, err := os.ReadFile(path)
		if err != nil {
			t.Fatal(err)
		}
		h, err := parseHeader(buf, int64(len(file)))
		if err != nil {
			t.Fatal(err)
		}
		snaps, err := readSnapshotTable(fileReader(file), h)
		if err != nil {
			t.Fatal(err)
		}
		table, _ := marshalSnapshotTable(snaps)
		if err := os.WriteFile(filepath.Join(seedDir, "snaps-v3-2.bin"), table, 0o644); err != nil {
			t.Fatal(err)
		}
	}
}

func seedFiles(f *testing.F, prefix string) map[string][]byte {
	f.Helper()
	paths, err := filepath.Glob(filepath.Join(seedDir, prefix+"*.bin"))
	if err != nil || len(paths) == 0 {
		f.Fatalf("no %s seeds in %s (%v)", prefix, seedDir, err)
	}
	out := map[string][]byte{}
	for _, p := range paths {
		b, err := os.ReadFile(p)
		if err != nil {
			f.Fatal(err)
		}
		out[filepath.Base(p)] = b
	}
	return out
}

// FuzzParseHeader feeds cluster 0 candidates to parseHeader: it must never
// panic, must fail only with the two sentinels, and what it accepts must
// survive marshal→parse unchanged.
func FuzzParseHeader(f *testing.F) {
	seeds := seedFiles(f, "header-")
	for _, b := range seeds {
		f.Add(b)
	}
	// Hand-mutated variants of the plain v3 header.
	v3 := seeds["header-v3.bin"]
	for _, m := range []struct {
		off int
		b   []byte
	}{
		{72, be64(1 << 20)},             // unknown incompatible bit
		{72, be64(incompatCompression)}, // bit without zstd
		{100, be32(104)},                // short header, extensions misread
		{116, be32(0xfffffff0)},         // first extension overruns
		{8, be64(0xfff8)},               // backing name at the cluster's end
		{16, be32(2000)},                // long backing name
		{20, be32(9)},                   // 512-byte clusters: extensions cut
		{36, be32(0)},                   // L1 too small
		{60, be32(1)},                   // one snapshot
		{104, []byte{1}},                // zstd without the bit
	} {
		b := bytes.Clone(v3)
		copy(b[m.off:], m.b)
		f.Add(b)
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		h, err := parseHeader(data, int64(len(data)))
		if err != nil {
			if !errors.Is(err, drivers.ErrCorrupt) && !errors.Is(err, drivers.ErrUnsupported) {
				t.Fatalf("error wraps neither sentinel: %v", err)
			}
			return
		}
		checkRoundTrip(t, h)
		_ = h.formatInfo()
		_ = h.qemuSpecific()
	})
}

// FuzzReadSnapshotTable reads a table from data placed at 64k, with n
// entries declared: no panic, errors only ErrCorrupt, and what it accepts
// marshals back to a table that reads the same.
func FuzzReadSnapshotTable(f *testing.F) {
	for name, b := range seedFiles(f, "snaps-") {
		var v uint8
		var n uint32
		if _, err := fmt.Sscanf(name, "snaps-v%d-%d.bin", &v, &n); err != nil {
			f.Fatalf("seed %s: %v", name, err)
		}
		f.Add(b, v, n)
		f.Add(b, v+1, n+1)
	}
	f.Add([]byte{}, uint8(2), uint32(65536))
	f.Fuzz(func(t *testing.T, data []byte, version uint8, n uint32) {
		h := snapHeader(2+uint32(version%2), n%(maxSnapshots+2))
		file := append(make([]byte, 1<<16), data...)
		snaps, err := readSnapshotTable(fileReader(file), h)
		if err != nil {
			if !errors.Is(err, drivers.ErrCorrupt) {
				t.Fatalf("error does not wrap ErrCorrupt: %v", err)
			}
			return
		}
		table, err := marshalSnapshotTable(snaps)
		if err != nil {
			t.Fatalf("marshal of an accepted table: %v", err)
		}
		again, err := readSnapshotTable(fileReader(append(make([]byte, 1<<16), table...)), h)
		if err != nil {
			t.Fatalf("re-read of a marshalled table: %v", err)
		}
		if len(snaps) == 0 && len(again) == 0 {
			return
		}
		if !reflect.DeepEqual(snaps, again) {
			t.Fatalf("round trip changed the table:\n%+v\n%+v", snaps, again)
		}
	})
}

// FuzzDecompressCluster feeds arbitrary streams to both decoders: no
// panic, errors only ErrCorrupt, and pooled decoders stay usable (a valid
// stream decodes correctly right after a hostile one).
func FuzzDecompressCluster(f *testing.F) {
	data := bytes.Repeat([]byte("qcow2 compressed cluster 0123456789\n"), 4096/36+1)[:4096]
	for _, typ := range []uint8{compressionDeflate, compressionZstd} {
		c, _ := compressCluster(typ, data)
		f.Add(typ, c, uint16(4096))
		f.Add(typ, c[:len(c)/2], uint16(4096))
		f.Add(typ, append(c, c...), uint16(512))
	}
	valid := map[uint8][]byte{}
	for _, typ := range []uint8{compressionDeflate, compressionZstd} {
		valid[typ], _ = compressCluster(typ, data)
	}
	f.Fuzz(func(t *testing.T, typ uint8, src []byte, size uint16) {
		dst := make([]byte, int(size)+1)
		if err := decompressCluster(typ, src, dst); err != nil && !errors.Is(err, drivers.ErrCorrupt) {
			t.Fatalf("error does not wrap ErrCorrupt: %v", err)
		}
		if v, ok := valid[typ]; ok {
			out := make([]byte, len(data))
			if err := decompressCluster(typ, v, out); err != nil || !bytes.Equal(out, data) {
				t.Fatalf("decoder broken after a fuzz input: %v", err)
			}
		}
	})
}

// FuzzParseBitmapDirectory: any directory bytes and count give bitmaps or
// an error wrapping ErrCorrupt, never a panic.
func FuzzParseBitmapDirectory(f *testing.F) {
	entry := make([]byte, 32)
	be.PutUint32(entry[12:], 2)
	entry[17] = 16
	be.PutUint16(entry[18:], 2)
	copy(entry[24:], "b0")
	f.Add(entry, uint32(1))
	f.Add(entry[:20], uint32(1))
	f.Add([]byte{}, uint32(3))
	f.Fuzz(func(t *testing.T, dir []byte, n uint32) {
		bm, err := parseBitmapDirectory(dir, n%1024)
		if err != nil {
			if !errors.Is(err, drivers.ErrCorrupt) {
				t.Fatalf("error wraps no sentinel: %v", err)
			}
			return
		}
		if len(bm) != int(n%1024) {
			t.Fatalf("%d bitmaps for n=%d", len(bm), n%1024)
		}
	})
}
