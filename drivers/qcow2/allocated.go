package qcow2

import "imgfuse/drivers"

var _ drivers.Allocator = (*image)(nil)

// Allocated implements drivers.Allocator: the data bytes this layer's
// files hold, plus those of the layers below it, clamped to the disk size.
// It reads no table: one fstat per layer, and a few loads.
//
// A layer's data bytes are what its filesystem allocates to it (st_blocks,
// what du and qemu-img info's "disk size" count; QEMU's FUSE export reports
// exactly that as st_blocks) less the metadata it is known to hold:
//
//   - with an external data file, that file's allocation: it holds guest
//     data only;
//   - otherwise the image file's, less the header cluster, the L1 table,
//     the refcount table, the snapshot table and the snapshots' L1 tables
//     (their sizes at open, in 4 KiB blocks: metaFixed), one cluster per
//     L2 table the L1 table in use names (l2Tables), and the refcount
//     blocks needed to cover that many bytes of file (estimated, not
//     read).
//
// What it approximates:
//
//   - over: clusters the file holds that read as zeros or belong to no
//     guest offset of the disk shown – zero clusters that keep their host
//     cluster, clusters freed by a discard (their blocks stay in the file
//     until reused: nothing punches them out), leaked clusters, clusters
//     only internal snapshots use, the L2 tables of snapshots, tables grown
//     since open, an L2 table count unknown because the L1 table is read
//     in pieces (a read-only layer whose L1 table is over 1 MiB);
//     and in a chain, ranges stored in several layers count once per
//     layer (the sum of the layers bounds their union from above);
//   - under: compressed clusters count their compressed size, and metadata
//     allocated but not yet written (an L2 table still in the cache) is
//     subtracted before it is in the file.
//
// The clamp keeps the result within [0, Size()]: a fully written disk
// reports its size, an empty one about 0 (a fresh 1 TiB image: 208 KiB of
// file, all of it metadata, so 0). An fstat that fails tells nothing: the
// layer then counts as fully allocated, the safe answer for copying tools.
func (img *image) Allocated() int64 {
	size := img.Size()
	own := min(img.ownAllocated(), size)
	if img.backing == nil || own >= size {
		return own
	}
	return min(size, own+drivers.AllocatedOf(img.backing))
}

// ownAllocated estimates the data bytes stored in this layer's own files
// (see Allocated), at least 0; the caller clamps it to the disk size.
func (img *image) ownAllocated() int64 {
	if img.extData {
		if img.data == nil {
			return 0 // no data file (NoDataFile)
		}
		a, err := img.data.Allocated()
		if err != nil {
			return img.Size()
		}
		return max(a, 0)
	}
	a, err := img.file.Allocated()
	if err != nil {
		return img.Size()
	}
	cs, cover := img.clusterSize, img.refBlockCover
	meta := img.metaFixed + img.l2Tables.Load()*cs + (a+cover-1)/cover*cs
	return max(a-meta, 0)
}

// initAllocated records what Allocated subtracts as metadata: the tables
// of fixed size, and the number of L2 tables when the L1 table in use was
// read whole. Called at open, after the L1 and snapshot tables are read.
func (img *image) initAllocated() {
	h := img.h
	// QEMU writes the header cluster, the refcount table and every L2
	// table and refcount block whole, but an L1 or snapshot table only
	// as far as its entries go: the rest of its last cluster is a hole of
	// the file. Those are counted in 4 KiB blocks (the usual filesystem
	// block), or clusters if smaller.
	blk := min(img.clusterSize, 4096)
	table := func(bytes int64) int64 { return (bytes + blk - 1) &^ (blk - 1) }
	fixed := img.clusterSize + table(int64(h.L1Size)*8) + int64(h.ReftableClusters)*img.clusterSize + table(img.snapTableBytes)
	for i := range img.snaps {
		fixed += table(int64(img.snaps[i].L1Size) * 8)
	}
	img.metaFixed = fixed
	// A refcount block holds clusterSize*8 >> RefcountOrder refcounts,
	// each for one cluster of the file.
	img.refBlockCover = (img.clusterSize * 8 >> h.RefcountOrder) * img.clusterSize
	var n int64
	for _, e := range img.l1 {
		if e&l1eOffsetMask != 0 {
			n++
		}
	}
	img.l2Tables.Store(n)
}
