package tests

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"imgfuse/drivers/driverstest"
)

// TestCreateLikeQemuImg: `imgfuse create` makes, for each qemu-img create
// option, the same file qemu-img create makes (so qemu-img info describes
// it identically and qemu-img check accepts it); the result mounts and
// takes writes. Without -f both make a raw image. With preallocation
// (falloc, full) qcow2's tables sit elsewhere than qemu-img's: there
// qemu-img info, check and map (offsets aside) agree, and du within the
// tables' few clusters.
func TestCreateLikeQemuImg(t *testing.T) {
	t.Parallel()
	requireE2E(t)
	cases := []struct {
		name  string
		args  []string // between "create" and IMAGE SIZE; -f qcow2 added unless -f or noFormat
		size  string
		mount bool // also mount and write (each mount costs a daemon)
		// noFormat: no -f for either tool (raw, both); otherLayout: the
		// files differ (preallocated qcow2), the descriptions must not.
		noFormat, otherLayout bool
	}{
		{"default", nil, "64M", true, false, false},
		{"no-format-raw", nil, "64M", true, true, false},
		{"no-format-raw-falloc", []string{"-o", "preallocation=falloc"}, "16M", false, true, false},
		{"raw-preallocation-off", []string{"-f", "raw", "-o", "preallocation=off"}, "16M", false, false, false},
		{"raw-preallocation-full", []string{"-f", "raw", "-o", "preallocation=full"}, "16M", false, false, false},
		{"preallocation-metadata", []string{"-o", "preallocation=metadata"}, "64M", true, false, false},
		{"preallocation-metadata-4k", []string{"-o", "preallocation=metadata,cluster_size=4k"}, "64M", false, false, true},
		{"preallocation-falloc", []string{"-o", "preallocation=falloc"}, "64M", true, false, true},
		{"preallocation-full", []string{"-o", "preallocation=full"}, "64M", false, false, true},
		{"preallocation-full-data-file", []string{"-o", "preallocation=full,data_file=img.data"}, "16M", false, false, true},
		{"cluster-4k-refcount-8", []string{"-o", "cluster_size=4k,refcount_bits=8"}, "64M", false, false, false},
		{"cluster-512-refcount-1", []string{"-o", "cluster_size=512,refcount_bits=1"}, "16M", true, false, false},
		{"cluster-2M-refcount-64", []string{"-o", "cluster_size=2M,refcount_bits=64"}, "1G", false, false, false},
		{"extended-l2", []string{"-o", "extended_l2=on"}, "64M", true, false, false},
		{"zstd", []string{"-o", "compression_type=zstd"}, "64M", false, false, false},
		{"lazy-refcounts", []string{"-o", "lazy_refcounts=on"}, "64M", false, false, false},
		{"compat-0.10", []string{"-o", "compat=0.10"}, "64M", true, false, false},
		{"compat-1.1-preallocation-off", []string{"-o", "compat=1.1", "-o", "preallocation=off"}, "64M", false, false, false},
		{"raw", []string{"-f", "raw"}, "64M", true, false, false},
		{"odd-size", nil, "12345678", false, false, false},
		{"fraction-size", nil, "1.3k", false, false, false}, // 1331 bytes, a 1536-byte disk
		{"hex-size-raw", []string{"-f", "raw"}, "0x201", false, false, false},
		{"data-file", []string{"-o", "data_file=img.data"}, "64M", true, false, false},
		{"data-file-raw", []string{"-o", "data_file=img.data,data_file_raw=on,extended_l2=on"}, "64M", false, false, false},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			// Each tool in its own directory, the images (and data
			// files) under the same names: the names are stored.
			dir := t.TempDir()
			qdir, odir := filepath.Join(dir, "qemu"), filepath.Join(dir, "imgfuse")
			for _, d := range []string{qdir, odir} {
				if err := os.Mkdir(d, 0o755); err != nil {
					t.Fatal(err)
				}
			}
			theirs, ours := filepath.Join(qdir, "img"), filepath.Join(odir, "img")
			args := c.args
			if !c.noFormat && (len(args) == 0 || args[0] != "-f") {
				args = append([]string{"-f", "qcow2"}, args...)
			}
			isRaw := len(args) == 0 || args[0] != "-f" || args[1] == "raw"
			qemu := exec.Command("qemu-img", append(append([]string{"create"}, args...), "img", c.size)...)
			qemu.Dir = qdir // qemu-img creates a data file relative to its cwd
			out, err := qemu.CombinedOutput()
			if err != nil {
				t.Fatalf("qemu-img create: %v\n%s", err, out)
			}
			r := imgfuse(t, nil, append(append([]string{"create"}, args...), ours, c.size)...)
			if r.code != 0 {
				t.Fatalf("imgfuse create: %v", r)
			}
			// The same "Formatting 'img', fmt=... size=..." line (the
			// size as given, not rounded).
			if got := strings.ReplaceAll(r.stdout, ours, "img"); got != string(out) {
				t.Errorf("imgfuse create prints %q, qemu-img create %q", got, out)
			}
			if c.otherLayout {
				sameMap(t, odir, qdir, "img")
			} else {
				compareFiles(t, ours, theirs)
			}
			// Where the blocks are: holes or allocated, as qemu-img's
			// (the tables' few clusters aside).
			if a, b := duBytes(t, ours), duBytes(t, theirs); a > b+512<<10 || b > a+512<<10 {
				t.Errorf("du: %d bytes, qemu-img's image %d", a, b)
			}
			// QEMU opens a relative data file name from its working
			// directory (imgfuse from the image's): run it from odir.
			dataFile := strings.Contains(strings.Join(c.args, " "), "data_file")
			clean := func() {
				t.Helper()
				if isRaw {
					return
				}
				qc := exec.Command("qemu-img", "check", "img")
				qc.Dir = odir
				if out, err := qc.CombinedOutput(); err != nil {
					t.Errorf("qemu-img check: %v\n%s", err, out)
				}
			}
			clean()
			if dataFile {
				compareFiles(t, filepath.Join(odir, "img.data"), filepath.Join(qdir, "img.data"))
				if a, b := duBytes(t, filepath.Join(odir, "img.data")), duBytes(t, filepath.Join(qdir, "img.data")); a != b {
					t.Errorf("du of the data file: %d bytes, qemu-img's %d", a, b)
				}
			} else {
				sameInfo(t, ours, theirs) // same bytes; this is the contract users see
			}
			if !c.mount {
				return
			}

			// It mounts and takes a write that qemu-img reads back.
			mp, disk := mount(t, ours, false)
			f, err := os.OpenFile(disk, os.O_WRONLY, 0)
			if err != nil {
				t.Fatal(err)
			}
			data := bytes.Repeat([]byte("imgfuse create "), 1000)
			if _, err := f.WriteAt(data, 1<<20); err != nil {
				t.Fatal(err)
			}
			if err := f.Close(); err != nil {
				t.Fatal(err)
			}
			unmount(t, mp)
			clean()
			qio := exec.Command("qemu-io", "-f", map[bool]string{true: "raw", false: "qcow2"}[isRaw],
				"-c", "read -v 1048576 15", "img")
			qio.Dir = odir
			got, err := qio.CombinedOutput()
			if err != nil {
				t.Fatalf("qemu-io: %v\n%s", err, got)
			}
			if !bytes.Contains(got, []byte("69 6d 67 66 75 73 65 20 63 72 65 61 74 65 20")) {
				t.Errorf("qemu-io does not read the write back:\n%s", got)
			}
		})
	}
}

