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
