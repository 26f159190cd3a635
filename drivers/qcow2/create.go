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
}

// Create writes a new, empty qcow2 image at path (truncating any file
// there) as qemu-img create does. It must not be called from a coroutine.
// Invalid options fail with an error wrapping drivers.ErrUnsupported.
func Create(path string, o CreateOptions) error {
	h, l1Clusters, l2Tables, err := createHeader(o)
	if err != nil {
		return fmt.Errorf("qcow2: create %s: %w", path, err)
	}
	cs := h.clusterSize()
	hdr, err := marshalHeaderCluster(h)
	if err != nil {
		return fmt.Errorf("qcow2: create %s: %w", path, err)
	}
	// Two clusters: the refcount table (entry 0: the block at cluster
	// 2), then the refcount block.
	tables := make([]byte, 2*cs)
	be.PutUint64(tables, uint64(2*cs))
	for c := int64(0); c < 3+l1Clusters+l2Tables; c++ {
		setRefcount(tables[cs:], h.RefcountOrder, c, 1)
	}
	// The L1 table, and with preallocated metadata its L2 tables.
	var l1 []byte
	if h.L1Size > 0 {
		l1 = make([]byte, int64(h.L1Size)*8)
	}
	var l2 []byte
	if l2Tables > 0 {
		l2 = make([]byte, l2Tables*cs)
		l2Start := int64(h.L1Offset) + l1Clusters*cs
		entryBytes, entries := int64(8), cs/8
		if o.ExtendedL2 {
			entryBytes, entries = 16, cs/16
		}
		for i := range l2Tables {
			be.PutUint64(l1[i*8:], uint64(l2Start+i*cs)|oflagCopied)
		}
		for g := int64(0); g*cs < o.Size; g++ {
			be.PutUint64(l2[(g/entries)*cs+(g%entries)*entryBytes:], uint64(g*cs)|oflagCopied)
		}
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
		if len(l2) > 0 {
			if err := f.Pwrite(l2, int64(h.L1Offset)+l1Clusters*cs); err != nil {
				return err
			}
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

// createHeader validates o as QEMU's qcow2_co_create does and returns the
// header of the new image, the clusters of its L1 table and the number of
// preallocated L2 tables.
func createHeader(o CreateOptions) (*header, int64, int64, error) {
	cs := o.ClusterSize
	if cs == 0 {
		cs = 64 << 10
	}
	if cs < 1<<minClusterBits || cs > 1<<maxClusterBits || cs&(cs-1) != 0 {
		return nil, 0, 0, unsupportedf("cluster size must be a power of two between 512 and 2M, not %d", cs)
	}
	rb := o.RefcountBits
	if rb == 0 {
		rb = 16
	}
	if rb > 64 || rb&(rb-1) != 0 {
		return nil, 0, 0, unsupportedf("refcount_bits must be a power of two up to 64, not %d", rb)
	}
	if o.Size < 0 {
		return nil, 0, 0, unsupportedf("negative size %d", o.Size)
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
		return nil, 0, 0, unsupportedf("compression_type %q (want zlib or zstd)", o.CompressionType)
	}
	if o.LazyRefcounts {
		h.Compatible |= compatLazyRefcounts
	}
	if o.ExtendedL2 {
		if cs < 16<<10 {
			return nil, 0, 0, unsupportedf("extended_l2 needs a cluster size of at least 16k, not %d", cs)
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
			return nil, 0, 0, unsupportedf("lazy_refcounts need compat=1.1")
		case rb != 16:
			return nil, 0, 0, unsupportedf("refcount_bits other than 16 need compat=1.1")
		case o.ExtendedL2:
			return nil, 0, 0, unsupportedf("extended_l2 needs compat=1.1")
		case h.CompressionType != 0:
			return nil, 0, 0, unsupportedf("compression_type zstd needs compat=1.1")
		}
		h.Version, h.RefcountOrder, h.HeaderLength = 2, 4, hdrV2Len
	default:
		return nil, 0, 0, unsupportedf("compat %q (want 0.10 or 1.1)", o.Compat)
	}
	if o.DataFile != "" {
		if h.Version < 3 {
			return nil, 0, 0, unsupportedf("data_file needs compat=1.1")
		}
		h.Incompatible |= incompatDataFile
		h.DataFile = o.DataFile
		if o.DataFileRaw {
			h.Autoclear |= autoclearDataFileRaw
		}
	} else if o.DataFileRaw {
		return nil, 0, 0, unsupportedf("data_file_raw needs data_file")
	}
	if o.BackingFormat != "" && o.BackingFile == "" {
		return nil, 0, 0, unsupportedf("a backing format without a backing file")
	}

	l2Entries := cs / 8
	if o.ExtendedL2 {
		l2Entries = cs / 16
	}
	l1Entries := (o.Size + cs*l2Entries - 1) / (cs * l2Entries)
	if l1Entries*8 > maxL1Bytes {
		return nil, 0, 0, unsupportedf("size %d needs an L1 table larger than %d bytes", o.Size, maxL1Bytes)
	}
	l1Clusters := (l1Entries*8 + cs - 1) / cs
	var l2Tables int64
	if o.DataFileRaw {
		l2Tables = l1Entries
	}
	// The one refcount block must count the header, both tables, L1 and
	// the L2 tables.
	if perBlock := cs * 8 / int64(rb); 3+l1Clusters+l2Tables > perBlock {
		return nil, 0, 0, unsupportedf("size %d with %d-byte clusters and %d-bit refcounts needs more than one refcount block", o.Size, cs, rb)
	}
	h.L1Size = uint32(l1Entries)
	if l1Entries > 0 {
		h.L1Offset = uint64(3 * cs)
	}
	return h, l1Clusters, l2Tables, nil
}
