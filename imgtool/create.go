package imgtool

import (
	"errors"
	"fmt"
	"io"
	"regexp"
	"strconv"
	"strings"

	"imgfuse/drivers"
	"imgfuse/drivers/qcow2"
	"imgfuse/drivers/raw"
)

// CreateRequest is what `imgfuse create` is asked for, as qemu-img create
// takes it.
type CreateRequest struct {
	Image string
	// Format is "raw", "qcow2", or "" when -f is not given: then raw, as
	// qemu-img create makes it, unless a backing file or an option only
	// qcow2 takes asks for qcow2 (qemu-img refuses those without -f).
	Format string
	Size   int64 // -1: not given
	// Backing and BackingFormat are -b and -F.
	Backing, BackingFormat string
	Options                []string // the -o values, "k=v,..." each
	Quiet                  bool     // -q: print nothing on success
	Unsafe                 bool     // -u: do not open the backing file
}

// Create creates the image r asks for, as qemu-img create does, and
// prints the "Formatting" line on w.
func Create(w io.Writer, r CreateRequest) error {
	if r.Format != "" && r.Format != "qcow2" && r.Format != "raw" {
		return Usagef("invalid -f %q (want qcow2 or raw)", r.Format)
	}
	if WantsOptionHelp(r.Options) {
		return WriteCreateOptions(w, orRaw(r.Format))
	}
	if r.Image == "" {
		return Usagef("create needs IMAGE and optionally SIZE")
	}
	if err := RefuseRemote(r.Image); err != nil {
		return err
	}
	if IsRemote(r.Image) {
		// Remote images are read-only; one may be a backing file (-b).
		return &Error{Op: "create", Path: r.Image, Code: ExitUnsupported, Err: ErrRemoteReadOnly,
			Hint: "create a local image with -b URL to write over it"}
	}
	co, err := ParseCreateOptions(strings.Join(r.Options, ","))
	if err != nil {
		return err
	}
	if r.Format == "" {
		r.Format = "raw"
		if r.Backing != "" || r.BackingFormat != "" || qcow2Only(co) {
			r.Format = "qcow2"
		}
	}
	// qemu-img also takes these as -o options.
	if co.BackingFile != "" {
		if r.Backing != "" && r.Backing != co.BackingFile {
			return Usagef("-b and -o backing_file disagree")
		}
		r.Backing = co.BackingFile
	}
	if co.BackingFormat != "" {
		if r.BackingFormat != "" && r.BackingFormat != co.BackingFormat {
			return Usagef("-F and -o backing_fmt disagree")
		}
		r.BackingFormat = co.BackingFormat
	}
	if co.Size >= 0 {
		if r.Size >= 0 && r.Size != co.Size {
			return Usagef("SIZE and -o size disagree")
		}
		r.Size = co.Size
	}
	if r.Format == "raw" {
		if qcow2Only(co) || r.Backing != "" {
			return Usagef("-b and the -o options other than size and preallocation are for qcow2 images")
		}
		if co.Preallocation == "metadata" {
			return Usagef("-o preallocation=metadata: a raw image has no metadata (want off, falloc or full)")
		}
		if r.Size < 0 {
			return Usagef("create needs a SIZE for a raw image")
		}
		// qemu-img makes whole 512-byte sectors, and says the
		// size as given.
		if err := raw.Create(r.Image, roundSector(r.Size), co.Preallocation); err != nil {
			return createError(r.Image, err)
		}
		if !r.Quiet {
			line := fmt.Sprintf("Formatting '%s', fmt=raw size=%d", r.Image, r.Size)
			if v, ok := givenOptions(r.Options)["preallocation"]; ok {
				line += " preallocation=" + v
			}
			fmt.Fprintln(w, line)
		}
		return nil
	}
	if r.BackingFormat != "" && r.Backing == "" {
		return Usagef("-F needs -b")
	}
	if r.Backing != "" && !r.Unsafe {
		info, err := DescribeImage(PathCombine(r.Image, r.Backing), orAuto(r.BackingFormat))
		if err != nil {
			return fmt.Errorf("backing file: %w", AsBacking(err))
		}
		if r.BackingFormat == "" {
			r.BackingFormat = info.Format
		}
		if r.Size < 0 {
			r.Size = info.VirtualSize
		}
	}
	if r.Size < 0 {
		return Usagef("create needs a SIZE (or -b BACKING to take it from)")
	}
	if r.Unsafe && r.Backing != "" && r.BackingFormat == "" {
		return Usagef("-u needs -F: the backing file is not opened to probe its format")
	}
	co.Size, co.BackingFile, co.BackingFormat = roundSector(r.Size), r.Backing, r.BackingFormat
	if err := qcow2.Create(r.Image, co); err != nil {
		return createError(r.Image, err)
	}
	if co.DataFile != "" {
		dataFile := PathCombine(r.Image, co.DataFile)
		// The data file holds the data clusters: it is preallocated
		// (metadata: the L2 tables map it, its blocks stay holes).
		mode := co.Preallocation
		if mode == "metadata" {
			mode = "off"
		}
		if err := raw.Create(dataFile, co.Size, mode); err != nil {
			return createError(dataFile, err)
		}
	}
	if !r.Quiet {
		shown := co
		shown.Size = r.Size
		fmt.Fprintf(w, "Formatting '%s', fmt=qcow2 %s\n", r.Image, describeCreate(shown, givenOptions(r.Options)))
	}
	return nil
}

