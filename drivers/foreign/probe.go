package foreign

import (
	"bytes"
	"encoding/binary"
	"strings"

	"imgfuse/drivers"
)

// Scores, as QEMU gives them.
const (
	magicScore = 100 // a magic number or signature
	weakScore  = 2   // cloop's shell preamble, DMG's file name
	// tailScore is drivers/vpc's score for a fixed VHD footer at the end
	// of the file (FuzzProbe allows it): below
	// every magic at the start, above the weak signs and raw (doc.go).
	tailScore = 50
)

// head returns in.Head zero-padded to drivers.ProbeSize bytes: QEMU's
// probes always see 512 bytes, zeros past the end of a short file.
func head(in drivers.ProbeInput) []byte {
	if len(in.Head) >= drivers.ProbeSize {
		return in.Head[:drivers.ProbeSize]
	}
	h := make([]byte, drivers.ProbeSize)
	copy(h, in.Head)
	return h
}

// probeQcow: the qcow2 magic "QFI\xfb" with a big-endian version of
// exactly 1 (block/qcow.c). Versions 2 and up are qcow2's.
func probeQcow(in drivers.ProbeInput) int {
	h := head(in)
	if string(h[:4]) == "QFI\xfb" && binary.BigEndian.Uint32(h[4:]) == 1 {
		return magicScore
	}
	return 0
}

// probeQED: "QED\0", QED_MAGIC read little-endian (block/qed.c).
func probeQED(in drivers.ProbeInput) int {
	if string(head(in)[:4]) == "QED\x00" {
		return magicScore
	}
	return 0
}

// probeVHDX: the file type identifier "vhdxfile" (block/vhdx.c).
func probeVHDX(in drivers.ProbeInput) int {
	if string(head(in)[:8]) == "vhdxfile" {
		return magicScore
	}
	return 0
}

// probeParallels: one of the two 16-byte signatures, then the
// little-endian version 2 (block/parallels-probe.c).
func probeParallels(in drivers.ProbeInput) int {
	h := head(in)
	sig := string(h[:16])
	if (sig == "WithoutFreeSpace" || sig == "WithouFreSpacExt") && binary.LittleEndian.Uint32(h[16:]) == 2 {
		return magicScore
	}
	return 0
}

// probeBochs: a growing redolog (block/bochs.c). QEMU compares the magic,
// type and subtype fields with strcmp, so each string must end in a NUL
// inside its field; the little-endian version is 2.0 or 1.0.
func probeBochs(in drivers.ProbeInput) int {
	h := head(in)
	cstr := func(off int, want string) bool {
		return string(h[off:off+len(want)]) == want && h[off+len(want)] == 0
	}
	v := binary.LittleEndian.Uint32(h[64:])
	if cstr(0, "Bochs Virtual HD Image") && cstr(32, "Redolog") && cstr(48, "Growing") &&
		(v == 0x00020000 || v == 0x00010000) {
		return magicScore
	}
	return 0
}

// cloopMagic is the shell preamble of a cloop V2.0 image.
const cloopMagic = "#!/bin/sh\n#V2.0 Format\nmodprobe cloop file=$0 && mount -r -t iso9660 /dev/cloop $1\n"

// probeCloop: the file starts with the V2.0 preamble (block/cloop.c): a
// weak sign, since it is only text.
func probeCloop(in drivers.ProbeInput) int {
	if bytes.HasPrefix(head(in), []byte(cloopMagic)) {
		return weakScore
	}
	return 0
}

// probeDMG: the file name ends in ".dmg", case-sensitively, after at least
// one other character (block/dmg.c, which looks at nothing else: the UDIF
// trailer is read only at open). A weak sign: any magic beats it.
func probeDMG(in drivers.ProbeInput) int {
	if len(in.Name) > 4 && strings.HasSuffix(in.Name, ".dmg") {
		return weakScore
	}
	return 0
}

// probeLUKS: the LUKS magic "LUKS\xba\xbe", whatever version follows
// (doc.go: QEMU's takes version 1 only).
func probeLUKS(in drivers.ProbeInput) int {
	if bytes.HasPrefix(in.Head, []byte("LUKS\xba\xbe")) {
		return magicScore
	}
	return 0
}

// probeVMDK: a sparse extent's magic ("KDMV" for VMDK4, "COWD" for VMDK3),
// or a text descriptor (vmdkDescriptor).
func probeVMDK(in drivers.ProbeInput) int {
	h := head(in)
	if m := string(h[:4]); m == "KDMV" || m == "COWD" || vmdkDescriptor(h) {
		return magicScore
	}
	return 0
}

// vmdkDescriptor reports whether h starts like a VMDK text descriptor, by
// QEMU's rule (block/vmdk.c, vmdk_probe): comment lines ("#...") and lines
// of spaces (optionally ending "\r") are skipped, and the first other line
// must be "version=1", "=2" or "=3", ending "\n" or "\r\n". An empty line
// is not skipped: it ends the probe with no. A line cut by the end of h
// (a comment longer than 512 bytes, say) is no either.
func vmdkDescriptor(h []byte) bool {
	for p := h; len(p) > 0; {
		switch p[0] {
		case '#':
			i := bytes.IndexByte(p, '\n')
			if i < 0 {
				return false
			}
			p = p[i+1:]
		case ' ':
			p = bytes.TrimLeft(p, " ")
			p = bytes.TrimPrefix(p, []byte("\r"))
			if len(p) == 0 || p[0] != '\n' {
				return false
			}
			p = p[1:]
		default:
			for _, v := range []string{"1", "2", "3"} {
				if bytes.HasPrefix(p, []byte("version="+v+"\n")) || bytes.HasPrefix(p, []byte("version="+v+"\r\n")) {
					return true
				}
			}
			return false
		}
	}
	return false
}
