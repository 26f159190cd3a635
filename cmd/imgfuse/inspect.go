package main

import (
	"io"
	"strings"

	"github.com/spf13/cobra"

	"imgfuse/drivers"
	"imgfuse/imgtool"
)

func newInfoCmd(stdout io.Writer) *cobra.Command {
	var asJSON, chain, forceShare bool
	var format, output string
	cmd := &cobra.Command{
		Use:   "info [flags] IMAGE",
		Short: "Describe an image and its backing chain",
		Long: `Describe IMAGE like 'qemu-img info --backing-chain': format, sizes, format
details (qcow2: version, cluster size, feature bits, dirty/corrupt state,
compression type), internal snapshots, and every backing file down the chain
that can be opened (a missing backing file is named, not an error).

--output=json (or --json) prints what 'qemu-img info --output=json' prints,
key for key: filename, format, virtual-size, actual-size (allocated bytes),
dirty-flag, cluster-size, backing-filename, full-backing-filename,
backing-filename-format, format-specific {type, data}, snapshots, and no
other key. imgfuse's own fields (feature names, the apparent file size, the
partition table: number, partN file, start, size, type, GPT name and UUID,
and the image below, described the same way, as "backing-image") are under
"imgfuse". With --backing-chain the output is
a JSON array with one object per image, top first, as qemu-img prints it;
then every backing file must open.

info takes no image locks (it only reads the header and the snapshot table),
so it works on a mounted image; -U is accepted for qemu-img habits.`,
		Args: exactArgs("IMAGE"),
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := imgtool.CheckFormatFlag(format); err != nil {
				return err
			}
			jsonOut, err := imgtool.OutputFlag(output, asJSON)
			if err != nil {
				return err
			}
			infos, err := imgtool.ImageChain(args[0], format, chain)
			if err != nil {
				return err
			}
			if jsonOut {
				return imgtool.WriteInfoJSON(stdout, infos, chain)
			}
			return imgtool.WriteInfoText(stdout, infos)
		},
	}
	cmd.Flags().BoolVar(&asJSON, "json", false, "print JSON (same as --output=json)")
	cmd.Flags().StringVar(&output, "output", "human", "output format: human|json")
	cmd.Flags().BoolVar(&chain, "backing-chain", false, "describe every image of the chain (JSON: an array); fail if one cannot be opened")
	cmd.Flags().BoolVarP(&forceShare, "force-share", "U", false, "take no image locks (info never takes any)")
	addFormatFlag(cmd, &format)
	return cmd
}

func newCheckCmd(stdout, stderr io.Writer) *cobra.Command {
	var format, output, repair string
	var forceShare, quiet bool
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
read (QED, Parallels, ...) is refused by name with exit 5, as by the other
commands.
On a terminal, images of 4 GiB and more show a progress bar on stderr.
-q prints nothing but an error that stops the check (the exit code says
the result), as qemu-img check -q; it does not list the problems found
either.

Exit codes (qemu-img check's): 0 clean, 1 the check failed (cannot open, I/O
error, usage error), 2 corruptions, 3 leaks only, 63 format without checks;
and imgfuse's 5 for a format it cannot read or a URL (remote images).`,
		Args: exactArgs("IMAGE"),
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := imgtool.CheckFormatFlag(format); err != nil {
				return err
			}
			jsonOut, err := imgtool.OutputFlag(output, false)
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
				return imgtool.Usagef("invalid -r %q (want leaks or all)", repair)
			}
			if forceShare && mode != drivers.CheckOnly {
				return imgtool.Usagef("-U (--force-share) cannot be used with -r: a repair writes the image")
			}
			out, problems := stdout, stderr
			if quiet {
				out, problems = io.Discard, io.Discard
			}
			return imgtool.Check(out, problems, args[0], format, mode, forceShare, jsonOut)
		},
	}
	cmd.Flags().BoolVarP(&quiet, "quiet", "q", false, "print nothing but an error that stops the check; the exit code tells the result")
	cmd.Flags().StringVar(&output, "output", "human", "output format: human|json")
	cmd.Flags().StringVarP(&repair, "repair", "r", "", "repair `leaks` or `all` errors")
	cmd.Flags().BoolVarP(&forceShare, "force-share", "U", false, "take no image locks (check only)")
	addFormatFlag(cmd, &format)
	return cmd
}

func newMapCmd(stdout io.Writer) *cobra.Command {
	var format, output string
	var forceShare bool
	var startArg, maxLenArg string
	cmd := &cobra.Command{
		Use:   "map [flags] IMAGE",
		Short: "Print the allocation map of an image and its backing chain, as qemu-img map does",
		Long: `Print which ranges of IMAGE's virtual disk hold data, read as zeros, or come
from a backing file, and where they are stored.

--output=json prints exactly what 'qemu-img map --output=json' prints: one
object per run with start, length, depth (0: IMAGE itself, 1: its backing
file, ...), present (allocated at that depth), zero, data and, where the run
has a plain location in that layer's file, offset (compressed clusters have
none). The human output is qemu-img map's: the runs with data that is not
known to read as zeros and an offset, with the file that holds them.

map takes no image locks (-U is accepted for qemu-img habits).`,
		Args: exactArgs("IMAGE"),
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := imgtool.CheckFormatFlag(format); err != nil {
				return err
			}
			jsonOut, err := imgtool.OutputFlag(output, false)
			if err != nil {
				return err
			}
			// Sizes as qemu-img takes them (1M, 0x1000); a
			// --max-length of 0 maps nothing, as qemu-img's does.
			start, maxLen := int64(0), int64(-1)
			if startArg != "" {
				if start, err = imgtool.ParseSize(startArg); err != nil {
					return imgtool.Usagef("invalid --start-offset %q: %v", startArg, err)
				}
			}
			if maxLenArg != "" {
				if maxLen, err = imgtool.ParseSize(maxLenArg); err != nil {
					return imgtool.Usagef("invalid --max-length %q: %v", maxLenArg, err)
				}
			}
			return imgtool.Map(stdout, args[0], format, start, maxLen, jsonOut)
		},
	}
	cmd.Flags().StringVar(&output, "output", "human", "output format: human|json")
	cmd.Flags().BoolVarP(&forceShare, "force-share", "U", false, "take no image locks (map never takes any)")
	cmd.Flags().StringVar(&startArg, "start-offset", "", "first byte of the virtual disk to map (a size: 0, 1M, 0x1000)")
	cmd.Flags().StringVar(&maxLenArg, "max-length", "", "bytes to map from --start-offset (default: to the end)")
	addFormatFlag(cmd, &format)
	return cmd
}

