package main

import (
	"errors"
	"fmt"
	"sort"
	"strings"

	"github.com/spf13/cobra"

	"imgfuse/drivers"
)

// addFormatFlag adds --format/-f, as qemu-img spells it.
func addFormatFlag(cmd *cobra.Command, format *string) {
	cmd.Flags().StringVarP(format, "format", "f", "auto", "image format: "+strings.Join(formatChoices(), "|"))
}

// openForInspect opens image read-only for info, check and map, with the
// format given (or probed for "auto"). Errors name the image once and map
// to the exit codes of exit.go.
func openForInspect(image, format string, opts drivers.OpenOptions) (drivers.Driver, drivers.Format, error) {
	if err := checkFormat(image, format); err != nil {
		return nil, nil, err
	}
	opts.ReadOnly = true
	opts.Formats = imageFormats()
	d, f, err := drivers.Open(image, format, opts)
	if err != nil {
		return nil, nil, openError(describeOpenError(image, err))
	}
	return d, f, nil
}

// checkFormat refuses, before anything is opened, an image that the
// command cannot serve as format asks: one in a format imgfuse recognises
// but cannot read (probed, or named by a backing file's format), with the
// one-line refusal and exit 5; and one whose contents contradict an
// explicit format: a raw file opened as qcow2 is "not a qcow2 image", not
// a corrupt one. (Any file is a valid raw image, so "raw" is never
// refused.) A file that cannot be probed is left to the open, which says
// why.
func checkFormat(image, format string) error {
	if format == "" || format == "auto" {
		if got, err := drivers.ProbeFile(imageFormats(), image); err == nil {
			if ff, ok := refuseOnly(got); ok {
				return refusal(image, ff)
			}
		}
		return nil
	}
	want, err := drivers.Lookup(imageFormats(), format)
	if err != nil {
		return err
	}
	got, err := drivers.ProbeFile(imageFormats(), image)
	if err != nil {
		return openError(fmt.Errorf("open %s: %w", image, trimPathError(err, image)))
	}
	switch ff, foreign := refuseOnly(got); {
	case got.Name() == want.Name() || want.Name() == "raw":
	case foreign:
		return openError(fmt.Errorf("open %s: not a %s image (it is %s)", image, want.Name(), ff.What()))
	default:
		return openError(fmt.Errorf("open %s: not a %s image (its contents look like %s)", image, want.Name(), got.Name()))
	}
	if ff, ok := refuseOnly(want); ok {
		return refusal(image, ff)
	}
	return nil
}

// describeOpenError turns a driver's open error into one line that names
// the image once: "open IMAGE: REASON". A missing snapshot lists the ones
// that exist; a lock conflict suggests --force-share.
func describeOpenError(image string, err error) error {
	msg := trimPathError(err, image).Error()
	if strings.Contains(msg, "no such snapshot") {
		if names := snapshotNames(image); names != "" {
			msg += " (the image has: " + names + ")"
		} else {
			msg += " (the image has no snapshots)"
		}
	}
	if errors.Is(err, drivers.ErrLocked) {
		msg += forceShareHint
	}
	return fmt.Errorf("open %s: %s%w", image, msg, sentinelOf(err))
}

// forceShareHint ends the message of a lock conflict.
const forceShareHint = " (to read it while another process writes it, use --force-share / -U)"

// sentinelOf keeps err's sentinel matchable (for the exit code) after its
// message was rewritten: it returns an error that prints as nothing and
// wraps err.
func sentinelOf(err error) error { return silentError{err} }

type silentError struct{ err error }

func (silentError) Error() string   { return "" }
func (e silentError) Unwrap() error { return e.err }

// trimPathError drops the driver prefixes that repeat the image path
// ("qcow2: /abs/img.qcow2: qcow2: ...") so that the caller names it once.
func trimPathError(err error, image string) error {
	msg := err.Error()
	for _, p := range []string{"open " + image + ": ", "qcow2: " + image + ": ", "raw: " + image + ": ", image + ": "} {
		msg = strings.ReplaceAll(msg, p, "")
	}
	// A lock conflict on the image itself (not on a backing file).
	msg = strings.ReplaceAll(msg, "is another process using the image "+image+"?", "is another process using it?")
	msg = strings.ReplaceAll(msg, "qcow2: qcow2: ", "qcow2: ")
	msg = strings.TrimPrefix(msg, "qcow2: ")
	return errors.New(msg)
}

// snapshotNames lists the image's snapshots as "ID NAME, ...", "" if none
// (or if the image cannot be opened to find out).
func snapshotNames(image string) string {
	d, _, err := drivers.Open(image, "auto", drivers.OpenOptions{ReadOnly: true, ForceShare: true, NoBacking: true, Formats: imageFormats()})
	if err != nil {
		return ""
	}
	defer d.Close()
	s, ok := d.(drivers.Snapshotter)
	if !ok {
		return ""
	}
	var out []string
	for _, sn := range s.Snapshots() {
		out = append(out, fmt.Sprintf("%s (id %s)", sn.Name, sn.ID))
	}
	sort.Strings(out)
	return strings.Join(out, ", ")
}
