//go:build invariants

package cache

// invariants enables the self-checks: build or test with -tags invariants.
const invariants = true
