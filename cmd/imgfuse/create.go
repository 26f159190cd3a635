package main

import (
	"errors"
	"fmt"
	"io"
	"regexp"
	"strconv"
	"strings"

	"github.com/spf13/cobra"

	"imgfuse/drivers"
	"imgfuse/drivers/qcow2"
	"imgfuse/drivers/raw"
)

func newCreateCmd(stdout io.Writer) *cobra.Command {
	var format, backing, backingFmt string
	var opts []string
	var quiet, unsafe bool
	cmd := &cobra.Command{
		Use:   "create [flags] IMAGE [SIZE]",
		Short: "Create a qcow2 or raw image, as qemu-img create does",
		Long: `Create IMAGE, replacing any file of that name, as 'qemu-img create' does:
qemu-img info describes the result as it describes the image qemu-img
create makes with the same options (a qcow2 image is byte for byte the
same file).

SIZE takes the suffixes k, M, G, T, P, E (powers of 1024; fractions such
as 1.5G, and hexadecimal bytes such as 0x1000, as qemu-img takes them) and
is rounded up to a multiple of 512, as qemu-img rounds it (the Formatting
line says the size as given, as qemu-img's does). With -b the new
image is an overlay whose reads fall through to BACKING; BACKING is opened
(relative to IMAGE's directory) to take SIZE from it when SIZE is not
given and to probe its format when -F is not given; -u skips that (SIZE and
-F are then needed).

-o takes comma-separated qcow2 options:
  cluster_size=SIZE          512 to 2M, a power of two (default 64k)
  refcount_bits=N            1, 2, 4, 8, 16 (default), 32 or 64
  compat=0.10|1.1            qcow2 version 2 or 3 (default 1.1)
  lazy_refcounts=on|off      (compat=1.1)
  extended_l2=on|off         subclusters (compat=1.1, cluster_size >= 16k)
  compression_type=zlib|zstd (zstd: compat=1.1)
  preallocation=off          the only mode imgfuse creates
  data_file=NAME             guest data in the raw file NAME (created; relative
                             to IMAGE's directory), compat=1.1
  data_file_raw=on|off       NAME is a raw image of the disk (metadata preallocated)
  size=SIZE, backing_file=BACKING, backing_fmt=FMT   as SIZE, -b and -F
Raw images (-f raw) take no options and are sparse files.`,
		Example: `  imgfuse create -f qcow2 disk.qcow2 10G
  imgfuse create -f qcow2 -b base.qcow2 -F qcow2 overlay.qcow2   # size from the base
  imgfuse create -f qcow2 -o cluster_size=2M,compression_type=zstd big.qcow2 1T`,
		Args: func(cmd *cobra.Command, args []string) error {
			if len(args) < 1 || len(args) > 2 {
				return usagef("create needs IMAGE and optionally SIZE (got %d arguments)", len(args))
			}
			return nil
		},
		RunE: func(cmd *cobra.Command, args []string) error {
			image := args[0]
			size := int64(-1)
			if len(args) == 2 {
				var err error
				if size, err = parseSize(args[1]); err != nil {
					return usagef("invalid SIZE %q: %v", args[1], err)
				}
			}
			if format != "qcow2" && format != "raw" {
				return usagef("invalid -f %q (want qcow2 or raw)", format)
			}
			co, err := parseCreateOptions(strings.Join(opts, ","))
			if err != nil {
				return err
			}
			// qemu-img also takes these as -o options.
			if co.BackingFile != "" {
				if backing != "" && backing != co.BackingFile {
					return usagef("-b and -o backing_file disagree")
				}
				backing = co.BackingFile
			}
			if co.BackingFormat != "" {
				if backingFmt != "" && backingFmt != co.BackingFormat {
					return usagef("-F and -o backing_fmt disagree")
				}
				backingFmt = co.BackingFormat
			}
			if co.Size >= 0 {
				if size >= 0 && size != co.Size {
					return usagef("SIZE and -o size disagree")
				}
				size = co.Size
			}
			if format == "raw" {
				qcowOnly := co
				qcowOnly.Size, qcowOnly.BackingFile, qcowOnly.BackingFormat = -1, "", ""
				if qcowOnly != (qcow2.CreateOptions{Size: -1}) || backing != "" {
					return usagef("-b and the -o options other than size are for qcow2 images")
				}
				if size < 0 {
					return usagef("create needs a SIZE for a raw image")
				}
				// qemu-img makes whole 512-byte sectors, and says the
				// size as given.
				if err := raw.Create(image, roundSector(size)); err != nil {
					return createError(image, err)
				}
				if !quiet {
					fmt.Fprintf(stdout, "Formatting '%s', fmt=raw size=%d\n", image, size)
				}
				return nil
			}
			if backingFmt != "" && backing == "" {
				return usagef("-F needs -b")
			}
			if backing != "" && !unsafe {
				info, err := describeImage(pathCombine(image, backing), orAuto(backingFmt))
				if err != nil {
					return fmt.Errorf("backing file: %w", asBacking(err))
				}
				if backingFmt == "" {
					backingFmt = info.Format
				}
				if size < 0 {
					size = info.VirtualSize
				}
			}
			if size < 0 {
				return usagef("create needs a SIZE (or -b BACKING to take it from)")
			}
			if unsafe && backing != "" && backingFmt == "" {
				return usagef("-u needs -F: the backing file is not opened to probe its format")
			}
			co.Size, co.BackingFile, co.BackingFormat = roundSector(size), backing, backingFmt
			if err := qcow2.Create(image, co); err != nil {
				return createError(image, err)
			}
			if co.DataFile != "" {
				dataFile := pathCombine(image, co.DataFile)
				if err := raw.Create(dataFile, co.Size); err != nil {
					return createError(dataFile, err)
				}
			}
			if !quiet {
				shown := co
				shown.Size = size
				fmt.Fprintf(stdout, "Formatting '%s', fmt=qcow2 %s\n", image, describeCreate(shown, givenOptions(opts)))
			}
			return nil
		},
	}
	f := cmd.Flags()
	f.StringVarP(&format, "format", "f", "qcow2", "image format: qcow2|raw")
	f.StringVarP(&backing, "backing", "b", "", "backing file `BACKING` (qcow2), relative to IMAGE's directory unless absolute")
	f.StringVarP(&backingFmt, "backing-format", "F", "", "format of the backing file (probed if not given)")
	f.StringArrayVarP(&opts, "options", "o", nil, "qcow2 options `k=v,...` (see above)")
	f.BoolVarP(&quiet, "quiet", "q", false, "print nothing on success")
	f.BoolVarP(&unsafe, "unsafe", "u", false, "do not open the backing file (SIZE and -F needed)")
	return cmd
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

// createError words the failure to create image as "create IMAGE:
// reason", naming it once and without the driver's prefix, and keeps an
// invalid option a usage error.
func createError(image string, err error) error {
	msg := err.Error()
	for _, p := range []string{"qcow2: create " + image + ": ", "raw: create " + image + ": ", "qcow2: create: ", "raw: create: "} {
		msg = strings.TrimPrefix(msg, p)
	}
	msg = strings.TrimSuffix(msg, " ("+drivers.ErrLocked.Error()+")")
	msg = trimPathError(errors.New(msg), image).Error()
	if isUnsupported(err) {
		return usagef("create %s: %s", image, strings.TrimSuffix(msg, ": "+drivers.ErrUnsupported.Error()))
	}
	return openError(fmt.Errorf("create %s: %s%w", image, msg, sentinelOf(err)))
}

func isUnsupported(err error) bool {
	for e := err; e != nil; {
		if e == drivers.ErrUnsupported {
			return true
		}
		u, ok := e.(interface{ Unwrap() error })
		if !ok {
			return false
		}
		e = u.Unwrap()
	}
	return false
}

// parseCreateOptions parses -o's k=v list.
func parseCreateOptions(s string) (qcow2.CreateOptions, error) {
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
		return false, usagef("-o %s=%q: want on or off", k, v)
	}
	for _, kv := range strings.Split(s, ",") {
		k, v, ok := strings.Cut(kv, "=")
		if !ok {
			return o, usagef("-o %q: want key=value", kv)
		}
		var err error
		switch k {
		case "cluster_size":
			o.ClusterSize, err = parseSize(v)
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
			o.Size, err = parseSize(v)
		case "backing_file":
			o.BackingFile = v
		case "backing_fmt":
			o.BackingFormat = v
		case "data_file":
			o.DataFile = v
		case "data_file_raw":
			o.DataFileRaw, err = onOff(k, v)
		case "preallocation":
			if v != "off" {
				err = fmt.Errorf("only preallocation=off is supported")
			}
		default:
			return o, usagef("-o %s: unknown or unsupported option (supported: cluster_size, refcount_bits, compat, lazy_refcounts, extended_l2, compression_type, preallocation=off, size, backing_file, backing_fmt, data_file, data_file_raw)", k)
		}
		if err != nil {
			if _, isUsage := err.(usageError); isUsage {
				return o, err
			}
			return o, usagef("-o %s=%s: %v", k, v, err)
		}
	}
	return o, nil
}

// parseSize parses a size as qemu-img does: a number with an optional
// suffix k, M, G, T, P or E (powers of 1024; b or no suffix for bytes), a
// fraction only with a unit above bytes, or 0xHEX bytes.
func parseSize(s string) (int64, error) {
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