// sameMap compares qemu-img map --output=json of the images named img in
// the directories ours and theirs (run from there: a relative data file
// name is opened from the working directory), the offsets aside and
// adjacent runs of one kind merged: what they map, wherever their tables
// sit.
func sameMap(t *testing.T, ours, theirs, img string) {
	t.Helper()
	flags := func(dir string) string {
		var runs []struct {
			Start, Length       int64
			Present, Zero, Data bool
		}
		c := exec.Command("qemu-img", "map", "--output=json", img)
		c.Dir = dir
		out, err := c.Output()
		if err != nil {
			t.Fatalf("qemu-img map in %s: %v", dir, err)
		}
		if err := json.Unmarshal(out, &runs); err != nil {
			t.Fatal(err)
		}
		var lines []string
		var start, end int64
		kind := ""
		for _, r := range runs {
			k := fmt.Sprintf("present=%v zero=%v data=%v", r.Present, r.Zero, r.Data)
			if k != kind || r.Start != end {
				if kind != "" {
					lines = append(lines, fmt.Sprintf("[%d, %d) %s", start, end, kind))
				}
				start, kind = r.Start, k
			}
			end = r.Start + r.Length
		}
		return strings.Join(append(lines, fmt.Sprintf("[%d, %d) %s", start, end, kind)), "\n")
	}
	if a, b := flags(ours), flags(theirs); a != b {
		t.Errorf("qemu-img map of ours:\n%s\nof qemu-img's:\n%s", a, b)
	}
}

