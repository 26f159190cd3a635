package foreign

import "imgfuse/drivers"

// Format is a format imgfuse recognises and cannot read: it probes as its
// own and opens nothing.
type Format struct {
	// name is qemu-img's name for the format ("vhdx", "vpc"); what names
	// an image of it in a sentence ("a VHDX image"). Immutable.
	name, what string
	// encrypted: the format is an encryption container (LUKS); no
	// driver will read it, and --format raw exposes ciphertext.
	encrypted bool
	probe     func(in drivers.ProbeInput) int
}

var _ drivers.Format = (*Format)(nil)

// formats is every format imgfuse refuses by name, in qemu-img's order of
// `qemu-img --help` (the order only decides a tie between crafted files).
var formats = []*Format{
	{name: "bochs", what: "a Bochs image", probe: probeBochs},
	{name: "cloop", what: "a cloop image", probe: probeCloop},
	{name: "dmg", what: "a DMG image", probe: probeDMG},
	{name: "luks", what: "a LUKS-encrypted image", encrypted: true, probe: probeLUKS},
	{name: "parallels", what: "a Parallels image", probe: probeParallels},
	{name: "qcow", what: "a qcow (version 1) image", probe: probeQcow},
	{name: "qed", what: "a QED image", probe: probeQED},
}

// Formats returns every format imgfuse recognises and cannot read, for the
// caller's list of formats.
func Formats() []drivers.Format {
	out := make([]drivers.Format, len(formats))
	for i, f := range formats {
		out[i] = f
	}
	return out
}

// Name implements drivers.Format: the name qemu-img prints.
func (f *Format) Name() string { return f.name }

// What names an image of the format in a sentence: "a VHDX image".
func (f *Format) What() string { return f.what }

// Encrypted reports whether the format is an encryption container, whose
// raw bytes are ciphertext.
func (f *Format) Encrypted() bool { return f.encrypted }

// Probe implements drivers.Format with QEMU's rules for the format
// (probe.go).
func (f *Format) Probe(in drivers.ProbeInput) int { return f.probe(in) }

// Open implements drivers.Format: it fails, always, with an *Error naming
// the format, without opening the file.
func (f *Format) Open(path string, opts drivers.OpenOptions) (drivers.Driver, error) {
	return nil, &Error{Format: f}
}

// Error is the failure of every Open: the file is in a format imgfuse
// cannot read. It names the format, not the file (the caller does), and
// matches drivers.ErrUnsupported without repeating its text.
type Error struct {
	Format *Format
}

func (e *Error) Error() string { return "is " + e.Format.what + ": not supported" }
func (e *Error) Unwrap() error { return drivers.ErrUnsupported }
