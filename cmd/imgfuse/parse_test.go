package main

import (
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
	code, out, _ := runCLI(t, "version")
	if code != imgtool.ExitOK || out != "imgfuse "+version+"\n" {
		t.Errorf("version: exit %d, %q", code, out)
	}
	code, out, _ = runCLI(t, "--help")
	if code != imgtool.ExitOK || !strings.Contains(out, imgtool.ExitCodesHelp) {
		t.Errorf("--help lacks the exit codes: exit %d\n%s", code, out)
	}
}
