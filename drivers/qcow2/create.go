package qcow2

import (
	"errors"
	"fmt"
	"math/bits"
	"os"

	"imgfuse/aio"
	"imgfuse/drivers"
)

// Creating images (`imgfuse create`, qemu-img create -f qcow2).
//
// The layout is QEMU's (qcow2_co_create with preallocation=off), so that
// qemu-img info describes the result exactly as it describes the image
// qemu-img create makes, and the two files are byte for byte the same:
// cluster 0 the header (with QEMU's extensions: backing format, feature
// table), cluster 1 the refcount table (one cluster, entry 0 pointing at
// cluster 2), cluster 2 the refcount block, then the L1 table from cluster
// 3, written for exactly its entries (the file ends there). Clusters 0 to
// the end of the L1 table have refcount 1; nothing else is allocated.
//
// With preallocation (qemu-img's preallocation=metadata|falloc|full) every
// guest cluster is mapped: the L2 tables follow the L1 table, then the
// data clusters in guest order, each with refcount 1, and the refcount
// table and blocks grow to count them all (the table from cluster 1, the
// blocks right after it). QEMU reaches the same allocation by growing an
// empty image, so its tables sit elsewhere: qemu-img info, check and map
// agree with its image, the bytes do not (for images small enough that
// one refcount block and one L2 table cover everything, with
// preallocation=metadata, they are the same too). metadata leaves the
// data clusters a hole of the file, falloc reserves them with
// fallocate(2), full writes their zeros.

// CreateOptions are qemu-img create's qcow2 options (-o ...).
type CreateOptions struct {
	// Size is the virtual size in bytes.
	Size int64
	// ClusterSize is a power of two from 512 to 2 MiB; 0 means 64 KiB.
	ClusterSize int64
	// RefcountBits is a power of two from 1 to 64; 0 means 16.
	RefcountBits int
	// Compat is "1.1" (version 3, the default when "") or "0.10"
	// (version 2).
	Compat string
	// LazyRefcounts and ExtendedL2 set those features (version 3 only).
	LazyRefcounts, ExtendedL2 bool
	// CompressionType is "zlib" (the default when "") or "zstd"
	// (version 3 only).
	CompressionType string
	// BackingFile and BackingFormat are written as given ("" for none).
	BackingFile, BackingFormat string
	// DataFile names an external data file (version 3 only), written as
	// given; the caller creates the file. DataFileRaw marks it a raw
	// image of the disk, which QEMU lays out with preallocated metadata:
	// every guest cluster mapped to the same offset of the data file.
	DataFile    string
	DataFileRaw bool
	// Preallocation is "" or "off" (nothing but the tables),
	// "metadata", "falloc" or "full" (see above). With a data file the
	// L2 tables map every cluster to its offset in that file (as with
	// DataFileRaw); the caller preallocates the data file itself.
	Preallocation string
}

// layout is where Create puts an image's clusters: the header (cluster
// 0), the refcount table from cluster 1, the refcount blocks, the L1
// table, the L2 tables and the data clusters, in that order, each run
// right after the previous one.
type layout struct {
	reftableClusters, refblocks int64
	l1Clusters, l2Tables        int64
	// dataClusters is the guest clusters stored in the image file (with
	// preallocation and no data file), 0 otherwise.
	dataClusters int64
}

func (l layout) l1Start() int64     { return 1 + l.reftableClusters + l.refblocks }
func (l layout) l2Start() int64     { return l.l1Start() + l.l1Clusters }
func (l layout) dataStart() int64   { return l.l2Start() + l.l2Tables }
func (l layout) clusters() int64    { return l.dataStart() + l.dataClusters }
func preallocated(mode string) bool { return mode != "" && mode != "off" }