// sameInfo compares qemu-img info of two images, filename and actual-size
// aside.
func sameInfo(t *testing.T, ours, theirs string) {
	t.Helper()
	a := decodeJSON(t, "qemu-img info", driverstest.Cmd(t, "qemu-img", "info", "--output=json", ours)).(map[string]any)
	b := decodeJSON(t, "qemu-img info", driverstest.Cmd(t, "qemu-img", "info", "--output=json", theirs)).(map[string]any)
	for _, k := range []string{"filename", "actual-size"} {
		delete(a, k)
		delete(b, k)
	}
	sameShared(t, "qemu-img info", a, b)
	sameShared(t, "qemu-img info", b, a)
}

// TestCreateOverlay: the everyday CI use, an overlay over a base with the
// size taken from the base, relative backing name kept as given.
func TestCreateOverlay(t *testing.T) {
	requireE2E(t)
	t.Parallel()
	dir := t.TempDir()
	base := filepath.Join(dir, "base.qcow2")
	driverstest.Cmd(t, "qemu-img", "create", "-q", "-f", "qcow2", base, "48M")
	driverstest.Cmd(t, "qemu-io", "-c", "write -P 0x5a 0 1M", base)
	theirs, ours := filepath.Join(dir, "qemu.qcow2"), filepath.Join(dir, "imgfuse.qcow2")
	driverstest.Cmd(t, "qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", theirs)
	// Without -F: the format is probed from the base and written.
	if r := imgfuse(t, nil, "create", "-q", "-b", "base.qcow2", ours); r.code != 0 {
		t.Fatalf("imgfuse create -b: %v", r)
	}
	compareFiles(t, ours, theirs)
	sameInfo(t, ours, theirs)
	// qemu-img's -o spelling of the same.
	viaOpts := filepath.Join(dir, "opts.qcow2")
	if r := imgfuse(t, nil, "create", "-q", "-o", "backing_file=base.qcow2,backing_fmt=qcow2", viaOpts); r.code != 0 {
		t.Fatalf("imgfuse create -o backing_file: %v", r)
	}
	compareFiles(t, viaOpts, theirs)

	_, disk := mount(t, ours, false, "--read-only")
	b := make([]byte, 4096)
	f, err := os.Open(disk)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.ReadAt(b, 4096); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(b, bytes.Repeat([]byte{0x5a}, 4096)) {
		t.Errorf("the overlay does not read the base's data: % x...", b[:16])
	}
	// create over an image in use is refused before anything is written.
	sum := fileSum(t, ours)
	if r := imgfuse(t, nil, "create", "-q", ours, "1M"); r.code != 4 ||
		!strings.HasPrefix(r.stderr, "imgfuse: ") || !strings.Contains(r.stderr, "create") ||
		!strings.Contains(r.stderr, "failed to get") || strings.Count(r.stderr, ours) != 1 ||
		strings.Count(r.stderr, "\n") != 1 {
		t.Errorf("create over a mounted image: want exit 4 and one line naming the image once: %v", r)
	}
	if fileSum(t, ours) != sum {
		t.Error("create over a mounted image changed it")
	}

	// A raw base whose size is not whole sectors: QEMU rounds its size up.
	odd := filepath.Join(dir, "odd.raw")
	if err := os.WriteFile(odd, bytes.Repeat([]byte{7}, 1000), 0o644); err != nil {
		t.Fatal(err)
	}
	theirs, ours = filepath.Join(dir, "qemu-odd.qcow2"), filepath.Join(dir, "imgfuse-odd.qcow2")
	driverstest.Cmd(t, "qemu-img", "create", "-q", "-f", "qcow2", "-b", "odd.raw", "-F", "raw", theirs)
	if r := imgfuse(t, nil, "create", "-q", "-b", "odd.raw", "-F", "raw", ours); r.code != 0 {
		t.Fatalf("imgfuse create -b odd.raw: %v", r)
	}
	compareFiles(t, ours, theirs)

	// A missing backing file: refused unless -u, which needs SIZE and -F.
	if r := imgfuse(t, nil, "create", "-q", "-b", "nope.qcow2", filepath.Join(dir, "x.qcow2")); r.code != 3 {
		t.Errorf("create over a missing backing file: %v", r)
	}
	if r := imgfuse(t, nil, "create", "-q", "-u", "-b", "nope.qcow2", "-F", "qcow2", filepath.Join(dir, "y.qcow2"), "1M"); r.code != 0 {
		t.Errorf("create -u: %v", r)
	}
	if r := imgfuse(t, nil, "create", "-q", "-o", "compat=0.10,extended_l2=on", filepath.Join(dir, "z.qcow2"), "1M"); r.code != 2 {
		t.Errorf("create with contradicting options: %v", r)
	}
}

