package main

import (
	"io"
	"os"

	"github.com/spf13/cobra"
	"github.com/spf13/cobra/doc"

	"imgfuse/imgtool"
)

const manLong = `Write the manual pages of imgfuse, generated from the commands' own help:
imgfuse.1 and one imgfuse-COMMAND.1 per command (imgfuse-mount.1, ...),
into DIR (made if missing), e.g. /usr/local/share/man/man1. Without DIR,
print imgfuse.1 alone on stdout ('imgfuse man | man -l -').

The date is now, or SOURCE_DATE_EPOCH's for a reproducible build.`

func newManCmd(stdout io.Writer) *cobra.Command {
	return &cobra.Command{
		Use:   "man [DIR]",
		Short: "Write the manual pages (generated from this help) into DIR",
		Long:  manLong,
		Args: func(cmd *cobra.Command, args []string) error {
			if len(args) > 1 {
				return imgtool.Usagef("man takes at most one argument, DIR (got %d)", len(args))
			}
			return nil
		},
		RunE: func(cmd *cobra.Command, args []string) error {
			root := cmd.Root()
			root.DisableAutoGenTag = true
			header := &doc.GenManHeader{Title: "IMGFUSE", Section: "1", Source: "imgfuse " + version, Manual: "imgfuse manual"}
			if len(args) == 0 {
				return doc.GenMan(root, header, stdout)
			}
			if err := os.MkdirAll(args[0], 0o755); err != nil {
				return &imgtool.Error{Op: "man", Path: args[0], Named: true, Err: err}
			}
			if err := doc.GenManTree(root, header, args[0]); err != nil {
				return &imgtool.Error{Op: "man", Path: args[0], Err: err}
			}
			return nil
		},
	}
}
