package main

import (
	"runtime"
	"strings"
	"testing"

	"imgfuse/imgtool"
)

func TestCompletionAndVersion(t *testing.T) {
	for _, sh := range []string{"bash", "zsh", "fish"} {
		code, out, stderr := runCLI(t, "completion", sh)
		if code != imgtool.ExitOK || !strings.Contains(out, "imgfuse") {
			t.Errorf("completion %s: exit %d, %d bytes, %s", sh, code, len(out), stderr)
		}
	}
	// The first line is what it always was; then the build.
	code, out, _ := runCLI(t, "version")
	if code != imgtool.ExitOK || !strings.HasPrefix(out, "imgfuse "+version+"\ncommit: ") ||
		!strings.Contains(out, "\ngo: "+runtime.Version()+"\n") {
		t.Errorf("version: exit %d, %q", code, out)
	}
	if code, out, _ := runCLI(t, "--version"); code != imgtool.ExitOK || out != "imgfuse "+version+"\n" {
		t.Errorf("--version: exit %d, %q", code, out)
	}
	if code, _, _ := runCLI(t, "version", "--output=yaml"); code != imgtool.ExitUsage {
		t.Errorf("version --output=yaml: exit %d, want %d", code, imgtool.ExitUsage)
	}
	code, out, _ = runCLI(t, "--help")
	if code != imgtool.ExitOK || !strings.Contains(out, imgtool.ExitCodesHelp) {
		t.Errorf("--help lacks the exit codes: exit %d\n%s", code, out)
	}
}
