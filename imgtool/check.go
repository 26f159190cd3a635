package imgtool

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"time"

	"github.com/schollz/progressbar/v3"
	"golang.org/x/term"

	"imgfuse/drivers"
	"imgfuse/drivers/foreign"
)

// progressMinSize is the virtual size from which check shows a progress
// bar on a terminal: smaller images are checked in well under a second.
const progressMinSize = 4 << 30

// qemuCheck is qemu-img check's JSON (QEMU's ImageCheck): the optional
// counts are left out when zero, as qemu-img leaves them out.
type qemuCheck struct {
	Filename           string `json:"filename"`
	Format             string `json:"format"`
	CheckErrors        int    `json:"check-errors"`
	ImageEndOffset     int64  `json:"image-end-offset,omitempty"`
	Corruptions        int    `json:"corruptions,omitempty"`
	Leaks              int    `json:"leaks,omitempty"`
	CorruptionsFixed   int    `json:"corruptions-fixed,omitempty"`
	LeaksFixed         int    `json:"leaks-fixed,omitempty"`
	TotalClusters      int64  `json:"total-clusters,omitempty"`
	AllocatedClusters  int64  `json:"allocated-clusters,omitempty"`
	FragmentedClusters int64  `json:"fragmented-clusters,omitempty"`
	CompressedClusters int64  `json:"compressed-clusters,omitempty"`
}

// Check checks (or, with mode, repairs) image as qemu-img check does,
// printing its report on stdout and the problems on stderr. The error
// carries the exit code.
func Check(stdout, stderr io.Writer, image, format string, mode drivers.CheckMode, forceShare, jsonOut bool) error {
	opts := drivers.OpenOptions{ForceShare: forceShare, NoBacking: true}
	var d drivers.Driver
	var f drivers.Format
	var err error
	if mode == drivers.CheckOnly {
		d, f, err = OpenForInspect(image, format, opts)
	} else {
		d, f, err = openForRepair(image, format, opts)
		if errors.Is(err, drivers.ErrUnsupported) {
			// An image its driver opens read-only only (a
			// streamOptimized VMDK) cannot be repaired: qemu-img
			// check -r exits 63 for it, as for a format without
			// checks.
			if d2, _, err2 := OpenForInspect(image, format, opts); err2 == nil {
				d2.Close()
				return ExitStatus{CheckUnsupported, err}
			}
		}
	}
	if err != nil {
		// An image in a format imgfuse cannot read is refused as by
		// every other command (exit 5): there was nothing to check,
		// which is not a check that failed.
		if fe := (*foreign.Error)(nil); errors.As(err, &fe) || errors.Is(err, ErrRemote) {
			return ExitStatus{ExitUnsupported, err}
		}
		return ExitStatus{CheckFailed, err}
	}
	defer d.Close()
	c, ok := d.(drivers.Checker)
	if !ok {
		return ExitStatus{CheckUnsupported, Errorf("check", image, 0, "the %s format does not support checks", f.Name())}
	}
	var progress func(done, total int64)
	if file, ok := stderr.(*os.File); ok && term.IsTerminal(int(file.Fd())) && d.Size() >= progressMinSize {
		bar := progressbar.NewOptions64(1000, progressbar.OptionSetWriter(stderr),
			progressbar.OptionSetDescription("checking"), progressbar.OptionClearOnFinish(),
			progressbar.OptionThrottle(100*time.Millisecond))
		progress = func(done, total int64) { _ = bar.Set64(done * 1000 / max(total, 1)) }
		defer bar.Finish()
	}
	res, cerr := c.Check(mode, progress)
	for _, m := range res.Messages {
		fmt.Fprintln(stderr, m)
	}
	if cerr != nil {
		if mode != drivers.CheckOnly && errors.Is(cerr, drivers.ErrUnsupported) {
			// A format that checks but cannot repair (VDI, VMDK):
			// qemu-img check -r exits 63 for it, as for a format
			// without checks.
			return ExitStatus{CheckUnsupported, DriverError("check", image, 0, cerr)}
		}
		return ExitStatus{CheckFailed, DriverError("check", image, 0, cerr)}
	}
	q := qemuCheck{
		Filename: image, Format: f.Name(), CheckErrors: res.CheckErrors,
		ImageEndOffset: res.ImageEndOffset, Corruptions: res.Corruptions, Leaks: res.Leaks,
		CorruptionsFixed: res.CorruptionsFixed, LeaksFixed: res.LeaksFixed,
		TotalClusters: res.TotalClusters, AllocatedClusters: res.AllocatedClusters,
		FragmentedClusters: res.FragmentedClusters, CompressedClusters: res.CompressedClusters,
	}
	if jsonOut {
		b, err := json.MarshalIndent(q, "", "    ")
		if err != nil {
			return err
		}
		if _, err := stdout.Write(append(b, '\n')); err != nil {
			return err
		}
	} else if err := writeCheckHuman(stdout, q); err != nil {
		return err
	}
	switch {
	case res.CheckErrors > 0:
		return ExitStatus{Code: CheckFailed}
	case res.Corruptions > 0:
		return ExitStatus{Code: CheckCorrupt}
	case res.Leaks > 0:
		return ExitStatus{Code: CheckLeaks}
	}
	return nil
}

// openForRepair opens image read-write, without its backing file.
func openForRepair(image, format string, opts drivers.OpenOptions) (drivers.Driver, drivers.Format, error) {
	if err := CheckFormat(image, format); err != nil {
		return nil, nil, err
	}
	opts.Formats = Formats()
	opts.Repair = true
	d, f, err := drivers.Open(image, format, opts)
	if err != nil {
		return nil, nil, OpenFailed(image, err)
	}
	return d, f, nil
}

// writeCheckHuman prints a check result as qemu-img check does.
func writeCheckHuman(w io.Writer, c qemuCheck) error {
	var out []byte
	p := func(format string, args ...any) { out = fmt.Appendf(out, format, args...) }
	if c.CorruptionsFixed != 0 || c.LeaksFixed != 0 {
		p("The following inconsistencies were found and repaired:\n\n    %d leaked clusters\n    %d corruptions\n\nDouble checking the fixed image now...\n",
			c.LeaksFixed, c.CorruptionsFixed)
	}
	if c.Corruptions == 0 && c.Leaks == 0 && c.CheckErrors == 0 {
		p("No errors were found on the image.\n")
	} else {
		if c.Corruptions != 0 {
			p("\n%d errors were found on the image.\nData may be corrupted, or further writes to the image may corrupt it.\n", c.Corruptions)
		}
		if c.Leaks != 0 {
			p("\n%d leaked clusters were found on the image.\nThis means waste of disk space, but no harm to data.\n", c.Leaks)
		}
		if c.CheckErrors != 0 {
			p("\n%d internal errors have occurred during the check.\n", c.CheckErrors)
		}
	}
	if c.TotalClusters != 0 && c.AllocatedClusters != 0 {
		p("%d/%d = %0.2f%% allocated, %0.2f%% fragmented, %0.2f%% compressed clusters\n",
			c.AllocatedClusters, c.TotalClusters,
			float64(c.AllocatedClusters)*100/float64(c.TotalClusters),
			float64(c.FragmentedClusters)*100/float64(c.AllocatedClusters),
			float64(c.CompressedClusters)*100/float64(c.AllocatedClusters))
	}
	if c.ImageEndOffset != 0 {
		p("Image end offset: %d\n", c.ImageEndOffset)
	}
	_, err := w.Write(out)
	return err
}
