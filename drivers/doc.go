// Package drivers is the contract between the image formats and everything
// above them: what an open disk image is (Driver), how a run of it reads
// (Extent), the errors a driver reports, how a format is recognised and
// opened (Format, Probe, Open), and the optional capabilities a driver may
// have beyond the contract.
//
// It owns: Driver and Extent; the sentinel errors (ErrCorrupt,
// ErrUnsupported, ErrReadOnly, ErrLocked, ErrNoSpace, ErrUnknownFormat);
// OpenOptions; Format, ProbeInput, Probe, Lookup, ProbeFile and Open; the
// capabilities (DirectReader, Snapshotter, Informer, Checker, LayerMapper,
// FileBacked, Allocator, Damaged, FileLister) with their ...Of helpers; the
// io.ReaderAt adapter (ReaderAt) and qemu-img map's walk down a chain
// (MapAt); what the formats with parent images (VMDK delta links, VHD
// and VHDX differencing disks) share to open them (chain.go: ResolveParent
// and JoinParent, QEMU's resolution of a parent's name; EnterChain and
// OpenParent, which carry the chain in OpenOptions.Chain and refuse a
// loop, across formats too, or a chain deeper than MaxChainDepth) and to
// describe them (layer.go: LayerFiles, LayerDamage, ImageInfo.SetBacking,
// DiskUsage, LayerBlockStatus, and InDisk, the range check of a request). The formats live in its subpackages (drivers/qcow2,
// drivers/raw, drivers/vdi, drivers/vpc, drivers/vhdx, drivers/vmdk,
// drivers/foreign), the conformance suite every driver passes in
// drivers/driverstest.
//
// # One small contract, capabilities by type assertion
//
// Driver has the nine methods every format needs to serve a disk through
// FUSE and nothing else. What only some formats can do is a separate
// interface of one or two methods, found by type assertion as go-fuse
// finds a node's operations (QEMU's BlockDriver has some sixty function
// pointers, most of them NULL in most drivers): a caller asks
// d.(drivers.Checker) or calls DamageOf(d), and a format that adds a
// capability changes nothing for the others. Formats assert their
// capabilities at compile time (var _ drivers.Checker = (*image)(nil)).
//
// # No format is imported here
//
// The list of formats is assembled above the drivers (cmd/imgfuse) and
// handed down: to Probe, Lookup and Open as an argument, to a format's
// Open in OpenOptions.Formats so that qcow2 can open its backing files in
// any format. No format registers itself in an init(), and this package
// never imports one (tests/lint_test.go enforces both), so there is no
// import cycle and no hidden global list; a test chooses its formats.
// Nor does it import go-fuse: a driver knows nothing of how its disk is
// served.
//
// # Probing
//
// Probe gives every format the same ProbeInput: the first ProbeSize (512)
// bytes of the file, as QEMU's probes see them, its last 512 bytes (a
// fixed VHD has only a footer) and its name. Each format answers with a
// score (100 for a magic number, 2 for a weak sign, 1 for raw's last
// resort); the highest wins, the first listed on a tie. A raw image opened
// by probing keeps its first and last sectors from turning into another
// format (OpenOptions.Probed, CVE-2008-2004), which is why the formats
// that imgfuse only recognises in order to refuse them are in the list
// too (drivers/foreign).
//
// # Errors
//
// Drivers wrap the sentinels with context, one prefix per layer, the image
// named once: fmt.Errorf("qcow2: %s: L2 table at %#x: %w", path, off,
// drivers.ErrCorrupt). Callers decide with errors.Is and errors.As, never
// by the text: fusefs maps the sentinels to errnos in one place, the
// command line to exit codes. Open adds ErrLocked to an aio.LockError;
// DamageError names the file of a chain that a read-only open found
// damaged.
//
// # Concurrency
//
// A method takes co *coroutine.Co first if and only if it may yield, so
// the compiler keeps code that may wait inside a coroutine. A Driver is
// used by many coroutines at once, on every event loop, and serialises
// internally what it must (each driver's doc gives its lock order); the
// caller keeps requests in range and, after Close, sends none. Open,
// ProbeFile, Format.Open, Checker.Check and ReaderAt block the calling
// thread and must not be called from a coroutine. This package holds no
// state and no lock of its own.
package drivers
