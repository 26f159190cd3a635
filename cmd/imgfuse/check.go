package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"time"

	"github.com/schollz/progressbar/v3"
	"github.com/spf13/cobra"
	"golang.org/x/term"

	"imgfuse/drivers"
	"imgfuse/drivers/foreign"
)

// Exit codes of `imgfuse check`: qemu-img check's.
const (
	checkExitClean       = 0  // no corruption, no leak
	checkExitFailed      = 1  // the check could not be run (open error, I/O error, bad command line); 5 (exitUnsupported) for a format imgfuse cannot read
	checkExitCorrupt     = 2  // corruptions (perhaps leaks too)
	checkExitLeaks       = 3  // leaks only
	checkExitUnsupported = 63 // the format has nothing to check (raw)
)

// progressMinSize is the virtual size from which check shows a progress
// bar on a terminal: smaller images are checked in well under a second.
const progressMinSize = 4 << 30

func newCheckCmd(stdout, stderr io.Writer) *cobra.Command {
	var format, output, repair string
	var forceShare bool
	cmd := &cobra.Command{
		Use:   "check [flags] IMAGE",
		Short: "Check an image's consistency (and repair it), as qemu-img check does",
		Long: `Check the refcounts and tables of a qcow2 IMAGE: clusters whose refcount is
below their references are corruptions (the space could be handed out twice),
clusters whose refcount exceeds them are leaks (space lost, nothing else).
The output, human or --output=json, is qemu-img check's; problems are listed
on stderr. Backing files are not opened.

-r leaks lowers leaked refcounts; -r all also raises refcounts that are too
low, rebuilds a damaged refcount structure and fixes COPIED flags. The image
is then checked again and that result reported. Repairs open the image
read-write (and take its locks); a check alone opens it read-only, and -U
skips the locks.

A raw or VHD (vpc) image has nothing to check: like qemu-img, check says so
and exits 63. A VDI image is checked as qemu-img checks it (its block map);
repairing one is refused. An image in a format imgfuse recognises but cannot
read (VMDK, VHDX, ...) is refused by name with exit 5, as by the other
commands.
On a terminal, images of 4 GiB and more show a progress bar on stderr.

Exit codes (qemu-img check's): 0 clean, 1 the check failed (cannot open, I/O
error, usage error), 2 corruptions, 3 leaks only, 63 format without checks;
and imgfuse's 5 for a format it cannot read.`,
		Args: exactArgs("IMAGE"),
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := checkFormatFlag(format); err != nil {
				return err
			}
			jsonOut, err := outputFlag(output, false)
			if err != nil {
				return err
			}
			mode := drivers.CheckOnly
			switch repair {
			case "":
			case "leaks":
				mode = drivers.RepairLeaks
			case "all":
				mode = drivers.RepairAll
			default:
				return usagef("invalid -r %q (want leaks or all)", repair)
			}
			if forceShare && mode != drivers.CheckOnly {
				return usagef("-U (--force-share) cannot be used with -r: a repair writes the image")
			}
			return runCheck(stdout, stderr, args[0], format, mode, forceShare, jsonOut)
		},
	}
	cmd.Flags().StringVar(&output, "output", "human", "output format: human|json")
	cmd.Flags().StringVarP(&repair, "repair", "r", "", "repair `leaks` or `all` errors")
	cmd.Flags().BoolVarP(&forceShare, "force-share", "U", false, "take no image locks (check only)")
	addFormatFlag(cmd, &format)
	return cmd
}

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

func runCheck(stdout, stderr io.Writer, image, format string, mode drivers.CheckMode, forceShare, jsonOut bool) error {
	opts := drivers.OpenOptions{ForceShare: forceShare, NoBacking: true}
	var d drivers.Driver
	var f drivers.Format
	var err error
	if mode == drivers.CheckOnly {
		d, f, err = openForInspect(image, format, opts)
	} else {
		d, f, err = openForRepair(image, format, opts)
	}
	if err != nil {
		fmt.Fprintf(stderr, "imgfuse: %v\n", err)
		// An image in a format imgfuse cannot read is refused as by
		// every other command (exit 5): there was nothing to check,
		// which is not a check that failed.
		if fe := (*foreign.Error)(nil); errors.As(err, &fe) {
			return exitError{exitUnsupported}
		}
		return exitError{checkExitFailed}
	}
	defer d.Close()
	c, ok := d.(drivers.Checker)
	if !ok {
		fmt.Fprintf(stderr, "imgfuse: check %s: the %s format does not support checks\n", image, f.Name())
		return exitError{checkExitUnsupported}
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
		fmt.Fprintf(stderr, "imgfuse: check %s: %v\n", image, trimPathError(cerr, image))
		return exitError{checkExitFailed}
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
		return exitError{checkExitFailed}
	case res.Corruptions > 0:
		return exitError{checkExitCorrupt}
	case res.Leaks > 0:
		return exitError{checkExitLeaks}
	}
	return nil
}

// openForRepair opens image read-write, without its backing file.
func openForRepair(image, format string, opts drivers.OpenOptions) (drivers.Driver, drivers.Format, error) {
	if err := checkFormat(image, format); err != nil {
		return nil, nil, err
	}
	opts.Formats = imageFormats()
	opts.Repair = true
	d, f, err := drivers.Open(image, format, opts)
	if err != nil {
		return nil, nil, openError(describeOpenError(image, err))
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