// Create writes a new, empty qcow2 image at path (truncating any file
// there) as qemu-img create does. It must not be called from a coroutine.
// Invalid options fail with an error wrapping drivers.ErrUnsupported.
func Create(path string, o CreateOptions) error {
	h, l, err := createHeader(o)
	if err != nil {
		return fmt.Errorf("qcow2: create %s: %w", path, err)
	}
	cs := h.clusterSize()
	hdr, err := marshalHeaderCluster(h)
	if err != nil {
		return fmt.Errorf("qcow2: create %s: %w", path, err)
	}
	// The refcount table (entry i: block i), then the refcount blocks,
	// which count every cluster of the layout once: blocks are
	// contiguous, so cluster c is entry c of their concatenation.
	tables := make([]byte, (l.reftableClusters+l.refblocks)*cs)
	for i := range l.refblocks {
		be.PutUint64(tables[i*8:], uint64((1+l.reftableClusters+i)*cs))
	}
	for c := range l.clusters() {
		setRefcount(tables[l.reftableClusters*cs:], h.RefcountOrder, c, 1)
	}
	// The L1 table, and with preallocated metadata its L2 tables.
	var l1 []byte
	if h.L1Size > 0 {
		l1 = make([]byte, int64(h.L1Size)*8)
	}
	for i := range l.l2Tables {
		be.PutUint64(l1[i*8:], uint64((l.l2Start()+i)*cs)|oflagCopied)
	}
	// l2Table returns L2 table i: guest cluster g lives at cluster
	// dataStart+g of the image file, or at offset g*cs of the data file.
	entryBytes, entries := int64(8), cs/8
	if o.ExtendedL2 {
		entryBytes, entries = 16, cs/16
	}
	l2 := make([]byte, cs)
	l2Table := func(i int64) []byte {
		clear(l2)
		base := int64(0)
		if l.dataClusters > 0 {
			base = l.dataStart() * cs
		}
		for j := int64(0); j < entries; j++ {
			g := i*entries + j
			if g*cs >= o.Size {
				break
			}
			be.PutUint64(l2[j*entryBytes:], uint64(base+g*cs)|oflagCopied)
		}
		return l2
	}

	// Create the file if need be, but truncate only once its image locks
	// are held: an image in use elsewhere must not be destroyed.
	fd, err := os.OpenFile(path, os.O_WRONLY|os.O_CREATE, 0o644)
	if err != nil {
		return fmt.Errorf("qcow2: create: %w", err)
	}
	fd.Close()
	f, err := aio.Open(path, aio.Options{NoDirectIO: true})
	if err != nil {
		var le *aio.LockError
		if errors.As(err, &le) {
			return fmt.Errorf("qcow2: create: %w (%w)", err, drivers.ErrLocked)
		}
		return fmt.Errorf("qcow2: create: %w", err)
	}
	werr := func() error {
		if err := f.Truncate(0); err != nil {
			return err
		}
		if err := f.Pwrite(hdr, 0); err != nil {
			return err
		}
		if err := f.Pwrite(tables, cs); err != nil {
			return err
		}
		if h.L1Size > 0 {
			if err := f.Pwrite(l1, int64(h.L1Offset)); err != nil {
				return err
			}
		}
		for i := range l.l2Tables {
			if err := f.Pwrite(l2Table(i), (l.l2Start()+i)*cs); err != nil {
				return err
			}
		}
		if err := preallocateData(f, o.Preallocation, l.dataStart()*cs, l.dataClusters*cs); err != nil {
			return err
		}
		return f.Fdatasync()
	}()
	cerr := f.Close()
	if werr == nil {
		werr = cerr
	}
	if werr != nil {
		return fmt.Errorf("qcow2: create %s: %w", path, werr)
	}
	return nil
}

// preallocateData makes the n bytes at off of f, the data clusters, what
// mode asks: a hole the file ends with (metadata), reserved blocks
// (falloc) or written zeros (full).
func preallocateData(f *aio.File, mode string, off, n int64) error {
	if n == 0 {
		return nil
	}
	switch mode {
	case "metadata":
		return f.Truncate(off + n)
	case "falloc":
		return f.Fallocate(0, off, n)
	}
	zeros := make([]byte, min(n, 1<<20))
	for done := int64(0); done < n; {
		k := min(n-done, int64(len(zeros)))
		if err := f.Pwrite(zeros[:k], off+done); err != nil {
			return err
		}
		done += k
	}
	return nil
}

