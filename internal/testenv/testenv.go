// Package testenv decides, in one place, what a test does when this machine
// lacks something it needs (a tool, /dev/fuse, root, a filesystem that does
// direct I/O): it skips on a developer's machine and fails where coverage is
// required, in CI (CI=true) or with IMGFUSE_REQUIRE_E2E=1. A skip there
// would hide a test that never ran behind a green build.
//
// It imports only the standard library, so that every package's internal
// tests can use it, aio's included (drivers/driverstest imports aio, and an
// internal aio test importing it would be an import cycle).
// tests/lint_test.go fails when a test skips any other way.
package testenv

import (
	"fmt"
	"os"
	"testing"
)

// Required reports whether missing prerequisites must fail tests instead of
// skipping them: in CI, or when IMGFUSE_REQUIRE_E2E=1.
func Required() bool {
	return os.Getenv("IMGFUSE_REQUIRE_E2E") == "1" || os.Getenv("CI") == "true"
}

// Skip skips t, or fails it when Required, saying what is missing.
func Skip(t testing.TB, format string, args ...any) {
	t.Helper()
	msg := "prerequisite missing: " + fmt.Sprintf(format, args...)
	if Required() {
		t.Fatal(msg + " (required: CI=true or IMGFUSE_REQUIRE_E2E=1)")
	}
	t.Skip(msg)
}

// SkipUnless calls Skip unless ok.
func SkipUnless(t testing.TB, ok bool, format string, args ...any) {
	t.Helper()
	if !ok {
		Skip(t, format, args...)
	}
}