// qcow2Only reports whether o holds an option that only qcow2 takes:
// anything but size and preallocation.
func qcow2Only(o qcow2.CreateOptions) bool {
	o.Size, o.Preallocation = -1, ""
	return o != (qcow2.CreateOptions{Size: -1})
}

func orRaw(format string) string {
	if format == "" {
		return "raw"
	}
	return format
}

// createOption is one -o option as `-o help` lists it, in qemu-img's
// words (QEMU's QemuOptsList entries).
type createOption struct{ name, typ, help string }

// createOptions lists, per format, the -o options imgfuse takes, in
// qemu-img's order.
var createOptions = map[string][]createOption{
	"qcow2": {
		{"backing_file", "str", "File name of a base image"},
		{"backing_fmt", "str", "Image format of the base image"},
		{"cluster_size", "size", "qcow2 cluster size"},
		{"compat", "str", "Compatibility level (v2 [0.10] or v3 [1.1])"},
		{"compression_type", "str", "Compression method used for image cluster compression"},
		{"data_file", "str", "File name of an external data file"},
		{"data_file_raw", "bool (on/off)", "The external data file must stay valid as a raw image"},
		{"extended_l2", "bool (on/off)", "Extended L2 tables"},
		{"lazy_refcounts", "bool (on/off)", "Postpone refcount updates"},
		{"preallocation", "str", "Preallocation mode (allowed values: off, metadata, falloc, full)"},
		{"refcount_bits", "num", "Width of a reference count entry in bits"},
		{"size", "size", "Virtual disk size"},
	},
	"raw": {
		{"preallocation", "str", "Preallocation mode (allowed values: off, falloc, full)"},
		{"size", "size", "Virtual disk size"},
	},
}

// WantsOptionHelp reports whether the -o values ask for the option list
// (-o help, or help among other options, as qemu-img takes it).
func WantsOptionHelp(opts []string) bool {
	for _, o := range opts {
		for _, kv := range strings.Split(o, ",") {
			if kv == "help" || kv == "?" {
				return true
			}
		}
	}
	return false
}

// WriteCreateOptions prints the -o options of format as 'qemu-img create
// -f FORMAT -o help' does.
func WriteCreateOptions(w io.Writer, format string) error {
	var b strings.Builder
	fmt.Fprintf(&b, "Supported %s options:\n", format)
	for _, o := range createOptions[format] {
		fmt.Fprintf(&b, "  %-22s - %s\n", o.name+"=<"+o.typ+">", o.help)
	}
	_, err := io.WriteString(w, b.String())
	return err
}

// roundSector rounds size up to whole 512-byte sectors, as qemu-img
// create does.
func roundSector(size int64) int64 { return (size + 511) &^ 511 }

func orAuto(format string) string {
	if format == "" {
		return "auto"
	}
	return format
}

// createError is the failure to create image; an option the driver
// cannot honour is a usage error, as qemu-img makes it.
func createError(image string, err error) error {
	if errors.Is(err, drivers.ErrUnsupported) {
		return UsageError{DriverError("create", image, ExitUsage, err)}
	}
	e := DriverError("create", image, ExitOpen, err)
	if e.Code == ExitLocked {
		e.Hint = lockHint(lockedFile(image, err))
	}
	return e
}

