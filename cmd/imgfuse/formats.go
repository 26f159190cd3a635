package main

import (
	"strings"

	"imgfuse/drivers"
	"imgfuse/drivers/qcow2"
	"imgfuse/drivers/raw"
)

// imageFormats is every format imgfuse knows, handed to drivers.Open for
// probing the image and its backing files. Order does not matter for
// probing (the highest score wins); it is the order shown in help.
func imageFormats() []drivers.Format {
	return []drivers.Format{qcow2.Format{}, raw.Format{}}
}

// formatChoices is the valid values of --format: "auto" and each format.
func formatChoices() []string {
	names := []string{"auto"}
	for _, f := range imageFormats() {
		names = append(names, f.Name())
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
