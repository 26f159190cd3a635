package imgtool

import (
	"fmt"
	"sort"
	"strings"

	"imgfuse/drivers"
)

// ForceShareHint ends the message of a lock conflict.
const ForceShareHint = "to read it while another process writes it, use --force-share / -U"

// OpenForInspect opens image read-only for info, check and map, with the
// format given (or probed for "auto"). Errors are *Error values naming the
// image once, with the exit codes of errors.go.
func OpenForInspect(image, format string, opts drivers.OpenOptions) (drivers.Driver, drivers.Format, error) {
	if err := CheckFormat(image, format); err != nil {
		return nil, nil, err
	}
	opts.ReadOnly = true
	opts.Formats = Formats()
	d, f, err := drivers.Open(image, format, opts)
	if err != nil {
		return nil, nil, OpenFailed(image, err)
	}
	return d, f, nil
}

// OpenFailed is err, the failure of drivers.Open on image, as an *Error:
// exit ExitOpen unless a driver sentinel says more, and a lock conflict
// ends with who holds the lock and the way out (lockHint): an imgfuse
// server still closing the image after a plain umount is named as such.
func OpenFailed(image string, err error) *Error {
	e := DriverError("open", image, ExitOpen, err)
	if e.Code == ExitLocked {
		e.Hint = lockHint(lockedFile(image, err))
	}
	return e
}

// CheckFormat refuses, before anything is opened, an image that the
// command cannot serve as format asks: a URL (RefuseRemote); one in a format imgfuse recognises
// but cannot read (probed, or named by a backing file's format), with the
// one-line refusal and exit 5; and one whose contents contradict an
// explicit format: a raw file opened as qcow2 is "not a qcow2 image", not
// a corrupt one. (Any file is a valid raw image, so "raw" is never
// refused.) A file that cannot be probed is left to the open, which says
// why.
func CheckFormat(image, format string) error {
	if err := RefuseRemote(image); err != nil {
		return err
	}
	if format == "" || format == "auto" {
		if got, err := drivers.ProbeFile(Formats(), image); err == nil {
			if ff, ok := refuseOnly(got); ok {
				return refusal(image, ff)
			}
		}
		return nil
	}
	want, err := drivers.Lookup(Formats(), format)
	if err != nil {
		return err
	}
	got, err := drivers.ProbeFile(Formats(), image)
	if err != nil {
		return DriverError("open", image, ExitOpen, err)
	}
	switch ff, foreign := refuseOnly(got); {
	case got.Name() == want.Name() || want.Name() == "raw":
	case foreign:
		return Errorf("open", image, ExitOpen, "not a %s image (it is %s)", want.Name(), ff.What())
	default:
		return Errorf("open", image, ExitOpen, "not a %s image (its contents look like %s)", want.Name(), got.Name())
	}
	if ff, ok := refuseOnly(want); ok {
		return refusal(image, ff)
	}
	return nil
}

// ResolveFormat returns the format name to open image with: name itself,
// or the probed one for "auto".
func ResolveFormat(image, name string) (string, error) {
	if name != "" && name != "auto" {
		return name, nil
	}
	f, err := drivers.ProbeFile(Formats(), image)
	if err != nil {
		return "", DriverError("open", image, ExitOpen, err)
	}
	return f.Name(), nil
}

// CheckSnapshot fails, with the snapshots the image has, when image (in
// format) has no internal snapshot with the name or ID snapshot. An image
// that cannot be opened to find out is left to the open, which says why.
func CheckSnapshot(image, format, snapshot string) error {
	d, _, err := drivers.Open(image, format, drivers.OpenOptions{ReadOnly: true, ForceShare: true, NoBacking: true, Formats: Formats()})
	if err != nil {
		return nil
	}
	defer d.Close()
	s, ok := d.(drivers.Snapshotter)
	if !ok {
		return nil
	}
	var have []string
	for _, sn := range s.Snapshots() {
		if sn.Name == snapshot || sn.ID == snapshot {
			return nil
		}
		have = append(have, fmt.Sprintf("%s (id %s)", sn.Name, sn.ID))
	}
	e := Errorf("open", image, ExitOpen, "no such snapshot %q", snapshot)
	e.Hint = "the image has no snapshots"
	if len(have) > 0 {
		sort.Strings(have)
		e.Hint = "the image has: " + strings.Join(have, ", ")
	}
	return e
}
