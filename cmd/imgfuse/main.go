package main

import (
	"errors"
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/spf13/cobra"

	"imgfuse/imgtool"
	"imgfuse/session"
)

// version is set at build time with -ldflags "-X main.version=v1.2.3".
var version = "0.1.0-dev"

func main() {
	if o, ok := session.DaemonChild(); ok {
		os.Exit(imgtool.Code(session.RunDaemon(o)))
	}
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

// run executes the command line args and returns the process exit code.
// It is the edge where errors are rendered: once, on one line of stderr.
func run(args []string, stdout, stderr io.Writer) int {
	root := newRootCmd(stdout, stderr)
	root.SetArgs(args)
	cmd, err := root.ExecuteC()
	if err == nil {
		return imgtool.ExitOK
	}
	var es imgtool.ExitStatus
	if errors.As(err, &es) && es.Err == nil {
		return es.Code // said already
	}
	fmt.Fprintf(stderr, "imgfuse: %v\n", err)
	code := imgtool.Code(err)
	var ue imgtool.UsageError
	if errors.As(err, &ue) {
		if cmd == nil {
			cmd = root
		}
		fmt.Fprintf(stderr, "Run '%s --help' for usage.\n", cmd.CommandPath())
		if cmd.Name() == "check" {
			return imgtool.CheckFailed // qemu-img check: 1 for a bad command line
		}
	}
	return code
}

const rootLong = `imgfuse exposes a disk image (qcow2, raw, VDI, VHD, VHDX or VMDK) as one regular
file through FUSE, so that loop mounts, fsck, dd and friends can use it without
QEMU or NBD.

  imgfuse mount image.qcow2 /mnt/img            # returns once the mount answers
  mount -o loop /mnt/img/disk /mnt/root         # use the disk
  umount /mnt/root && imgfuse unmount /mnt/img  # returns once the image is closed

For scripts, qemu-img's habits work: 'imgfuse info|check|map --output=json'
print what qemu-img prints, -f FORMAT and -U are accepted, and
'imgfuse create' makes qcow2 and raw images as 'qemu-img create' does.

'imgfuse mount --overlay' sends writes to a temporary overlay, deleted on
unmount, and leaves the image unchanged; 'imgfuse status' lists the mounts.

No image at hand? 'imgfuse demo' mounts a small sample.

` + imgtool.ExitCodesHelp

func newRootCmd(stdout, stderr io.Writer) *cobra.Command {
	root := &cobra.Command{
		Use:           "imgfuse",
		Short:         "Mount qcow2, raw, VDI and VHD disk images as a file through FUSE",
		Long:          rootLong,
		Version:       version,
		SilenceErrors: true,
		SilenceUsage:  true,
		// A root without RunE makes cobra print help and succeed on an
		// unknown command; we want exit 2 instead.
		Args: func(cmd *cobra.Command, args []string) error {
			if len(args) > 0 {
				return imgtool.Usagef("unknown command %q", args[0])
			}
			return nil
		},
		RunE: func(cmd *cobra.Command, args []string) error {
			cmd.SetOut(stderr)
			_ = cmd.Usage()
			return imgtool.Usagef("missing command")
		},
	}
	root.SetOut(stdout)
	root.SetErr(stderr)
	root.SetVersionTemplate("imgfuse {{.Version}}\n")
	root.SetFlagErrorFunc(func(_ *cobra.Command, err error) error { return imgtool.UsageError{Err: err} })
	root.CompletionOptions.HiddenDefaultCmd = false
	mountOpts := &session.Options{}
	rf := &remoteFlags{}
	rf.add(root)
	root.PersistentPreRunE = func(cmd *cobra.Command, args []string) error { return rf.install(mountOpts) }
	root.AddCommand(newCacheCmd(stdout, rf))
	root.AddCommand(newMountCmd(mountOpts), newUnmountCmd(), newInfoCmd(stdout), newCheckCmd(stdout, stderr),
		newMapCmd(stdout), newCreateCmd(stdout), newDemoCmd(stdout), newStatusCmd(stdout), newVersionCmd(stdout), newManCmd(stdout))
	strictBuiltins(root)
	return root
}

// strictBuiltins makes cobra's own help and completion commands fail with a
// usage error (exit 2) on a wrong argument, where cobra prints help and
// succeeds: 'imgfuse completion tcsh' or 'imgfuse help frobnicate' must not
// look like success to a script.
func strictBuiltins(root *cobra.Command) {
	root.InitDefaultHelpCmd()
	root.InitDefaultCompletionCmd()
	for _, c := range root.Commands() {
		switch c.Name() {
		case "help":
			show := c.Run
			c.Run = nil
			c.RunE = func(cmd *cobra.Command, args []string) error {
				if target, rest, err := cmd.Root().Find(args); target == nil || err != nil || len(rest) > 0 {
					return imgtool.Usagef("unknown help topic %q", strings.Join(args, " "))
				}
				show(cmd, args)
				return nil
			}
		case "completion":
			var shells []string
			for _, sh := range c.Commands() {
				shells = append(shells, sh.Name())
				sh.Args = exactArgs()
			}
			c.Args = cobra.ArbitraryArgs
			c.RunE = func(cmd *cobra.Command, args []string) error {
				if len(args) == 0 {
					return imgtool.Usagef("completion needs a shell: %s", strings.Join(shells, ", "))
				}
				return imgtool.Usagef("unknown shell %q (want one of: %s)", args[0], strings.Join(shells, ", "))
			}
		}
	}
}

func newVersionCmd(stdout io.Writer) *cobra.Command {
	var output string
	cmd := &cobra.Command{
		Use:   "version [--output=human|json]",
		Short: "Print the version, the commit and the Go version it was built with",
		Long: `Print the version, the commit the binary was built from (from Go's build
information: vcs.revision, and whether the tree had uncommitted changes,
vcs.modified) and the Go version. --output=json prints an object with the
keys version, commit ("" when the build recorded none), modified (null
when unknown) and go.`,
		Args: exactArgs(),
		RunE: func(cmd *cobra.Command, args []string) error {
			asJSON, err := imgtool.OutputFlag(output, false)
			if err != nil {
				return err
			}
			return imgtool.WriteVersion(stdout, imgtool.CurrentVersion(version), asJSON)
		},
	}
	cmd.Flags().StringVar(&output, "output", "human", "output format: human|json")
	return cmd
}

// exactArgs is cobra.ExactArgs with the error marked as a usage error and
// the expected arguments named.
func exactArgs(names ...string) cobra.PositionalArgs {
	return func(cmd *cobra.Command, args []string) error {
		if len(args) != len(names) && len(names) == 0 {
			return imgtool.Usagef("%s takes no arguments (got %q)", cmd.Name(), args)
		}
		if len(args) != len(names) {
			return imgtool.Usagef("%s needs %d argument(s): %s (got %d)",
				cmd.Name(), len(names), strings.Join(names, " "), len(args))
		}
		return nil
	}
}
