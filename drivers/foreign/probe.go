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
	// tailScore is the fixed VHD footer at the end of the file: below
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

// probeVDI: the signature 0xBEDA107F, little-endian at 0x40 (block/vdi.c).
// The banner text before it is free.
func probeVDI(in drivers.ProbeInput) int {
	if binary.LittleEndian.Uint32(head(in)[0x40:]) == 0xbeda107f {
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

// probeVPC: the cookie "conectix" at the start of the file (block/vpc.c:
// dynamic and differencing disks keep a copy of their footer there), or a
// fixed disk's footer as the last 512 bytes of the file (beyond QEMU,
// doc.go).
func probeVPC(in drivers.ProbeInput) int {
	if string(head(in)[:8]) == "conectix" {
		return magicScore
	}
	if fixedVHDFooter(in.Tail) {
		return tailScore
	}
	return 0
}

// fixedVHDFooter reports whether f is a whole, valid VHD footer of a fixed
// disk (Microsoft's "Virtual Hard Disk Image Format Specification"; all
// fields big-endian):
//
//	0   8  cookie "conectix"
//	60  4  disk type: 2 fixed, 3 dynamic, 4 differencing
//	64  4  checksum: the ones' complement of the byte sum of the footer
//	       taken with the checksum field zeroed
//
// The checksum and the type make data that merely starts a sector with
// "conectix" not count.
func fixedVHDFooter(f []byte) bool {
	if len(f) != drivers.ProbeSize || string(f[:8]) != "conectix" || binary.BigEndian.Uint32(f[60:]) != 2 {
		return false
	}
	var sum uint32
	for i, b := range f {
		if i < 64 || i >= 68 {
			sum += uint32(b)
		}
	}
	return ^sum == binary.BigEndian.Uint32(f[64:])
}