// ParseCreateOptions parses -o's k=v list.
func ParseCreateOptions(s string) (qcow2.CreateOptions, error) {
	o := qcow2.CreateOptions{Size: -1} // -1: no size option
	if s == "" {
		return o, nil
	}
	onOff := func(k, v string) (bool, error) {
		switch v {
		case "on", "true", "yes":
			return true, nil
		case "off", "false", "no":
			return false, nil
		}
		return false, Usagef("-o %s=%q: want on or off", k, v)
	}
	for _, kv := range strings.Split(s, ",") {
		k, v, ok := strings.Cut(kv, "=")
		if !ok {
			return o, Usagef("-o %q: want key=value", kv)
		}
		var err error
		switch k {
		case "cluster_size":
			o.ClusterSize, err = ParseSize(v)
		case "refcount_bits":
			o.RefcountBits, err = strconv.Atoi(v)
		case "compat":
			o.Compat = v
		case "lazy_refcounts":
			o.LazyRefcounts, err = onOff(k, v)
		case "extended_l2":
			o.ExtendedL2, err = onOff(k, v)
		case "compression_type":
			o.CompressionType = v
		case "size":
			o.Size, err = ParseSize(v)
		case "backing_file":
			o.BackingFile = v
		case "backing_fmt":
			o.BackingFormat = v
		case "data_file":
			o.DataFile = v
		case "data_file_raw":
			o.DataFileRaw, err = onOff(k, v)
		case "preallocation":
			switch v {
			case "off", "metadata", "falloc", "full":
				o.Preallocation = v
			default:
				err = fmt.Errorf("want off, metadata, falloc or full")
			}
		default:
			return o, Usagef("-o %s: unknown or unsupported option (supported: cluster_size, refcount_bits, compat, lazy_refcounts, extended_l2, compression_type, preallocation, size, backing_file, backing_fmt, data_file, data_file_raw; -o help lists them)", k)
		}
		if err != nil {
			if _, isUsage := err.(UsageError); isUsage {
				return o, err
			}
			return o, Usagef("-o %s=%s: %v", k, v, err)
		}
	}
	return o, nil
}

// ParseSize parses a size as qemu-img does: a number with an optional
// suffix k, M, G, T, P or E (powers of 1024; b or no suffix for bytes), a
// fraction only with a unit above bytes, or 0xHEX bytes.
func ParseSize(s string) (int64, error) {
	m := sizePattern.FindStringSubmatch(s)
	if m == nil {
		return 0, fmt.Errorf("not a size")
	}
	if m[1] != "" {
		// Hexadecimal: no fraction, no suffix (QEMU's rule).
		n, err := strconv.ParseInt(m[1], 16, 64)
		if err != nil {
			return 0, fmt.Errorf("not a size")
		}
		return n, nil
	}
	mult := int64(1)
	if m[4] != "" {
		mult = int64(1) << (10 * strings.IndexByte("bkmgtpe", strings.ToLower(m[4])[0]))
	}
	if m[3] != "" {
		// A fraction needs a unit above bytes: 1.5 is not a size
		// (1.0 is).
		f, err := strconv.ParseFloat(m[2]+m[3], 64)
		if err != nil || (mult == 1 && f != float64(int64(f))) || f*float64(mult) >= 1<<63 {
			return 0, fmt.Errorf("not a size")
		}
		return int64(f*float64(mult) + 0.5), nil // rounded, as QEMU does
	}
	n, err := strconv.ParseInt(m[2], 10, 64)
	if err != nil || n > (1<<63-1)/mult {
		return 0, fmt.Errorf("not a size")
	}
	return n * mult, nil
}

// sizePattern is what QEMU's qemu_strtosz takes: 0xHEX, or decimal
// digits with an optional fraction and an optional unit suffix.
var sizePattern = regexp.MustCompile(`^(?:0[xX]([0-9a-fA-F]+)|([0-9]+)(\.[0-9]*)?([bBkKmMgGtTpPeE])?)$`)

// describeCreate renders the options as qemu-img create's "Formatting"
// line does.
func describeCreate(o qcow2.CreateOptions, given map[string]string) string {
	cs := o.ClusterSize
	if cs == 0 {
		cs = 65536
	}
	rb := o.RefcountBits
	if rb == 0 {
		rb = 16
	}
	ct := o.CompressionType
	if ct == "" {
		ct = "zlib"
	}
	onoff := map[bool]string{true: "on", false: "off"}
	// qemu-img's order; preallocation, data_file_raw and compat only
	// when given, as given.
	s := fmt.Sprintf("cluster_size=%d extended_l2=%s", cs, onoff[o.ExtendedL2])
	if v, ok := given["preallocation"]; ok {
		s += " preallocation=" + v
	}
	s += fmt.Sprintf(" compression_type=%s size=%d", ct, o.Size)
	if o.BackingFile != "" {
		s += " backing_file=" + o.BackingFile
		if o.BackingFormat != "" {
			s += " backing_fmt=" + o.BackingFormat
		}
	}
	if o.DataFile != "" {
		s += " data_file=" + o.DataFile
	}
	if v, ok := given["data_file_raw"]; ok {
		s += " data_file_raw=" + v
	}
	if v, ok := given["compat"]; ok {
		s += " compat=" + v
	}
	return s + fmt.Sprintf(" lazy_refcounts=%s refcount_bits=%d", onoff[o.LazyRefcounts], rb)
}

// givenOptions maps each -o key to its last value.
func givenOptions(opts []string) map[string]string {
	m := map[string]string{}
	for _, o := range opts {
		for _, kv := range strings.Split(o, ",") {
			if k, v, ok := strings.Cut(kv, "="); ok {
				m[k] = v
			}
		}
	}
	return m
}
