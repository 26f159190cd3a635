package tests

import (
	"bufio"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/moby/sys/mountinfo"
)

// benchWorkloads are the rows bench/run must report, in order: the fio
// workloads, then the ext4 tree copy and read-back.
var benchWorkloads = []string{
	"qcow2 seq read 1 MiB QD8",
	"qcow2 rand read 4k QD1",
	"qcow2 rand read 4k QD32",
	"qcow2 rand write 4k QD32 (allocated)",
	"fresh qcow2 seq write 1 MiB QD8",
	"fresh qcow2 rand write 4k QD32",
	"zstd qcow2 seq read 1 MiB QD8",
	"raw rand read 4k QD1",
	"raw rand read 4k QD32",
	"raw seq read 1 MiB QD8",
	"raw rand write 4k QD32",
	// --smoke runs one row of each other format.
	"vmdk rand read 4k QD32",
	"vpc seq read 1 MiB QD8",
	"vdi rand read 4k QD32",
	"vhdx seq read 1 MiB QD8", // once imgfuse reads vhdx (benchNotRead)
	// Remote rows (benchRemote): imgfuse on an nginx URL, its file
	// column imgfuse on the local image; --smoke runs no QSD for them.
	"remote qcow2 cold rand read 4k QD1",
	"remote qcow2 cold rand read 4k QD32",
	"remote qcow2 cold seq read 1 MiB QD8",
	"remote qcow2 warm rand read 4k QD32",
	"ext4: cp -a",
	"ext4: read every file back",
}

// benchRemote starts the label of the remote rows, which only imgfuse
// and the file column (imgfuse on the local image) must fill; other
// cells may be "—" (not run).
const benchRemote = "remote "

// benchBytes is the note bench/run prints per remote row: the bytes
// nginx sent for it against the bytes fio read.
const benchBytes = ": bytes transferred (nginx) / bytes fio read: imgfuse "

// benchNotRead is the note bench/run prints for the rows of a format
// (%s) the imgfuse it built does not read: those rows are not run.
const benchNotRead = "%s rows: not run (this imgfuse does not read %s images"

// TestBenchSmoke runs `bench/run --smoke` so that the benchmark script
// never rots: every workload must have a positive throughput for every
// target, every daemon metric must be a number, the table must parse, and
// nothing may stay mounted. It only proves the script works; the numbers
// of a smoke run mean nothing, so it runs in parallel with the other
// end-to-end tests (it only mounts and cleans up under its own
// imgfuse-bench.* directories): run alone it would add two minutes to
// the suite. It is also the longest of them, so TestMain starts the script
// before the tests run (startBenchSmoke) rather than leave it to queue for
// a parallel slot, where it could start last and end minutes after the
// rest.
func TestBenchSmoke(t *testing.T) {
	t.Parallel()
	requireE2E(t, benchTools...)
	r := benchSmoke()
	if r.timedOut {
		t.Fatalf("bench/run --smoke did not finish in 8 minutes:\n%s", r.output)
	}
	if r.err != nil {
		t.Fatalf("bench/run --smoke: %v\n%s", r.err, r.output)
	}
	checkNoPanic(t, string(r.output))
	if r.tableErr != nil {
		t.Fatalf("--out file: %v\n%s", r.tableErr, r.output)
	}
	checkBenchTable(t, string(r.table))
	if strings.Contains(string(r.table), "FAILURES") {
		t.Errorf("the table lists failures:\n%s", r.table)
	}
	if left := benchLeftovers(t); len(left) > 0 {
		t.Errorf("bench/run left mounts behind: %v", left)
	}
	if t.Failed() {
		t.Logf("bench/run output:\n%s", r.output)
	}
}

// uringParam is the fuse module's FUSE-over-io_uring switch.
const uringParam = "/sys/module/fuse/parameters/enable_uring"

// benchTools are the commands bench/run --smoke needs.
var benchTools = []string{"go", "fio", "jq", "qemu-storage-daemon", "fusermount3", "mkfs.ext4", "fsck.ext4", "losetup", "nginx"}

// benchRun is the outcome of one `bench/run --smoke`.
type benchRun struct {
	output   []byte // stdout and stderr
	err      error
	timedOut bool
	table    []byte // the --out file
	tableErr error
}

// benchSmoke runs `bench/run --smoke` once, the first time it is called,
// and returns its outcome to every caller (with -count=N too: one run
// per test binary).
var benchSmoke = sync.OnceValue(func() benchRun {
	dir, err := os.MkdirTemp("", "imgfuse-bench-smoke-")
	if err != nil {
		return benchRun{err: err}
	}
	defer os.RemoveAll(dir)
	out := filepath.Join(dir, "table.md")
	ctx, cancel := context.WithTimeout(context.Background(), 8*time.Minute)
	defer cancel()
	// --io-uring: the script's FUSE-over-io_uring column too (it turns
	// the module parameter on for the run; only mounts made with
	// --io-uring use it, so the tests running beside it are unaffected).
	cmd := exec.CommandContext(ctx, "bash", "../bench/run", "--smoke", "--io-uring", "--out", out)
	cmd.WaitDelay = 10 * time.Second
	var r benchRun
	r.output, r.err = cmd.CombinedOutput()
	r.timedOut = ctx.Err() != nil
	r.table, r.tableErr = os.ReadFile(out)
	return r
})

