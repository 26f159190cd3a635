# Convenience targets; CI runs .ci/run.
.PHONY: build test e2e conformance vet crash fuzz soak man

build:
	go build ./...

# The manual pages, generated from the commands' help, into man/.
man:
	go run ./cmd/imgfuse man man

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

# Crash consistency at scale: kill -9 the daemon at random points of random
# write workloads CRASH_ROUNDS times across raw, plain, lazy refcounts,
# extended L2, small clusters and overlays; prints "N passed, N failed".
# Needs root and /dev/fuse. CI runs the default slice as part of the suite.
CRASH_ROUNDS ?= 300
crash:
	@log=$$(mktemp); echo "log: $$log"; \
	IMGFUSE_REQUIRE_E2E=1 IMGFUSE_CRASH_ROUNDS=$(CRASH_ROUNDS) go test -v -count=1 -timeout 120m \
		-run '^TestCrash$$' ./tests/ >$$log 2>&1; rc=$$?; \
	grep -E '^ *--- FAIL|failed \(IMGFUSE_SEED|^crash rounds:' $$log; exit $$rc

# Every fuzz target of the qcow2 driver for FUZZTIME each (CI: 10s).
FUZZTIME ?= 10s
fuzz:
	FUZZTIME=$(FUZZTIME) bash .ci/fuzz

# The soak test for SOAK_SECONDS (CI: 30): fio and a loop-mounted ext4
# under load on a -race build; no race, no deadlock, no growth.
SOAK_SECONDS ?= 300
soak:
	IMGFUSE_REQUIRE_E2E=1 IMGFUSE_SOAK_SECONDS=$(SOAK_SECONDS) go test -race -count=1 -timeout 60m -run '^TestSoak$$' -v ./tests/