func newCreateCmd(stdout io.Writer) *cobra.Command {
	var format, backing, backingFmt string
	var opts []string
	var quiet, unsafe bool
	cmd := &cobra.Command{
		Use:   "create [flags] IMAGE [SIZE]",
		Short: "Create a raw or qcow2 image, as qemu-img create does",
		Long: `Create IMAGE, replacing any file of that name, as 'qemu-img create' does:
qemu-img info describes the result as it describes the image qemu-img
create makes with the same options (without preallocation a qcow2 image
is byte for byte the same file).

Without -f the image is raw, as qemu-img create makes it; -b, -F or an -o
option that only qcow2 takes (qemu-img refuses those without -f) make it
qcow2.

SIZE takes the suffixes k, M, G, T, P, E (powers of 1024; fractions such
as 1.5G, and hexadecimal bytes such as 0x1000, as qemu-img takes them) and
is rounded up to a multiple of 512, as qemu-img rounds it (the Formatting
line says the size as given, as qemu-img's does). With -b the new
image is an overlay whose reads fall through to BACKING; BACKING is opened
(relative to IMAGE's directory) to take SIZE from it when SIZE is not
given and to probe its format when -F is not given; -u skips that (SIZE and
-F are then needed).

-o takes comma-separated options ('-o help' lists those of the format):
  cluster_size=SIZE          512 to 2M, a power of two (default 64k)
  refcount_bits=N            1, 2, 4, 8, 16 (default), 32 or 64
  compat=0.10|1.1            qcow2 version 2 or 3 (default 1.1)
  lazy_refcounts=on|off      (compat=1.1)
  extended_l2=on|off         subclusters (compat=1.1, cluster_size >= 16k)
  compression_type=zlib|zstd (zstd: compat=1.1)
  preallocation=MODE         off (default), metadata (qcow2: every cluster
                             mapped, its blocks left holes), falloc
                             (blocks reserved), full (zeros written); with
                             a backing file only with extended_l2=on
  data_file=NAME             guest data in the raw file NAME (created; relative
                             to IMAGE's directory), compat=1.1
  data_file_raw=on|off       NAME is a raw image of the disk (metadata preallocated)
  size=SIZE, backing_file=BACKING, backing_fmt=FMT   as SIZE, -b and -F
Raw images take size and preallocation=off|falloc|full; without
preallocation they are sparse files.`,
		Example: `  imgfuse create disk.raw 10G                     # raw, as qemu-img create
  imgfuse create -f qcow2 disk.qcow2 10G
  imgfuse create -f qcow2 -b base.qcow2 -F qcow2 overlay.qcow2   # size from the base
  imgfuse create -f qcow2 -o cluster_size=2M,compression_type=zstd big.qcow2 1T
  imgfuse create -f qcow2 -o preallocation=falloc vm.qcow2 20G
  imgfuse create -f qcow2 -o help`,
		Args: func(cmd *cobra.Command, args []string) error {
			if len(args) > 2 || (len(args) == 0 && !imgtool.WantsOptionHelp(opts)) {
				return imgtool.Usagef("create needs IMAGE and optionally SIZE (got %d arguments)", len(args))
			}
			return nil
		},
		RunE: func(cmd *cobra.Command, args []string) error {
			image := ""
			if len(args) > 0 {
				image = args[0]
			}
			size := int64(-1)
			if len(args) == 2 {
				var err error
				if size, err = imgtool.ParseSize(args[1]); err != nil {
					return imgtool.Usagef("invalid SIZE %q: %v", args[1], err)
				}
			}
			return imgtool.Create(stdout, imgtool.CreateRequest{
				Image: image, Format: format, Size: size, Backing: backing, BackingFormat: backingFmt,
				Options: opts, Quiet: quiet, Unsafe: unsafe,
			})
		},
	}
	f := cmd.Flags()
	f.StringVarP(&format, "format", "f", "", "image format: raw|qcow2 (default: raw, as qemu-img create; qcow2 with -b or a qcow2 option)")
	f.StringVarP(&backing, "backing", "b", "", "backing file `BACKING` (qcow2), relative to IMAGE's directory unless absolute")
	f.StringVarP(&backingFmt, "backing-format", "F", "", "format of the backing file (probed if not given)")
	f.StringArrayVarP(&opts, "options", "o", nil, "options `k=v,...` (see above; 'help' lists them)")
	f.BoolVarP(&quiet, "quiet", "q", false, "print nothing on success")
	f.BoolVarP(&unsafe, "unsafe", "u", false, "do not open the backing file (SIZE and -F needed)")
	return cmd
}

// addFormatFlag adds --format/-f, as qemu-img spells it.
func addFormatFlag(cmd *cobra.Command, format *string) {
	cmd.Flags().StringVarP(format, "format", "f", "auto", "image format: "+strings.Join(imgtool.FormatChoices(), "|"))
}
