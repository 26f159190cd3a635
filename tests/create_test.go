package tests

import (
	"bytes"
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
// takes writes.
func TestCreateLikeQemuImg(t *testing.T) {
	t.Parallel()
	requireE2E(t)
	cases := []struct {
		name  string
		args  []string // between "create" and IMAGE SIZE
		size  string
		mount bool // also mount and write (each mount costs a daemon)
	}{
		{"default", nil, "64M", true},
		{"cluster-4k-refcount-8", []string{"-o", "cluster_size=4k,refcount_bits=8"}, "64M", false},
		{"cluster-512-refcount-1", []string{"-o", "cluster_size=512,refcount_bits=1"}, "16M", true},
		{"cluster-2M-refcount-64", []string{"-o", "cluster_size=2M,refcount_bits=64"}, "1G", false},
		{"extended-l2", []string{"-o", "extended_l2=on"}, "64M", true},
		{"zstd", []string{"-o", "compression_type=zstd"}, "64M", false},
		{"lazy-refcounts", []string{"-o", "lazy_refcounts=on"}, "64M", false},
		{"compat-0.10", []string{"-o", "compat=0.10"}, "64M", true},
		{"compat-1.1-preallocation-off", []string{"-o", "compat=1.1", "-o", "preallocation=off"}, "64M", false},
		{"raw", []string{"-f", "raw"}, "64M", true},
		{"odd-size", nil, "12345678", false},
		{"fraction-size", nil, "1.3k", false}, // 1331 bytes, a 1536-byte disk
		{"hex-size-raw", []string{"-f", "raw"}, "0x201", false},
		{"data-file", []string{"-o", "data_file=img.data"}, "64M", true},
		{"data-file-raw", []string{"-o", "data_file=img.data,data_file_raw=on,extended_l2=on"}, "64M", false},
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
			qargs := append([]string{"create"}, c.args...)
			if len(c.args) == 0 || c.args[0] != "-f" {
				qargs = append(qargs, "-f", "qcow2")
			}
			qemu := exec.Command("qemu-img", append(qargs, "img", c.size)...)
			qemu.Dir = qdir // qemu-img creates a data file relative to its cwd
			out, err := qemu.CombinedOutput()
			if err != nil {
				t.Fatalf("qemu-img create: %v\n%s", err, out)
			}
			r := imgfuse(t, nil, append(append([]string{"create"}, c.args...), ours, c.size)...)
			if r.code != 0 {
				t.Fatalf("imgfuse create: %v", r)
			}
			// The same "Formatting 'img', fmt=... size=..." line (the
			// size as given, not rounded).
			if got := strings.ReplaceAll(r.stdout, ours, "img"); got != string(out) {
				t.Errorf("imgfuse create prints %q, qemu-img create %q", got, out)
			}
			compareFiles(t, ours, theirs)
			// QEMU opens a relative data file name from its working
			// directory (imgfuse from the image's): run it from odir.
			dataFile := strings.Contains(strings.Join(c.args, " "), "data_file")
			clean := func() {
				t.Helper()
				if len(c.args) > 1 && c.args[0] == "-f" && c.args[1] == "raw" {
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
			qio := exec.Command("qemu-io", "-f", map[bool]string{true: "raw", false: "qcow2"}[c.name == "raw"],
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
