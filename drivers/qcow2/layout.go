package qcow2

// On-disk constants (docs: qcow2.txt, "Header" and "Cluster mapping").
const (
	magic = 0x514649fb // "QFI\xfb"

	minClusterBits = 9  // 512 B
	maxClusterBits = 21 // 2 MiB

	// Incompatible feature bits.
	incompatDirty              = 1 << 0
	incompatCorrupt            = 1 << 1
	incompatDataFile           = 1 << 2
	incompatCompression        = 1 << 3
	incompatExtendedL2         = 1 << 4
	incompatKnown       uint64 = 0x1f

	// Compatible feature bits.
	compatLazyRefcounts = 1 << 0

	// Autoclear feature bits.
	autoclearBitmaps     = 1 << 0
	autoclearDataFileRaw = 1 << 1

	// Header extension types.
	extEnd          = 0x00000000
	extBackingFmt   = 0xe2792aca
	extFeatureTable = 0x6803f857
	extBitmaps      = 0x23852875
	extCrypto       = 0x0537be77
	extDataFile     = 0x44415441

	// L1 entry: bits 9-55 the L2 table offset, bit 63 COPIED.
	l1eOffsetMask   = 0x00fffffffffffe00
	l1eReservedMask = 0x7f000000000001ff
	// L2 entry: bit 63 COPIED, bit 62 compressed, bit 0 zero (not with
	// extended L2); standard clusters keep the host offset in bits 9-55.
	oflagCopied      = 1 << 63
	oflagCompressed  = 1 << 62
	oflagZero        = 1 << 0
	l2eOffsetMask    = 0x00fffffffffffe00
	l2eStdReservedMk = 0x3f000000000001fe
	// Reftable entry: bits 9-63 the refcount block offset.
	reftOffsetMask = 0xfffffffffffffe00

	compressionDeflate = 0
	compressionZstd    = 1

	maxL1Bytes        = 32 << 20
	maxReftableBytes  = 8 << 20
	maxSnapshots      = 65536
	maxSnapshotsBytes = 64 << 20
	maxBackingName    = 1023
)

// header is the parsed, validated qcow2 header with its extensions.
type header struct {
	Version          uint32
	BackingOffset    uint64
	BackingSize      uint32
	ClusterBits      uint32
	Size             uint64 // virtual size in bytes
	CryptMethod      uint32
	L1Size           uint32 // entries
	L1Offset         uint64
	ReftableOffset   uint64
	ReftableClusters uint32
	NbSnapshots      uint32
	SnapshotsOffset  uint64

	// v3 fields; for v2 they read as refcount order 4 and header length 72.
	Incompatible    uint64
	Compatible      uint64
	Autoclear       uint64
	RefcountOrder   uint32
	HeaderLength    uint32
	CompressionType uint8
	// ExtraHeader holds header bytes past the fields above, up to
	// HeaderLength, kept so a rewrite preserves them.
	ExtraHeader []byte

	// From the extensions and cluster 0.
	BackingFile   string // "" if none
	BackingFormat string // "" if absent
	DataFile      string // external data file name, "" if none
	// FeatureNames maps (type<<8 | bit) to the name in the feature table.
	FeatureNames map[uint16]string
	// UnknownExts are extensions imgfuse does not interpret, in file
	// order, kept for rewrite.
	UnknownExts []extension
	HasBitmaps  bool
	HasCrypto   bool

	// The bitmaps extension (meaningful only when HasBitmaps), kept so a
	// rewrite can carry it.
	NbBitmaps       uint32
	BitmapDirSize   uint64
	BitmapDirOffset uint64
	// The full-disk-encryption header extension (meaningful only when
	// HasCrypto).
	CryptoOffset uint64
	CryptoLength uint64
}

type extension struct {
	Type uint32
	Data []byte
}

func (h *header) clusterSize() int64 { return 1 << h.ClusterBits }
func (h *header) extendedL2() bool   { return h.Incompatible&incompatExtendedL2 != 0 }
func (h *header) hasDataFile() bool  { return h.Incompatible&incompatDataFile != 0 }

// l2Entries is the number of entries in one L2 table.
func (h *header) l2Entries() int64 {
	if h.extendedL2() {
		return h.clusterSize() / 16
	}
	return h.clusterSize() / 8
}
