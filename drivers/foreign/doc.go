// Package foreign recognises the image formats imgfuse cannot read, in
// order to refuse them by name. Every format qemu-img probes is here
// except those with a driver (qcow2, raw, VDI, VHD, VHDX, VMDK): qcow
// (version 1), QED, Parallels, DMG, cloop, Bochs and LUKS.
//
// Why formats that open nothing: without them such a file probes as raw,
// and a probing open exposes the container as if it were the disk. A QED
// file mounted so is a writable "disk" whose first sectors are the QED
// header; mkfs on it destroys the image. With them in the list of formats
// (cmd/imgfuse assembles it):
//   - a probing open fails with an *Error wrapping drivers.ErrUnsupported
//     that names the format ("is a QED image: not supported"), and the
//     command line refuses the image in one line with exit 5;
//   - naming another format gets "not a qcow2 image (it is a QED image)"
//     rather than "its contents look like raw";
//   - naming raw still opens the file as raw bytes, as asked;
//   - a probed raw image's guard (drivers/raw) refuses guest writes that
//     would make the image probe as one of them next time, as it does for
//     qcow2 (each is in QEMU's probe list too);
//   - a qcow2 backing file in one of them, named by the backing format or
//     probed, is refused rather than read as raw bytes.
//
// # Probing
//
// Each probe follows QEMU's own (block/*.c, *_probe, read at 7.2) with
// QEMU's scores: 100 for a magic, 2 for cloop's shell preamble and for
// DMG's file name, so that a real magic beats them and raw (1) loses to
// them. QEMU hands every probe 512 bytes, zero-padding a shorter file; so
// do these (padded), so a 10-byte file is judged as QEMU judges it. The
// details, and the verification against qemu-img 7.2, are in
// docs/formats.md §1.
//
// The fixed VHD probe that goes beyond QEMU (the footer in the file's
// last 512 bytes, score 50) moved to drivers/vpc with the format, and the
// VMDK probe (the sparse magics and QEMU's descriptor rule) to
// drivers/vmdk.
//
// LUKS: the magic is "LUKS\xba\xbe" at offset 0 for LUKS1 and LUKS2.
// QEMU's probe accepts only version 1, the one it can open; this one
// refuses both, since neither can be read here, and words the refusal as
// encryption ("is a LUKS-encrypted image"), since no driver will read it.
//
// # Moving a format out
//
// When a format gets a driver (as drivers/vhdx did, see DESIGN.md),
// delete its row from the table in foreign.go, move its probe function
// from probe.go to the new package's Format.Probe, and add the new Format
// to cmd/imgfuse's imageFormats. The probe tests here move with it.
package foreign
