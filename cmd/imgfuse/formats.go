package main

import (
	"fmt"
	"strings"

	"imgfuse/drivers"
	"imgfuse/drivers/foreign"
	"imgfuse/drivers/qcow2"
	"imgfuse/drivers/raw"
)

// imageFormats is every format imgfuse knows, handed to drivers.Open for
// probing the image and its backing files. Order does not matter for
// probing (the highest score wins); it is the order shown in help. The
// foreign formats open nothing: they are there so that a VMDK, VHDX, LUKS
// ... file is refused by name instead of probing as raw
// (drivers/foreign).
func imageFormats() []drivers.Format {
	return append([]drivers.Format{qcow2.Format{}, raw.Format{}}, foreign.Formats()...)
}

// refuseOnly returns f as a format known only to refuse, if it is one.
func refuseOnly(f drivers.Format) (*foreign.Format, bool) {
	ff, ok := f.(*foreign.Format)
	return ff, ok
}

// readableFormats is the names of the formats imgfuse can open: "qcow2",
// "raw".
func readableFormats() []string {
	var names []string
	for _, f := range imageFormats() {
		if _, ok := refuseOnly(f); !ok {
			names = append(names, f.Name())
		}
	}
	return names
}

// formatChoices is the valid values of --format: "auto" and each format
// that can be opened.
func formatChoices() []string {
	return append([]string{"auto"}, readableFormats()...)
}

// checkFormatFlag rejects a --format value that names no format it can
// open. A format known only to refuse is named as such.
func checkFormatFlag(name string) error {
	for _, c := range formatChoices() {
		if name == c {
			return nil
		}
	}
	choices := strings.Join(formatChoices(), ", ")
	if f, err := drivers.Lookup(imageFormats(), name); err == nil {
		if ff, ok := refuseOnly(f); ok {
			return usagef("invalid --format %q: imgfuse recognises %s but cannot read it (want one of: %s)",
				name, ff.What(), choices)
		}
	}
	return usagef("invalid --format %q (want one of: %s)", name, choices)
}

// refusal is the error of a command given image, whose format f imgfuse
// recognises but cannot read: one line naming the image once, the format,
// what imgfuse reads, and the way to the file's own bytes. It matches
// drivers.ErrUnsupported (exit 5) through fe.
func refusal(image string, f *foreign.Format) error {
	fe := &foreign.Error{Format: f}
	if f.Encrypted() {
		// The ciphertext is there for whoever asks for it (cryptsetup
		// can open the mounted disk).
		return fmt.Errorf("open %s: %w (--format raw exposes its encrypted bytes)", image, fe)
	}
	return refusalError{fmt.Sprintf("%s is %s; imgfuse reads %s (-f raw exposes the file's own bytes)",
		image, f.What(), inWords(readableFormats())), fe}
}

// refusalError is a refusal's message with the *foreign.Error it stands
// for, which callers match (never the text).
type refusalError struct {
	msg string
	err *foreign.Error
}

func (e refusalError) Error() string { return e.msg }
func (e refusalError) Unwrap() error { return e.err }

// inWords joins names as a sentence does: "a", "a and b", "a, b and c".
func inWords(names []string) string {
	if len(names) < 2 {
		return strings.Join(names, "")
	}
	return strings.Join(names[:len(names)-1], ", ") + " and " + names[len(names)-1]
}
