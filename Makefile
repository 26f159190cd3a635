# Convenience targets; CI runs .ci/run.
.PHONY: build test e2e conformance vet

build:
	go build ./...

vet:
	gofmt -l . | tee /dev/stderr | (! read)
	go vet ./...

# The whole suite, as CI runs it (needs root, /dev/fuse and qemu-img for
# the end-to-end part; without them those tests skip).
test:
	go test -race -timeout 20m ./...

# End-to-end tests only, failing instead of skipping when a prerequisite
# is missing.
e2e:
	IMGFUSE_REQUIRE_E2E=1 go test -race -timeout 10m ./tests/

# The driver conformance suite on raw and qcow2.
conformance:
	go test -race -run 'TestConformance|TestCatalogue|TestSuite' ./drivers/...
