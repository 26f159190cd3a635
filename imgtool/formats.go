package imgtool

import (
	"errors"
	"fmt"
	"strings"

	"imgfuse/drivers"
	"imgfuse/drivers/foreign"
	"imgfuse/drivers/qcow2"
	"imgfuse/drivers/raw"
	"imgfuse/drivers/vdi"
	"imgfuse/drivers/vhdx"
	"imgfuse/drivers/vmdk"
	"imgfuse/drivers/vpc"
)

// Formats is every format imgfuse knows, handed to drivers.Open for
// probing the image and its backing files. Order does not matter for
// probing (the highest score wins); it is the order shown in help. The
// foreign formats open nothing: they are there so that a QED, LUKS
// ... file is refused by name instead of probing as raw
// (drivers/foreign).
func Formats() []drivers.Format {
	return append([]drivers.Format{qcow2.Format{}, raw.Format{}, vdi.Format{}, vhdx.Format{}, vmdk.Format{}, vpc.Format{}}, foreign.Formats()...)
}

// refuseOnly returns f as a format known only to refuse, if it is one.
func refuseOnly(f drivers.Format) (*foreign.Format, bool) {
	ff, ok := f.(*foreign.Format)
	return ff, ok
}

// ReadableFormats is the names of the formats imgfuse can open: "qcow2",
// "raw", "vdi", "vhdx", "vmdk", "vpc".
func ReadableFormats() []string {
	var names []string
	for _, f := range Formats() {
		if _, ok := refuseOnly(f); !ok {
			names = append(names, f.Name())
		}
	}
	return names
}

// FormatChoices is the valid values of --format: "auto" and each format
// that can be opened.
func FormatChoices() []string {
	return append([]string{"auto"}, ReadableFormats()...)
}

// CheckFormatFlag rejects a --format value that names no format it can
// open. A format known only to refuse is named as such.
func CheckFormatFlag(name string) error {
	for _, c := range FormatChoices() {
		if name == c {
			return nil
		}
	}
	choices := strings.Join(FormatChoices(), ", ")
	if f, err := drivers.Lookup(Formats(), name); err == nil {
		if ff, ok := refuseOnly(f); ok {
			return Usagef("invalid --format %q: imgfuse recognises %s but cannot read it (want one of: %s)",
				name, ff.What(), choices)
		}
	}
	return Usagef("invalid --format %q (want one of: %s)", name, choices)
}

// refusal is the error of a command given image, whose format f imgfuse
// recognises but cannot read: one line naming the image once, the format,
// what imgfuse reads, and the way to the file's own bytes. It matches
// drivers.ErrUnsupported (exit 5) through its *foreign.Error.
func refusal(image string, f *foreign.Format) error {
	return refusalError{image: image, err: &foreign.Error{Format: f}}
}

// refusalError is a refusal, rendered when printed; callers match it or
// its *foreign.Error, never the text.
type refusalError struct {
	image string
	err   *foreign.Error
	// backing: the image is a backing file, which --format does not
	// reach, so the way to its bytes is not offered.
	backing bool
}

func (e refusalError) Error() string {
	f := e.err.Format
	if f.Encrypted() {
		// LUKS keeps the words it always had. The ciphertext is there
		// for whoever asks for it (cryptsetup can open the mounted disk).
		msg := fmt.Sprintf("open %s: %v", e.image, e.err)
		if !e.backing {
			msg += " (--format raw exposes its encrypted bytes)"
		}
		return msg
	}
	msg := fmt.Sprintf("%s is %s; imgfuse reads %s", e.image, f.What(), InWords(ReadableFormats()))
	if !e.backing {
		msg += " (-f raw exposes the file's own bytes)"
	}
	return msg
}

func (e refusalError) Unwrap() error { return e.err }

// AsBacking words err, the failure to open a backing file, as such: a
// refusal drops the --format hint, which applies to the top image only.
func AsBacking(err error) error {
	var re refusalError
	if errors.As(err, &re) && error(re) == err {
		re.backing = true
		return re
	}
	return err
}

// InWords joins names as a sentence does: "a", "a and b", "a, b and c".
func InWords(names []string) string {
	if len(names) < 2 {
		return strings.Join(names, "")
	}
	return strings.Join(names[:len(names)-1], ", ") + " and " + names[len(names)-1]
}
