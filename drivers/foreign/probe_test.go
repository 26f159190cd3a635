package foreign

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"imgfuse/drivers"
	"imgfuse/drivers/driverstest"
	"imgfuse/drivers/qcow2"
	"imgfuse/drivers/raw"
	"imgfuse/drivers/vdi"
	"imgfuse/drivers/vhdx"
	"imgfuse/drivers/vmdk"
	"imgfuse/drivers/vpc"
)

// all is the list of formats cmd/imgfuse assembles: readable and foreign.
func all() []drivers.Format {
	return append([]drivers.Format{qcow2.Format{}, raw.Format{}, vdi.Format{}, vhdx.Format{}, vmdk.Format{}, vpc.Format{}}, Formats()...)
}

func probeName(t *testing.T, in drivers.ProbeInput) string {
	t.Helper()
	f, err := drivers.Probe(all(), in)
	if err != nil {
		t.Fatal(err)
	}
	return f.Name()
}

// qemuProbe is the format qemu-img probes for path (info without -f).
func qemuProbe(t *testing.T, path string) string {
	t.Helper()
	var info struct {
		Format string `json:"format"`
	}
	out := driverstest.Cmd(t, "qemu-img", "info", "-U", "--output=json", path)
	if err := json.Unmarshal(out, &info); err != nil || info.Format == "" {
		t.Fatalf("qemu-img info %s: %v\n%s", path, err, out)
	}
	return info.Format
}

// TestProbeQemuImages: every format qemu-img creates (and converts to) is
// probed as qemu-img probes it, the files imgfuse reads among them, with
// one deliberate difference: a fixed VHD, which QEMU takes for raw.
func TestProbeQemuImages(t *testing.T) {
	driverstest.RequireTools(t, "qemu-img")
	t.Parallel()
	dir := t.TempDir()
	path := func(name string) string { return filepath.Join(dir, name) }
	src, create := driverstest.ForeignSource(t, dir)
	for _, tt := range []struct {
		path string
		want string // "" for what qemu-img says
	}{
		{create("q.qcow2", "qcow2"), ""},
		{create("q2.qcow2", "qcow2", "-o", "compat=0.10"), ""},
		{src, ""},
		{create("q.qcow", "qcow"), ""},
		{create("q.qed", "qed"), ""},
		{create("sparse.vmdk", "vmdk"), ""},
		{path("stream.vmdk"), ""},
		{create("flat.vmdk", "vmdk", "-o", "subformat=monolithicFlat"), ""},
		{path("flat-flat.vmdk"), ""}, // the extent of flat.vmdk: raw data
		{create("split.vmdk", "vmdk", "-o", "subformat=twoGbMaxExtentSparse"), ""},
		{path("split-s001.vmdk"), "vmdk"}, // an extent, sparse: QEMU probes vmdk, then fails to open it alone
		{create("splitflat.vmdk", "vmdk", "-o", "subformat=twoGbMaxExtentFlat"), ""},
		{create("d.vhdx", "vhdx"), ""},
		{create("f.vhdx", "vhdx", "-o", "subformat=fixed"), ""},
		{create("d.vhd", "vpc"), ""},
		{create("fixed.vhd", "vpc", "-o", "subformat=fixed"), "vpc"}, // QEMU: raw
		{create("d.vdi", "vdi"), ""},
		{create("s.vdi", "vdi", "-o", "static=on"), ""},
		{create("p.hds", "parallels"), ""},
	} {
		got, err := drivers.ProbeFile(all(), tt.path)
		if err != nil {
			t.Fatal(err)
		}
		want := tt.want
		if want == "" {
			want = qemuProbe(t, tt.path)
		}
		if got.Name() != want {
			t.Errorf("%s: probed as %s, want %s", filepath.Base(tt.path), got.Name(), want)
		}
	}
	// Through ProbeFile: the name reaches the DMG rule, and the tail is
	// the last 512 bytes of a file of any length.
	for name, want := range map[string]string{"z.dmg": "dmg", "z.DMG": "raw", "odd.img": "vpc"} {
		data := make([]byte, 4096)
		if name == "odd.img" {
			data = append(make([]byte, 1000), vhdFooter(2, false)...)
		}
		if err := os.WriteFile(path(name), data, 0o644); err != nil {
			t.Fatal(err)
		}
		if got, err := drivers.ProbeFile(all(), path(name)); err != nil || got.Name() != want {
			t.Errorf("ProbeFile(%s): %v, %v; want %s", name, got, err, want)
		}
	}
	if got := qemuProbe(t, path("fixed.vhd")); got != "raw" {
		t.Errorf("qemu-img now probes a fixed VHD as %s: update doc.go", got)
	}
}