// TestCreateOptionHelp: `create -o help` lists the options of the format
// (raw without -f, as qemu-img create) each in the very line qemu-img
// create -o help prints for it, and exits 0 without creating anything.
func TestCreateOptionHelp(t *testing.T) {
	requireE2E(t)
	t.Parallel()
	dir := t.TempDir()
	for _, c := range []struct {
		args   []string
		format string
	}{{nil, "raw"}, {[]string{"-f", "raw"}, "raw"}, {[]string{"-f", "qcow2"}, "qcow2"}} {
		r := imgfuse(t, nil, append(append([]string{"create"}, c.args...), "-o", "help", filepath.Join(dir, "x"))...)
		lines := strings.Split(strings.TrimSpace(r.stdout), "\n")
		if r.code != 0 || lines[0] != "Supported "+c.format+" options:" || len(lines) < 3 {
			t.Fatalf("create %v -o help: %v", c.args, r)
		}
		// qemu-img lists the file protocol's options with the format's
		// when given a file name.
		theirs := string(driverstest.Cmd(t, "qemu-img", "create", "-f", c.format, "-o", "help", filepath.Join(dir, "y")))
		for _, l := range lines[1:] {
			if !strings.Contains(theirs, "\n"+l+"\n") {
				t.Errorf("create %v -o help: %q is not a line of qemu-img's:\n%s", c.args, l, theirs)
			}
		}
		if _, err := os.Stat(filepath.Join(dir, "x")); err == nil {
			t.Errorf("create %v -o help created the image", c.args)
		}
	}
	if r := imgfuse(t, nil, "create", "-f", "qcow2", "-o", "help"); r.code != 0 || !strings.Contains(r.stdout, "preallocation=<str>") {
		t.Errorf("create -f qcow2 -o help without IMAGE: %v", r)
	}
	// metadata preallocation of a raw image is refused, as by qemu-img.
	if r := imgfuse(t, nil, "create", "-o", "preallocation=metadata", filepath.Join(dir, "m"), "1M"); r.code != 2 {
		t.Errorf("raw with preallocation=metadata: %v", r)
	}
}

// TestCheckQuiet: check -q prints no report, and exits as check does: 0
// clean, 3 leaks; what stops a check is still said, as qemu-img check -q
// says it: a raw image (exit 63), an image that cannot be opened (exit 1).
func TestCheckQuiet(t *testing.T) {
	requireE2E(t)
	t.Parallel()
	dir := t.TempDir()
	clean := filepath.Join(dir, "clean.qcow2")
	driverstest.Cmd(t, "qemu-img", "create", "-q", "-f", "qcow2", clean, "8M")
	leaky := filepath.Join(dir, "leaky.qcow2")
	driverstest.Cmd(t, "qemu-img", "create", "-q", "-f", "qcow2", "-o", "cluster_size=4k", leaky, "8M")
	// Refcount 1 for cluster 9, which nothing references: a leak.
	f, err := os.OpenFile(leaky, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt([]byte{0, 1}, 2*4096+9*2); err != nil {
		t.Fatal(err)
	}
	if err := f.Truncate(10 * 4096); err != nil {
		t.Fatal(err)
	}
	f.Close()
	if code, _ := exitCode(t, "qemu-img", "check", leaky); code != 3 {
		t.Fatalf("qemu-img check of the leaky image: exit %d, want 3", code)
	}
	rawImg := filepath.Join(dir, "r.raw")
	driverstest.Cmd(t, "qemu-img", "create", "-q", "-f", "raw", rawImg, "1M")
	for _, c := range []struct {
		img   string
		extra []string
		code  int
	}{{clean, nil, 0}, {leaky, nil, 3}, {leaky, []string{"--output=json"}, 3}} {
		loud := imgfuse(t, nil, append(append([]string{"check"}, c.extra...), c.img)...)
		r := imgfuse(t, nil, append(append([]string{"check", "-q"}, c.extra...), c.img)...)
		if loud.code != c.code || loud.stdout == "" {
			t.Errorf("check %v %s: %v, want exit %d and a report", c.extra, c.img, loud, c.code)
		}
		if r.code != c.code || r.stdout != "" || r.stderr != "" {
			t.Errorf("check -q %v %s: %v, want exit %d and no output", c.extra, c.img, r, c.code)
		}
	}
	if r := imgfuse(t, nil, "check", "-q", rawImg); r.code != 63 || r.stdout != "" || !strings.Contains(r.stderr, "does not support checks") {
		t.Errorf("check -q of a raw image: %v, want exit 63 and the error alone", r)
	}
	if r := imgfuse(t, nil, "check", "-q", filepath.Join(dir, "nope.qcow2")); r.code != 1 || !strings.Contains(r.stderr, "nope.qcow2") {
		t.Errorf("check -q of a missing image: %v, want exit 1 and the error", r)
	}
}
