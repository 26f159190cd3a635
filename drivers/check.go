package drivers

// CheckMode says what a consistency check may repair (qemu-img check -r).
type CheckMode int

const (
	// CheckOnly repairs nothing; the image may be open read-only.
	CheckOnly CheckMode = iota
	// RepairLeaks lowers refcounts that exceed the references (-r leaks).
	RepairLeaks
	// RepairAll also raises refcounts below the references, rebuilds a
	// damaged refcount structure and fixes COPIED flags (-r all).
	RepairAll
)

// CheckResult is the outcome of a check, counted as QEMU counts its
// BdrvCheckResult. After a repair the counts are those of the check run
// again on the repaired image, and the *Fixed fields say what was fixed.
type CheckResult struct {
	// CheckErrors counts what could not be checked (I/O errors).
	CheckErrors int
	// Corruptions counts errors that can lose data (a refcount below the
	// references, invalid entries); Leaks counts clusters whose refcount
	// exceeds their references (space lost, nothing else).
	Corruptions, Leaks           int
	CorruptionsFixed, LeaksFixed int
	// ImageEndOffset is the end of the last cluster in use.
	ImageEndOffset int64
	// Block statistics of the active disk: clusters of the virtual disk,
	// those allocated (data, compressed, preallocated zero), those not
	// following the previous one in the file, and the compressed ones.
	TotalClusters, AllocatedClusters, FragmentedClusters, CompressedClusters int64
	// Messages describes each problem (a bounded number: qcow2 keeps
	// 65536).
	Messages []string
}

// Checker is implemented by drivers that can check (and repair) the
// consistency of an image. Check must not be called from a coroutine;
// a repair needs the image open read-write. progress, if not nil, is called
// now and then with the work done so far and the total (arbitrary units).
type Checker interface {
	Check(mode CheckMode, progress func(done, total int64)) (CheckResult, error)
}