// sector returns a 512-byte sector holding each of parts at its offset.
func sector(parts map[int]string) []byte {
	b := make([]byte, drivers.ProbeSize)
	for off, s := range parts {
		copy(b[off:], s)
	}
	return b
}

func le32(v uint32) string { return string(binary.LittleEndian.AppendUint32(nil, v)) }
func be32(v uint32) string { return string(binary.BigEndian.AppendUint32(nil, v)) }

// vhdFooter is a fixed VHD footer of disk type typ, with a correct
// checksum unless bad.
func vhdFooter(typ uint32, bad bool) []byte {
	f := sector(map[int]string{0: "conectix", 8: be32(2), 12: be32(0x10000), 16: strings.Repeat("\xff", 8),
		28: "qemu", 48: "\x00\x00\x00\x00\x00\x40\x00\x00", 60: be32(typ)})
	var sum uint32
	for _, b := range f {
		sum += uint32(b)
	}
	if bad {
		sum++
	}
	binary.BigEndian.PutUint32(f[64:], ^sum)
	return f
}

// TestProbeCrafted covers each rule with crafted bytes, at and around its
// edges (docs/formats.md §1): the magics, the VMDK descriptor's text
// rule, DMG's name rule, the fixed VHD footer.
func TestProbeCrafted(t *testing.T) {
	t.Parallel()
	bochs := map[int]string{0: "Bochs Virtual HD Image", 32: "Redolog", 48: "Growing", 64: le32(0x20000)}
	with := func(m map[int]string, off int, s string) map[int]string {
		n := map[int]string{off: s}
		for k, v := range m {
			if k != off {
				n[k] = v
			}
		}
		return n
	}
	long := "#" + strings.Repeat("x", 600) + "\nversion=1\n"
	for _, tt := range []struct {
		name string
		in   drivers.ProbeInput
		want string
	}{
		{"empty file", drivers.ProbeInput{}, "raw"},
		{"zeros", drivers.ProbeInput{Head: make([]byte, 512), Tail: make([]byte, 512)}, "raw"},

		{"qcow v1", drivers.ProbeInput{Head: []byte("QFI\xfb\x00\x00\x00\x01")}, "qcow"},
		{"qcow2 v3", drivers.ProbeInput{Head: []byte("QFI\xfb\x00\x00\x00\x03")}, "qcow2"},
		{"qcow2 magic, version 0", drivers.ProbeInput{Head: []byte("QFI\xfb\x00\x00\x00\x00")}, "qcow2"},
		{"qcow2 magic only", drivers.ProbeInput{Head: []byte("QFI\xfb")}, "qcow2"},

		{"qed", drivers.ProbeInput{Head: []byte("QED\x00")}, "qed"},
		{"qed without its NUL", drivers.ProbeInput{Head: []byte("QED!")}, "raw"},
		{"qed, 3 bytes (padded: the NUL)", drivers.ProbeInput{Head: []byte("QED")}, "qed"},

		{"vmdk4 sparse", drivers.ProbeInput{Head: []byte("KDMV\x01\x00\x00\x00")}, "vmdk"},
		{"vmdk3 COWD", drivers.ProbeInput{Head: []byte("COWD\x01\x00\x00\x00")}, "vmdk"},
		{"vmdk magic reversed", drivers.ProbeInput{Head: []byte("VMDK")}, "raw"},

		{"vhdx", drivers.ProbeInput{Head: []byte("vhdxfile")}, "vhdx"},
		{"vhdx, 7 bytes", drivers.ProbeInput{Head: []byte("vhdxfil")}, "raw"},

		{"vpc dynamic", drivers.ProbeInput{Head: []byte("conectix")}, "vpc"},
		{"vpc cookie, any type at 0", drivers.ProbeInput{Head: vhdFooter(3, true)}, "vpc"},
		{"fixed vhd footer at the end", drivers.ProbeInput{Head: make([]byte, 512), Tail: vhdFooter(2, false)}, "vpc"},
		{"fixed vhd footer, bad checksum", drivers.ProbeInput{Head: make([]byte, 512), Tail: vhdFooter(2, true)}, "raw"},
		{"dynamic vhd footer at the end only", drivers.ProbeInput{Head: make([]byte, 512), Tail: vhdFooter(3, false)}, "raw"},
		{"fixed vhd footer, tail cut", drivers.ProbeInput{Head: make([]byte, 512), Tail: vhdFooter(2, false)[:511]}, "raw"},
		{"fixed vhd footer, tail unknown", drivers.ProbeInput{Head: make([]byte, 512)}, "raw"},
		{"qcow2 head beats a vhd tail", drivers.ProbeInput{Head: []byte("QFI\xfb\x00\x00\x00\x03"), Tail: vhdFooter(2, false)}, "qcow2"},
		{"vhd tail beats a dmg name", drivers.ProbeInput{Head: make([]byte, 512), Tail: vhdFooter(2, false), Name: "x.dmg"}, "vpc"},

		{"vdi", drivers.ProbeInput{Head: sector(map[int]string{0: "<<< QEMU VM Virtual Disk Image >>>\n", 0x40: "\x7f\x10\xda\xbe"})}, "vdi"},
		{"vdi signature without banner", drivers.ProbeInput{Head: sector(map[int]string{0x40: "\x7f\x10\xda\xbe"})}, "vdi"},
		{"vdi signature big-endian", drivers.ProbeInput{Head: sector(map[int]string{0x40: "\xbe\xda\x10\x7f"})}, "raw"},
		{"vdi, file ends inside the signature", drivers.ProbeInput{Head: sector(map[int]string{0x40: "\x7f\x10\xda\xbe"})[:0x43]}, "raw"},

		{"parallels", drivers.ProbeInput{Head: sector(map[int]string{0: "WithoutFreeSpace", 16: le32(2)})}, "parallels"},
		{"parallels ext", drivers.ProbeInput{Head: sector(map[int]string{0: "WithouFreSpacExt", 16: le32(2)})}, "parallels"},
		{"parallels version 3", drivers.ProbeInput{Head: sector(map[int]string{0: "WithoutFreeSpace", 16: le32(3)})}, "raw"},

		{"bochs v2", drivers.ProbeInput{Head: sector(bochs)}, "bochs"},
		{"bochs v1", drivers.ProbeInput{Head: sector(with(bochs, 64, le32(0x10000)))}, "bochs"},
		{"bochs version 3", drivers.ProbeInput{Head: sector(with(bochs, 64, le32(0x30000)))}, "raw"},
		{"bochs undoable", drivers.ProbeInput{Head: sector(with(bochs, 48, "Undoable"))}, "raw"},
		{"bochs subtype unterminated", drivers.ProbeInput{Head: sector(with(bochs, 48, "Growing!"))}, "raw"},
		{"bochs magic unterminated", drivers.ProbeInput{Head: sector(with(bochs, 0, "Bochs Virtual HD Image2"))}, "raw"},

		{"cloop", drivers.ProbeInput{Head: []byte(cloopMagic + "\x00\x00\x02\x00")}, "cloop"},
		{"cloop preamble cut", drivers.ProbeInput{Head: []byte(cloopMagic[:82])}, "raw"},
		{"cloop V1", drivers.ProbeInput{Head: []byte(strings.Replace(cloopMagic, "V2.0", "V1.0", 1))}, "raw"},

		{"dmg by name", drivers.ProbeInput{Head: make([]byte, 512), Name: "r.dmg"}, "dmg"},
		{"dmg name in a directory", drivers.ProbeInput{Name: "/images/r.dmg"}, "dmg"},
		{"dmg, upper case", drivers.ProbeInput{Name: "r.DMG"}, "raw"},
		{"dmg, the suffix alone", drivers.ProbeInput{Name: ".dmg"}, "raw"},
		{"dmg, a directory's suffix", drivers.ProbeInput{Name: "r.dmg/disk"}, "raw"},
		{"dmg named qcow2", drivers.ProbeInput{Head: []byte("QFI\xfb\x00\x00\x00\x03"), Name: "q.dmg"}, "qcow2"},
		{"koly trailer without the name", drivers.ProbeInput{Tail: sector(map[int]string{0: "koly"}), Name: "k.img"}, "raw"},
		{"cloop named dmg: a tie, the first listed wins", drivers.ProbeInput{Head: []byte(cloopMagic), Name: "c.dmg"}, "cloop"},

		{"luks1", drivers.ProbeInput{Head: []byte("LUKS\xba\xbe\x00\x01")}, "luks"},
		{"luks2", drivers.ProbeInput{Head: []byte("LUKS\xba\xbe\x00\x02")}, "luks"},
		{"luks magic cut", drivers.ProbeInput{Head: []byte("LUKS\xba")}, "raw"},

		// The VMDK descriptor rule (docs/formats.md §1.3).
		{"descriptor", drivers.ProbeInput{Head: []byte("# Disk DescriptorFile\nversion=1\nCID=1\n")}, "vmdk"},
		{"descriptor version 2, 3", drivers.ProbeInput{Head: []byte("version=3\n")}, "vmdk"},
		{"descriptor version 4", drivers.ProbeInput{Head: []byte("version=4\n")}, "raw"},
		{"descriptor CRLF", drivers.ProbeInput{Head: []byte("# Disk DescriptorFile\r\nversion=2\r\n")}, "vmdk"},
		{"comment, spaces-only line, version", drivers.ProbeInput{Head: []byte("# c\n   \nversion=1\n")}, "vmdk"},
		{"spaces-only line ending CR LF", drivers.ProbeInput{Head: []byte("  \r\nversion=1\n")}, "vmdk"},
		{"leading empty line", drivers.ProbeInput{Head: []byte("\nversion=1\n")}, "raw"},
		{"empty line after a comment", drivers.ProbeInput{Head: []byte("# c\n\nversion=1\n")}, "raw"},
		{"CR-only line", drivers.ProbeInput{Head: []byte("\r\nversion=1\n")}, "raw"},
		{"spaces then text", drivers.ProbeInput{Head: []byte("  x\nversion=1\n")}, "raw"},
		{"indented version", drivers.ProbeInput{Head: []byte("  version=1\n")}, "raw"},
		{"version without end of line", drivers.ProbeInput{Head: []byte("version=1")}, "raw"},
		{"version at the end of the sector", drivers.ProbeInput{Head: []byte(strings.Repeat(" ", 501) + "\nversion=1")}, "raw"},
		{"version line ending at the sector's end", drivers.ProbeInput{Head: []byte(strings.Repeat(" ", 501) + "\nversion=1\n")}, "vmdk"},
		{"first comment longer than a sector", drivers.ProbeInput{Head: []byte(long[:512])}, "raw"},
		{"another key first", drivers.ProbeInput{Head: []byte("CID=1\nversion=1\n")}, "raw"},
		{"version with spaces", drivers.ProbeInput{Head: []byte("version = 1\n")}, "raw"},
		{"version then CR only", drivers.ProbeInput{Head: []byte("version=1\r")}, "raw"},
	} {
		if got := probeName(t, tt.in); got != tt.want {
			t.Errorf("%s: probed as %s, want %s", tt.name, got, tt.want)
		}
	}
}