// createHeader validates o as QEMU's qcow2_co_create does and returns the
// header of the new image and where its clusters go.
func createHeader(o CreateOptions) (*header, layout, error) {
	cs := o.ClusterSize
	if cs == 0 {
		cs = 64 << 10
	}
	if cs < 1<<minClusterBits || cs > 1<<maxClusterBits || cs&(cs-1) != 0 {
		return nil, layout{}, unsupportedf("cluster size must be a power of two between 512 and 2M, not %d", cs)
	}
	rb := o.RefcountBits
	if rb == 0 {
		rb = 16
	}
	if rb > 64 || rb&(rb-1) != 0 {
		return nil, layout{}, unsupportedf("refcount_bits must be a power of two up to 64, not %d", rb)
	}
	if o.Size < 0 {
		return nil, layout{}, unsupportedf("negative size %d", o.Size)
	}
	h := &header{
		Version:          3,
		ClusterBits:      uint32(bits.TrailingZeros64(uint64(cs))),
		Size:             uint64(o.Size),
		ReftableOffset:   uint64(cs),
		ReftableClusters: 1,
		RefcountOrder:    uint32(bits.TrailingZeros(uint(rb))),
		HeaderLength:     hdrV3DefaultLen,
		BackingFile:      o.BackingFile,
		BackingFormat:    o.BackingFormat,
	}
	switch o.CompressionType {
	case "", "zlib":
	case "zstd":
		h.CompressionType = compressionZstd
		h.Incompatible |= incompatCompression
	default:
		return nil, layout{}, unsupportedf("compression_type %q (want zlib or zstd)", o.CompressionType)
	}
	if o.LazyRefcounts {
		h.Compatible |= compatLazyRefcounts
	}
	if o.ExtendedL2 {
		if cs < 16<<10 {
			return nil, layout{}, unsupportedf("extended_l2 needs a cluster size of at least 16k, not %d", cs)
		}
		h.Incompatible |= incompatExtendedL2
	}
	switch o.Compat {
	case "", "1.1", "v3":
		// QEMU leaves the feature table (384 bytes) out of clusters of
		// 4 KiB and less, to keep room for the backing file name.
		if cs > 4096 {
			h.FeatureNames = qemuFeatureNames()
		}
	case "0.10", "v2":
		switch {
		case o.LazyRefcounts:
			return nil, layout{}, unsupportedf("lazy_refcounts need compat=1.1")
		case rb != 16:
			return nil, layout{}, unsupportedf("refcount_bits other than 16 need compat=1.1")
		case o.ExtendedL2:
			return nil, layout{}, unsupportedf("extended_l2 needs compat=1.1")
		case h.CompressionType != 0:
			return nil, layout{}, unsupportedf("compression_type zstd needs compat=1.1")
		}
		h.Version, h.RefcountOrder, h.HeaderLength = 2, 4, hdrV2Len
	default:
		return nil, layout{}, unsupportedf("compat %q (want 0.10 or 1.1)", o.Compat)
	}
	if o.DataFile != "" {
		if h.Version < 3 {
			return nil, layout{}, unsupportedf("data_file needs compat=1.1")
		}
		h.Incompatible |= incompatDataFile
		h.DataFile = o.DataFile
		if o.DataFileRaw {
			h.Autoclear |= autoclearDataFileRaw
		}
	} else if o.DataFileRaw {
		return nil, layout{}, unsupportedf("data_file_raw needs data_file")
	}
	if o.BackingFormat != "" && o.BackingFile == "" {
		return nil, layout{}, unsupportedf("a backing format without a backing file")
	}

	l2Entries := cs / 8
	if o.ExtendedL2 {
		l2Entries = cs / 16
	}
	l1Entries := (o.Size + cs*l2Entries - 1) / (cs * l2Entries)
	if l1Entries*8 > maxL1Bytes {
		return nil, layout{}, unsupportedf("size %d needs an L1 table larger than %d bytes", o.Size, maxL1Bytes)
	}
	switch o.Preallocation {
	case "", "off", "metadata", "falloc", "full":
	default:
		return nil, layout{}, unsupportedf("preallocation %q (want off, metadata, falloc or full)", o.Preallocation)
	}
	prealloc := preallocated(o.Preallocation)
	if prealloc && o.BackingFile != "" && !o.ExtendedL2 {
		// QEMU's rule: a preallocated cluster would hide the backing
		// file's data unless subclusters can say it is unallocated.
		return nil, layout{}, unsupportedf("a backing file and preallocation need extended_l2=on")
	}
	l := layout{l1Clusters: (l1Entries*8 + cs - 1) / cs}
	if o.DataFileRaw || prealloc {
		l.l2Tables = l1Entries
	}
	if prealloc && o.DataFile == "" {
		l.dataClusters = (o.Size + cs - 1) / cs
	}
	// The refcount blocks count every cluster, themselves and the table
	// included: grow both until they do.
	perBlock := cs * 8 / int64(rb)
	l.reftableClusters, l.refblocks = 1, 1
	for {
		blocks := (l.clusters() + perBlock - 1) / perBlock
		table := (blocks*8 + cs - 1) / cs
		if blocks == l.refblocks && table == l.reftableClusters {
			break
		}
		l.refblocks, l.reftableClusters = blocks, table
	}
	if l.reftableClusters*cs > maxReftableBytes {
		return nil, layout{}, unsupportedf("size %d with %d-byte clusters and %d-bit refcounts needs a refcount table larger than %d bytes", o.Size, cs, rb, maxReftableBytes)
	}
	h.ReftableClusters = uint32(l.reftableClusters)
	h.L1Size = uint32(l1Entries)
	if l1Entries > 0 {
		h.L1Offset = uint64(l.l1Start() * cs)
	}
	return h, l, nil
}
