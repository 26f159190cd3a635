package qcow2

import (
	"encoding/binary"
	"fmt"

	"imgfuse/drivers"
)

// The open-time bounds check (issue 12). A qcow2 file cut short by a
// failed copy still has a header that parses, so without a check at open
// it mounts without a word and fails later, one EIO per damaged range. At
// open, every table whose location is known without reading an L2 table
// is compared with the file's size: the L1 table in use and each of its
// entries' L2 tables, the refcount table and each refcount block it
// names, the snapshot table and each snapshot's L1 table. Data clusters
// and compressed clusters live in L2 tables: checking them would read
// every L2 table (a 1 TiB image has up to 16384 of them), so they are
// checked when a read reaches them, as before.
//
// Cost: the L1 table is in memory already (a 1 TiB image's is 16 KiB);
// the refcount table is read once more in 64 KiB pieces (8 KiB for a
// 1 TiB image with 16-bit refcounts; at most 8 MiB). A read-only layer's
// L1 table larger than l1LoadMax is read in pieces as lookups reach it
// and its entries are checked then, not at open: reading up to 32 MiB per
// layer at every open would cost more than the check is worth for images
// that large.
//
// What the result means is the caller's: a writable open refuses the
// image (its writes could allocate over, or link to, space the file does
// not hold), a read-only one keeps it in img.damage for Damage.

// boundsChunk is how much of the refcount table one read covers.
const boundsChunk = 64 << 10

// pastEOF reports whether [off, off+n) does not lie inside a file of
// fileSize bytes (without overflowing for hostile offsets).
func pastEOF(off, n uint64, fileSize int64) bool {
	return off > uint64(fileSize) || n > uint64(fileSize)-off
}

// l2PastEOF describes L1 entry i, whose L2 table at off does not lie
// inside a file of fileSize bytes. QEMU writes L2 tables whole, so a table
// that starts inside the file but ends past it is a truncated file too:
// its tail would read as zeros and silently turn clusters into holes.
func l2PastEOF(i int64, off uint64, fileSize int64) error {
	verb := "is past"
	if off < uint64(fileSize) {
		verb = "runs past"
	}
	return fmt.Errorf("L1 entry %d: L2 table offset %#x %s the end of the file (%d bytes): %w",
		i, off, verb, fileSize, drivers.ErrCorrupt)
}

// l1PastEOF describes an L1 table (which, for a snapshot) that does not
// lie inside the file.
func l1PastEOF(which string, off uint64, n int64, fileSize int64) error {
	return fmt.Errorf("%s at %#x (%d bytes) runs past the end of the file (%d bytes): truncated image: %w",
		which, off, n, fileSize, drivers.ErrCorrupt)
}

// checkBounds returns the first piece of metadata found lying past the
// end of the file, nil if none: whole tables first (the L1 table in use,
// the refcount table, the snapshot table, the snapshots' L1 tables), then
// the tables their entries name (L2 tables, refcount blocks). It must
// not be called from a coroutine: it reads with plain preads.
func (img *image) checkBounds() error {
	h, fs := img.h, img.fileSize
	cs := uint64(img.clusterSize)
	if pastEOF(uint64(img.l1Off), uint64(img.l1Size)*8, fs) {
		which := "L1 table"
		if img.snapshot != nil {
			which = fmt.Sprintf("snapshot %q L1 table", img.snapshot.ID)
		}
		return l1PastEOF(which, uint64(img.l1Off), img.l1Size*8, fs)
	}
	rtBytes := uint64(h.ReftableClusters) << h.ClusterBits
	rtInside := !pastEOF(h.ReftableOffset, rtBytes, fs)
	if !rtInside {
		return fmt.Errorf("refcount table at %#x (%d bytes) runs past the end of the file (%d bytes): truncated image: %w",
			h.ReftableOffset, rtBytes, fs, drivers.ErrCorrupt)
	}
	if h.NbSnapshots > 0 && pastEOF(h.SnapshotsOffset, uint64(img.snapTableBytes), fs) {
		return fmt.Errorf("snapshot table at %#x (%d bytes) runs past the end of the file (%d bytes): %w",
			h.SnapshotsOffset, img.snapTableBytes, fs, drivers.ErrCorrupt)
	}
	for i := range img.snaps {
		s := &img.snaps[i]
		if pastEOF(s.L1Offset, uint64(s.L1Size)*8, fs) {
			return l1PastEOF(fmt.Sprintf("snapshot %q L1 table", s.ID), s.L1Offset, int64(s.L1Size)*8, fs)
		}
	}
	// img.l1 is nil when the table is read in pieces (see above).
	for i, e := range img.l1 {
		if off := e & l1eOffsetMask; off != 0 && pastEOF(off, cs, fs) {
			return l2PastEOF(int64(i), off, fs)
		}
	}
	return img.checkRefcountBlocks(rtBytes)
}

// checkRefcountBlocks reads the refcount table (rtBytes, inside the file)
// in pieces and returns the first entry naming a refcount block that does
// not lie inside the file. Blocks are written whole, as L2 tables are.
// Entries with reserved bits or misaligned offsets are left to the
// refcount code, which refuses them when it uses them.
func (img *image) checkRefcountBlocks(rtBytes uint64) error {
	fs, cs := img.fileSize, uint64(img.clusterSize)
	buf := make([]byte, min(rtBytes, boundsChunk))
	for done := uint64(0); done < rtBytes; done += uint64(len(buf)) {
		p := buf[:min(uint64(len(buf)), rtBytes-done)]
		if err := img.file.Pread(p, int64(img.h.ReftableOffset+done)); err != nil {
			return fmt.Errorf("reading the refcount table at %#x: %w", img.h.ReftableOffset, err)
		}
		for j := 0; j+8 <= len(p); j += 8 {
			e := binary.BigEndian.Uint64(p[j:]) & reftOffsetMask
			if e != 0 && pastEOF(e, cs, fs) {
				return fmt.Errorf("refcount table entry %d: refcount block at %#x is past the end of the file (%d bytes): %w",
					(done+uint64(j))/8, e, fs, drivers.ErrCorrupt)
			}
		}
	}
	return nil
}

// Damage implements drivers.Damaged: what the open found wrong with this
// image, else with the layers below it.
func (img *image) Damage() error {
	if img.damage != nil {
		return img.damage
	}
	if img.backing != nil {
		return drivers.DamageOf(img.backing)
	}
	return nil
}

// Files implements drivers.FileLister: the image, its external data file
// and then the files of its backing chain.
func (img *image) Files() []drivers.ChainFile {
	files := []drivers.ChainFile{{Path: img.path, Role: "image"}}
	if img.extData && img.dataPath != "" && img.dataPath != img.path {
		files = append(files, drivers.ChainFile{Path: img.dataPath, Role: "external data file", Of: img.path})
	}
	if img.backing != nil {
		for i, f := range drivers.FilesOf(img.backing) {
			if i == 0 {
				f.Role, f.Of = "backing file", img.path
			}
			files = append(files, f)
		}
	}
	return files
}
