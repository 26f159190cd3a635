package main

import (
	"strings"

	"imgfuse/drivers"
	"imgfuse/drivers/luks"
	"imgfuse/drivers/qcow2"
	"imgfuse/drivers/raw"
)

// imageFormats is every format imgfuse knows, handed to drivers.Open for
// probing the image and its backing files. Order does not matter for
// probing (the highest score wins); it is the order shown in help. luks
// opens nothing: it is there so that a LUKS container is refused by name
// instead of probing as raw (drivers/luks).
func imageFormats() []drivers.Format {
	return []drivers.Format{qcow2.Format{}, raw.Format{}, luks.Format{}}
}

// isLUKS reports whether format is the LUKS format, known only to refuse.
func isLUKS(format string) bool { return format == (luks.Format{}).Name() }

// formatChoices is the valid values of --format: "auto" and each format
// that can be opened.
func formatChoices() []string {
	names := []string{"auto"}
	for _, f := range imageFormats() {
		if !isLUKS(f.Name()) {
			names = append(names, f.Name())
		}
	}
	return names
}

// checkFormatFlag rejects a --format value that names no format.
func checkFormatFlag(name string) error {
	for _, c := range formatChoices() {
		if name == c {
			return nil
		}
	}
	return usagef("invalid --format %q (want one of: %s)", name, strings.Join(formatChoices(), ", "))
}