// startBenchSmoke starts benchSmoke in the background if TestBenchSmoke
// is going to run and can (root, /dev/fuse, the tools). It returns the
// function that waits for it, which TestMain calls before it exits so that
// no bench/run outlives the tests.
func startBenchSmoke() (wait func()) {
	_, fuseErr := os.Stat("/dev/fuse")
	ok := buildErr == nil && os.Geteuid() == 0 && fuseErr == nil && selected("TestBenchSmoke")
	for _, tool := range append([]string{"qemu-img", "qemu-io"}, benchTools...) {
		if _, err := exec.LookPath(tool); err != nil {
			ok = false
		}
	}
	if !ok {
		return func() {}
	}
	go benchSmoke()
	return func() { benchSmoke() }
}

// checkBenchTable parses the markdown table of bench/run: a header naming
// the targets between "metric" and the ratio columns; per workload a line
// with its throughput (IOPS, MiB/s or seconds) for every target, positive,
// then metric lines whose daemon cells are numbers and whose file cell is
// empty ("—").
func checkBenchTable(t *testing.T, table string) {
	t.Helper()
	var lines [][]string
	s := bufio.NewScanner(strings.NewReader(table))
	for s.Scan() {
		l := strings.TrimSpace(s.Text())
		if !strings.HasPrefix(l, "|") {
			continue
		}
		cells := strings.Split(strings.Trim(l, "|"), "|")
		for i := range cells {
			cells[i] = strings.TrimSpace(cells[i])
		}
		lines = append(lines, cells)
	}
	if len(lines) < 3 {
		t.Fatalf("no markdown table in the output:\n%s", table)
	}
	hdr := lines[0]
	n := len(hdr)
	// Two ratio columns, four when the io_uring column is there.
	nr := 2
	if n >= 8 && hdr[n-2] == "io_uring/best QSD" && hdr[n-1] == "io_uring/file" {
		nr = 4
	}
	if n < 4+nr || hdr[0] != "workload" || hdr[1] != "metric" || hdr[n-nr] != "imgfuse/best QSD" || hdr[n-nr+1] != "imgfuse/file" {
		t.Fatalf("unexpected header %q", hdr)
	}
	targets := hdr[2 : n-nr]
	qsd := 1
	if nr == 4 {
		if targets[1] != "imgfuse io_uring" {
			t.Fatalf("targets %q: want imgfuse, imgfuse io_uring, QSD x.y..., file", targets)
		}
		qsd = 2
	}
	if targets[0] != "imgfuse" || targets[len(targets)-1] != "file" || !strings.HasPrefix(targets[qsd], "QSD ") {
		t.Fatalf("targets %q: want imgfuse, QSD x.y..., file", targets)
	}
	if _, err := os.Stat(uringParam); err == nil && nr != 4 {
		t.Errorf("this kernel has FUSE-over-io_uring but the table has no io_uring column")
	}
	number := func(cell string) (float64, bool) {
		v, err := strconv.ParseFloat(cell, 64)
		return v, err == nil
	}
	var workloads []string
	remote := false // the current workload is a remote row
	for _, cells := range lines[2:] {
		if len(cells) != n {
			t.Errorf("row %q has %d cells, the header %d", cells, len(cells), n)
			continue
		}
		if cells[0] != "" {
			// A workload's throughput line.
			workloads = append(workloads, cells[0])
			remote = strings.HasPrefix(cells[0], benchRemote)
			if u := cells[1]; u != "IOPS" && u != "MiB/s" && u != "s" {
				t.Errorf("%s: unit %q", cells[0], u)
			}
			for i, tg := range targets {
				if remote && tg != "imgfuse" && tg != "file" && cells[2+i] == "—" {
					continue
				}
				if v, ok := number(cells[2+i]); !ok || v <= 0 {
					t.Errorf("%s on %s: %q, want a positive number", cells[0], tg, cells[2+i])
				}
			}
			for i, r := range cells[n-nr:] {
				// imgfuse/file of a remote row; no QSD ran in --smoke.
				if remote && i != 1 && r == "—" {
					continue
				}
				if v, ok := number(r); !ok || v <= 0 {
					t.Errorf("%s: ratio %q, want a positive number", cells[0], r)
				}
			}
			if remote && !strings.Contains(table, cells[0]+benchBytes) {
				t.Errorf("%s: no note of the bytes transferred", cells[0])
			}
			continue
		}
		// A daemon metric line: CPU, context switches, RSS.
		for i, tg := range targets {
			c := cells[2+i]
			if remote && tg != "imgfuse" && c == "—" {
				continue
			}
			if tg == "file" {
				if c != "—" {
					t.Errorf("%s of the file target: %q, want —", cells[1], c)
				}
				continue
			}
			if v, ok := number(c); !ok || v < 0 {
				t.Errorf("%s on %s: %q, want a number", cells[1], tg, c)
			}
		}
	}
	// The rows of a format imgfuse does not read are left out, and
	// bench/run says so.
	var want []string
	for _, w := range benchWorkloads {
		f, _, _ := strings.Cut(w, " ")
		if !strings.Contains(table, fmt.Sprintf(benchNotRead, f, f)) {
			want = append(want, w)
		}
	}
	if len(workloads) != len(want) {
		t.Fatalf("workloads %q, want %q", workloads, want)
	}
	for i, w := range workloads {
		if !strings.HasPrefix(w, want[i]) {
			t.Errorf("workload %d is %q, want %q", i, w, want[i])
		}
	}
}

// benchLeftovers lists mountpoints of bench/run's work directories.
func benchLeftovers(t *testing.T) []string {
	t.Helper()
	prefix := filepath.Join(os.TempDir(), "imgfuse-bench.")
	mounts, err := mountinfo.GetMounts(func(m *mountinfo.Info) (skip, stop bool) {
		return !strings.HasPrefix(m.Mountpoint, prefix), false
	})
	if err != nil {
		t.Fatal(err)
	}
	var left []string
	for _, m := range mounts {
		left = append(left, m.Mountpoint)
	}
	return left
}
