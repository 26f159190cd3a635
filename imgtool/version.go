package imgtool

import (
	"encoding/json"
	"fmt"
	"io"
	"runtime/debug"
)

// Version is what `imgfuse version` says: the version set at build time,
// and from the binary's build info the commit it was built from, whether
// the tree had changes not committed, and the Go toolchain.
type Version struct {
	Version string `json:"version"`
	// Commit is vcs.revision, "" when the binary was built outside a
	// repository (go install of a module version, -buildvcs=false).
	Commit string `json:"commit"`
	// Modified is vcs.modified: nil when unknown.
	Modified *bool  `json:"modified"`
	Go       string `json:"go"`
}

// VersionOf reads version's Version from the build info bi (nil: none
// could be read).
func VersionOf(version string, bi *debug.BuildInfo) Version {
	v := Version{Version: version}
	if bi == nil {
		return v
	}
	v.Go = bi.GoVersion
	for _, s := range bi.Settings {
		switch s.Key {
		case "vcs.revision":
			v.Commit = s.Value
		case "vcs.modified":
			m := s.Value == "true"
			v.Modified = &m
		}
	}
	return v
}

// CurrentVersion is VersionOf this binary's build info.
func CurrentVersion(version string) Version {
	bi, _ := debug.ReadBuildInfo()
	return VersionOf(version, bi)
}

// WriteVersion prints v, as JSON or as lines: "imgfuse VERSION", then
// the commit ("unknown" without one; "+ changes" when the tree had
// uncommitted ones) and the Go version.
func WriteVersion(w io.Writer, v Version, asJSON bool) error {
	if asJSON {
		b, err := json.MarshalIndent(v, "", "  ")
		if err != nil {
			return err
		}
		_, err = fmt.Fprintf(w, "%s\n", b)
		return err
	}
	commit := v.Commit
	if commit == "" {
		commit = "unknown"
	}
	if v.Modified != nil && *v.Modified {
		commit += " (with uncommitted changes)"
	}
	goVersion := v.Go
	if goVersion == "" {
		goVersion = "unknown"
	}
	_, err := fmt.Fprintf(w, "imgfuse %s\ncommit: %s\ngo: %s\n", v.Version, commit, goVersion)
	return err
}