// qemuVMDKProbe is block/vmdk.c's vmdk_probe text loop transcribed index
// by index, for FuzzProbe to hold drivers/vmdk's probe to.
func qemuVMDKProbe(buf []byte) bool {
	p, end := 0, len(buf)
	for p < end {
		if buf[p] == '#' {
			for p < end && buf[p] != '\n' {
				p++
			}
			p++
			continue
		}
		if buf[p] == ' ' {
			for p < end && buf[p] == ' ' {
				p++
			}
			if p < end && buf[p] == '\r' {
				p++
			}
			if p == end || buf[p] != '\n' {
				return false
			}
			p++
			continue
		}
		for _, v := range []string{"version=1\n", "version=2\n", "version=3\n"} {
			if end-p >= len("version=X\n") && string(buf[p:p+len(v)]) == v {
				return true
			}
		}
		for _, v := range []string{"version=1\r\n", "version=2\r\n", "version=3\r\n"} {
			if end-p >= len("version=X\r\n") && string(buf[p:p+len(v)]) == v {
				return true
			}
		}
		return false
	}
	return false
}

// FuzzProbe: no input makes a probe panic or answer a score outside the
// documented ones, the VMDK descriptor rule agrees with QEMU's loop, and
// a probe reads missing head bytes as zeros (a short head and the same
// head zero-padded score alike).
func FuzzProbe(f *testing.F) {
	f.Add([]byte("# Disk DescriptorFile\nversion=1\n"), []byte("conectix"), "x.dmg")
	f.Add([]byte("  \r\n#\n version=3\r\n"), vhdFooter(2, false), "")
	f.Add([]byte("LUKS\xba\xbe\x00\x01"), []byte{}, "a.DMG")
	f.Add(sector(map[int]string{0: "WithoutFreeSpace", 16: le32(2)}), []byte(nil), ".dmg")
	f.Add([]byte(cloopMagic), []byte("koly"), "c")
	f.Fuzz(func(t *testing.T, head, tail []byte, name string) {
		in := drivers.ProbeInput{Head: head, Tail: tail, Name: name}
		padded := in
		padded.Head = append(bytes.Clone(head), make([]byte, max(0, drivers.ProbeSize-len(head)))...)
		for _, ff := range formats {
			s := ff.Probe(in)
			if s != 0 && s != weakScore && s != tailScore && s != magicScore {
				t.Fatalf("%s: score %d", ff.Name(), s)
			}
			if ff.name != "luks" && len(head) <= drivers.ProbeSize && ff.Probe(padded) != s {
				t.Fatalf("%s: %d for the head, %d for it zero-padded", ff.Name(), s, ff.Probe(padded))
			}
		}
		h := padded.Head[:drivers.ProbeSize]
		magic := string(h[:4]) == "KDMV" || string(h[:4]) == "COWD"
		if got, want := (vmdk.Format{}).Probe(drivers.ProbeInput{Head: h}) == magicScore, magic || qemuVMDKProbe(h); got != want {
			t.Fatalf("vmdk probe of %q: %v, QEMU's says %v", h, got, want)
		}
	})
}

// TestFormatsTable: names are unique, none is a readable format's, and
// each refuses to open.
func TestFormatsTable(t *testing.T) {
	seen := map[string]bool{"qcow2": true, "raw": true, "vdi": true, "vhdx": true, "vmdk": true, "vpc": true}
	for _, f := range Formats() {
		if seen[f.Name()] {
			t.Errorf("format %q listed twice", f.Name())
		}
		seen[f.Name()] = true
		if _, err := f.Open("/nonexistent", drivers.OpenOptions{}); err == nil {
			t.Errorf("%s: Open succeeded", f.Name())
		}
	}
	want := "bochs cloop dmg luks parallels qcow qed"
	var names []string
	for _, f := range Formats() {
		names = append(names, f.Name())
	}
	if got := strings.Join(names, " "); got != want {
		t.Errorf("formats %q, want %q (every format qemu-img 7.2 probes but those with a driver)", got, want)
	}
}
