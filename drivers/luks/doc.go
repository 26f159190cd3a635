// Package luks recognises LUKS containers (cryptsetup's on-disk format for
// encrypted disks, also QEMU's "luks" image format) in order to refuse
// them. imgfuse does not decrypt: a LUKS image is opened by no driver.
//
// Why a format that opens nothing: without it a LUKS file probes as raw,
// and a probing open would expose the ciphertext as if it were the disk — a
// disk full of noise, and a filesystem tool run on it finds nothing. With it
// in the list of formats:
//   - a probing open fails with ErrEncrypted (wrapping
//     drivers.ErrUnsupported), naming the reason;
//   - naming another format gets "not a qcow2 image (it is a LUKS-encrypted
//     image)" rather than "its contents look like raw";
//   - naming raw still opens the file as raw bytes, as asked;
//   - a probed raw image's head guard (drivers/raw) refuses guest writes
//     that would make the image probe as LUKS next time, as it does for
//     qcow2 (QEMU's luks driver is in its probe list too);
//   - a qcow2 backing file that is a LUKS container is refused rather than
//     read as ciphertext.
//
// The magic is the six bytes "LUKS\xba\xbe" at offset 0, the same for LUKS1
// and LUKS2 (cryptsetup's on-disk format specifications); a big-endian
// 16-bit version follows. QEMU's probe accepts only version 1, the one it
// can open; we refuse both, since neither can be read here.
package luks
