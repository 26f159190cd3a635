package tests

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"reflect"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"imgfuse/drivers/driverstest"
)

// The scripting interface: `imgfuse info|map|check --output=json` against
// qemu-img's, on a matrix of images qemu-img and qemu-io build. What
// qemu-img prints, imgfuse must print with the same values; imgfuse may add
// keys of its own (under "imgfuse").

// compatImage is one image of the matrix: build makes it in dir and returns
// the path to give both tools.
type compatImage struct {
	name  string
	chain bool // compare info --backing-chain
	build func(t *testing.T, dir string) string
}

func qi(t *testing.T, dir string, args ...string) {
	t.Helper()
	driverstest.Cmd(t, "qemu-img", args...)
}

func qio(t *testing.T, img string, cmds ...string) {
	t.Helper()
	var args []string
	for _, c := range cmds {
		args = append(args, "-c", c)
	}
	driverstest.Cmd(t, "qemu-io", append(args, img)...)
}

// qcowWithData creates a 32 MiB qcow2 image with opts and writes data,
// zeros and (if the format allows) a compressed cluster into it.
func qcowWithData(t *testing.T, dir, name, opts string) string {
	img := filepath.Join(dir, name)
	args := []string{"create", "-q", "-f", "qcow2"}
	if opts != "" {
		args = append(args, "-o", opts)
	}
	qi(t, dir, append(args, img, "32M")...)
	qio(t, img, "write -P 0x11 0 192k", "write -z 1M 128k", "write -P 0x22 4M 4k")
	return img
}

var compatMatrix = []compatImage{
	{"plain", false, func(t *testing.T, dir string) string { return qcowWithData(t, dir, "plain.qcow2", "") }},
	// Metadata preallocation: every cluster has an L2 entry and a
	// refcount but no block in the file; map reports those runs as zero
	// (QEMU's guess, README: map), in JSON and left out of the human map.
	{"prealloc-metadata", false, func(t *testing.T, dir string) string {
		return qcowWithData(t, dir, "prealloc.qcow2", "preallocation=metadata")
	}},
	{"compressed-zlib", false, func(t *testing.T, dir string) string {
		img := qcowWithData(t, dir, "zlib.qcow2", "")
		qio(t, img, "write -c -P 0x33 8M 64k")
		return img
	}},
	{"zstd", false, func(t *testing.T, dir string) string {
		img := qcowWithData(t, dir, "zstd.qcow2", "compression_type=zstd")
		qio(t, img, "write -c -P 0x33 8M 64k", "write -c -P 0x34 8256k 64k")
		return img
	}},
	{"extended-l2", false, func(t *testing.T, dir string) string {
		img := qcowWithData(t, dir, "ext.qcow2", "extended_l2=on,cluster_size=64k")
		qio(t, img, "write -P 0x44 10M 2k", "write -P 0x45 10280k 4k", "write -z 12M 8k")
		return img
	}},
	{"extended-l2-over-backing", true, func(t *testing.T, dir string) string {
		base := qcowWithData(t, dir, "xbase.qcow2", "")
		top := filepath.Join(dir, "xtop.qcow2")
		qi(t, dir, "create", "-q", "-f", "qcow2", "-o", "extended_l2=on", "-b", base, "-F", "qcow2", top)
		qio(t, top, "write -P 0x46 64k 2k", "write -z 4M 2k")
		return top
	}},
	{"compat-0.10", false, func(t *testing.T, dir string) string {
		img := filepath.Join(dir, "v2.qcow2")
		qi(t, dir, "create", "-q", "-f", "qcow2", "-o", "compat=0.10", img, "32M")
		qio(t, img, "write -P 0x11 0 128k", "write -z 1M 64k")
		return img
	}},
	{"lazy-refcounts", false, func(t *testing.T, dir string) string {
		return qcowWithData(t, dir, "lazy.qcow2", "lazy_refcounts=on,refcount_bits=8,cluster_size=4k")
	}},
	{"data-file", false, func(t *testing.T, dir string) string {
		return qcowWithData(t, dir, "df.qcow2", "data_file="+filepath.Join(dir, "df.data")+",data_file_raw=on")
	}},
	{"snapshot", false, func(t *testing.T, dir string) string {
		img := qcowWithData(t, dir, "snap.qcow2", "")
		qi(t, dir, "snapshot", "-c", "first", img)
		qio(t, img, "write -P 0x55 0 64k")
		qi(t, dir, "snapshot", "-c", "second", img)
		return img
	}},
	{"bitmaps", false, func(t *testing.T, dir string) string {
		img := qcowWithData(t, dir, "bitmaps.qcow2", "")
		qi(t, dir, "bitmap", "--add", img, "b0")
		qi(t, dir, "bitmap", "--add", "-g", "128k", "--disable", img, "second")
		return img
	}},
	{"overlay-chain", true, func(t *testing.T, dir string) string {
		base := filepath.Join(dir, "base.raw")
		qi(t, dir, "create", "-q", "-f", "raw", base, "16M")
		qio(t, base, "write -P 0x66 0 1M")
		mid := filepath.Join(dir, "mid.qcow2")
		qi(t, dir, "create", "-q", "-f", "qcow2", "-b", "base.raw", "-F", "raw", mid, "32M")
		qio(t, mid, "write -P 0x77 512k 128k", "write -z 2M 64k")
		top := filepath.Join(dir, "top.qcow2")
		qi(t, dir, "create", "-q", "-f", "qcow2", "-b", "mid.qcow2", "-F", "qcow2", top)
		qio(t, top, "write -P 0x88 576k 4k")
		return top
	}},
	{"missing-backing", false, func(t *testing.T, dir string) string {
		img := filepath.Join(dir, "orphan.qcow2")
		qi(t, dir, "create", "-q", "-u", "-f", "qcow2", "-b", "gone.qcow2", "-F", "qcow2", img, "32M")
		return img
	}},
	{"missing-data-file", false, func(t *testing.T, dir string) string {
		// qemu-img info describes it without the data file; check and
		// map cannot open it, with either tool.
		img, data := filepath.Join(dir, "nodata.qcow2"), filepath.Join(dir, "nodata.raw")
		qi(t, dir, "create", "-q", "-f", "qcow2", "-o", "data_file="+data, img, "32M")
		qio(t, img, "write -P 0x5a 0 1M")
		if err := os.Remove(data); err != nil {
			t.Fatal(err)
		}
		return img
	}},
	{"raw-with-holes", false, func(t *testing.T, dir string) string {
		img := filepath.Join(dir, "holes.raw")
		qi(t, dir, "create", "-q", "-f", "raw", img, "32M")
		qio(t, img, "write -P 0x99 1M 64k", "write -P 0x9a 20M 1M")
		return img
	}},
	{"raw-odd-size", false, func(t *testing.T, dir string) string {
		// QEMU counts whole sectors: 1000 bytes are a 1024-byte disk.
		img := filepath.Join(dir, "odd.raw")
		if err := os.WriteFile(img, bytes.Repeat([]byte{0x9b}, 1000), 0o644); err != nil {
			t.Fatal(err)
		}
		return img
	}},
	{"overlay-on-odd-raw", false, func(t *testing.T, dir string) string {
		// The base's tail [1000, 1024) is the base's (depth 1) for QEMU.
		if err := os.WriteFile(filepath.Join(dir, "odd.raw"), bytes.Repeat([]byte{0x9c}, 1000), 0o644); err != nil {
			t.Fatal(err)
		}
		img := filepath.Join(dir, "over-odd.qcow2")
		qi(t, dir, "create", "-q", "-f", "qcow2", "-b", "odd.raw", "-F", "raw", img, "64k")
		return img
	}},
}

// decodeJSON decodes out into a generic value, failing t if it is not JSON.
func decodeJSON(t *testing.T, what string, out []byte) any {
	t.Helper()
	var v any
	if err := json.Unmarshal(out, &v); err != nil {
		t.Fatalf("%s: not JSON: %v\n%s", what, err, out)
	}
	return v
}

// sameShared fails t where ours lacks a key of qemu's, or has a different
// value for it, recursively through objects and arrays (arrays must have
// the same length), or has a key qemu-img does not print other than
// "imgfuse", where its own fields go.
func sameShared(t *testing.T, path string, ours, qemu any) {
	t.Helper()
	switch q := qemu.(type) {
	case map[string]any:
		o, ok := ours.(map[string]any)
		if !ok {
			t.Errorf("%s: imgfuse has %v, qemu-img an object %v", path, ours, q)
			return
		}
		for k, ov := range o {
			if _, ok := q[k]; !ok && k != "imgfuse" {
				t.Errorf("%s.%s: imgfuse prints it, qemu-img does not (imgfuse's own fields go under \"imgfuse\"): %v", path, k, ov)
			}
		}
		for k, qv := range q {
			ov, ok := o[k]
			if !ok {
				t.Errorf("%s.%s: missing from imgfuse's output (qemu-img: %v)", path, k, qv)
				continue
			}
			sameShared(t, path+"."+k, ov, qv)
		}
	case []any:
		o, ok := ours.([]any)
		if !ok || len(o) != len(q) {
			t.Errorf("%s: imgfuse has %v, qemu-img %v", path, ours, q)
			return
		}
		for i := range q {
			sameShared(t, path+"["+string(rune('0'+i%10))+"]", o[i], q[i])
		}
	default:
		if !reflect.DeepEqual(ours, qemu) {
			t.Errorf("%s: imgfuse %v, qemu-img %v", path, ours, qemu)
		}
	}
}

func TestQemuCompatInfoMapCheck(t *testing.T) {
	t.Parallel()
	requireE2E(t)
	for _, c := range compatMatrix {
		t.Run(c.name, func(t *testing.T) {
			t.Parallel()
			dir := t.TempDir()
			img := c.build(t, dir)

			infoArgs := []string{"info", "--output=json"}
			if c.chain {
				infoArgs = append(infoArgs, "--backing-chain")
			}
			want := driverstest.Cmd(t, "qemu-img", append(append(infoArgs, "-U"), img)...)
			r := imgfuse(t, nil, append(infoArgs, img)...)
			if r.code != 0 {
				t.Fatalf("imgfuse info: %v", r)
			}
			sameShared(t, "info", decodeJSON(t, "imgfuse info", []byte(r.stdout)), decodeJSON(t, "qemu-img info", want))

			if c.name == "missing-data-file" {
				// check keeps qemu-img's exit codes (1: could not
				// check); map has imgfuse's (3: cannot be opened).
				for cmd, want := range map[string]int{"check": 1, "map": 3} {
					if code, _ := exitCode(t, "qemu-img", cmd, img); code == 0 {
						t.Errorf("qemu-img %s opened the image without its data file", cmd)
					}
					if r := imgfuse(t, nil, cmd, img); r.code != want || !strings.Contains(r.stderr, "nodata.raw: no such file") {
						t.Errorf("%s without the data file: want exit %d\n%v", cmd, want, r)
					}
				}
				return
			}
			if c.name != "missing-backing" { // qemu-img map needs the chain
				// Both look into the file's holes (SEEK_DATA), where the
				// page cache decides too: an unwritten extent whose pages
				// some reader cached counts as data. Each starts with none.
				dropPageCache(t, img)
				want = driverstest.Cmd(t, "qemu-img", "map", "--output=json", "-U", img)
				dropPageCache(t, img)
				r = imgfuse(t, nil, "map", "--output=json", img)
				if r.code != 0 || r.stdout != string(want) {
					t.Errorf("map differs from qemu-img map:\nimgfuse (exit %d):\n%s%s\nqemu-img:\n%s", r.code, r.stdout, r.stderr, want)
				}
				compareHumanMap(t, c.name, img)
				if c.chain {
					// Windows that start and end inside runs, in qemu-img's
					// size syntax, empty, and past the end.
					for _, win := range [][]string{
						{"--start-offset=100000", "--max-length=3000000"},
						{"--start-offset=1k", "--max-length=0x1000"},
						{"--start-offset=1M", "--max-length=0"},
						{"--start-offset=1G"},
					} {
						want = driverstest.Cmd(t, "qemu-img", append(append([]string{"map", "--output=json", "-U"}, win...), img)...)
						r = imgfuse(t, nil, append(append([]string{"map", "--output=json"}, win...), img)...)
						if r.code != 0 || r.stdout != string(want) {
							t.Errorf("map %v differs from qemu-img map:\nimgfuse (exit %d):\n%s%s\nqemu-img:\n%s", win, r.code, r.stdout, r.stderr, want)
						}
					}
				}
			}

			if filepath.Ext(img) == ".raw" {
				code, _ := exitCode(t, "qemu-img", "check", img)
				if r := imgfuse(t, nil, "check", img); r.code != code {
					t.Errorf("check of a raw image: exit %d, qemu-img check: %d\n%v", r.code, code, r)
				}
				return
			}
			if c.name == "missing-backing" {
				// qemu-img check cannot open it; imgfuse's needs no
				// backing file.
				if r := imgfuse(t, nil, "check", img); r.code != 0 {
					t.Errorf("check: %v", r)
				}
				return
			}
			compareCheck(t, img, 0)
		})
	}
}

// compareCheck runs both checkers on img, expects exit code want from both
// and the same JSON for the keys qemu-img prints (filename aside).
func compareCheck(t *testing.T, img string, want int) {
	t.Helper()
	qcode, qout := exitCode(t, "qemu-img", "check", "--output=json", "-U", img)
	r := imgfuse(t, nil, "check", "--output=json", img)
	if qcode != want || r.code != want {
		t.Fatalf("check exit codes: imgfuse %d, qemu-img %d, want %d\nimgfuse: %v\nqemu-img: %s", r.code, qcode, want, r, qout)
	}
	// qemu-img prints its JSON on stdout and messages on stderr; exitCode
	// combined them, so take the JSON object alone.
	qjson := qout[indexByte(qout, '{'):]
	q := decodeJSON(t, "qemu-img check", []byte(qjson)).(map[string]any)
	o := decodeJSON(t, "imgfuse check", []byte(r.stdout)).(map[string]any)
	delete(q, "filename")
	delete(o, "filename")
	sameShared(t, "check", o, q)

	// The human output too: messages on stderr, one per leaked or
	// damaged cluster, and the summary on stdout.
	var qstdout, qstderr bytes.Buffer
	qc := exec.Command("qemu-img", "check", "-U", img)
	qc.Stdout, qc.Stderr = &qstdout, &qstderr
	_ = qc.Run()
	if h := imgfuse(t, nil, "check", img); h.stdout != qstdout.String() || h.stderr != qstderr.String() {
		t.Errorf("check differs from qemu-img check:\nimgfuse stdout:\n%s\nqemu-img stdout:\n%s\nimgfuse stderr (%d bytes), qemu-img stderr (%d bytes)",
			h.stdout, qstdout.String(), len(h.stderr), qstderr.Len())
	}
}

func indexByte(s string, b byte) int {
	for i := 0; i < len(s); i++ {
		if s[i] == b {
			return i
		}
	}
	return 0
}

// setRefcount sets the 16-bit refcount of host cluster c of a qcow2 image
// with one refcount block (the images here are small).
func setRefcount(t *testing.T, img string, c int64, v uint16) {
	t.Helper()
	f, err := os.OpenFile(img, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var b [8]byte
	if _, err := f.ReadAt(b[:], 48); err != nil {
		t.Fatal(err)
	}
	reftable := int64(binary.BigEndian.Uint64(b[:]))
	if _, err := f.ReadAt(b[:], reftable); err != nil {
		t.Fatal(err)
	}
	block := int64(binary.BigEndian.Uint64(b[:]))
	binary.BigEndian.PutUint16(b[:2], v)
	if _, err := f.WriteAt(b[:2], block+2*c); err != nil {
		t.Fatal(err)
	}
}

// TestQemuCompatCheckRepair damages copies of a qemu-img-made image the way
// crashes and bugs do, compares the verdicts and counts with qemu-img
// check's, repairs with imgfuse check -r, and has qemu-img check the
// result.
func TestQemuCompatCheckRepair(t *testing.T) {
	t.Parallel()
	requireE2E(t)
	// 64 KiB clusters: header 0, reftable 1, refblock 2, L1 3, L2 4, data
	// from 5 on.
	cases := []struct {
		name    string
		cluster int64
		value   uint16
		code    int    // of both checkers before the repair
		repair  string // -r value that makes the image clean
		n       int64  // clusters from cluster on given value (0: 1)
		dirty   bool   // a lazy-refcounts image left dirty by a crash
	}{
		{"leak", 0, 2, 3, "leaks", 0, false},
		{"leaked-free-cluster", 40, 1, 3, "leaks", 0, false}, // past the end of the file's clusters in use
		{"corruption", 6, 0, 2, "all", 0, false},
		{"shared-data-cluster", 5, 2, 2, "all", 0, false}, // a leak, and COPIED set with refcount 2
		{"l2-refcount-zero", 4, 0, 2, "all", 0, false},
		{"many-leaks", 16, 1, 3, "leaks", 300, false}, // qemu-img names every one
		// The repair reports the leaks a crash left (not rebuilt
		// silently at open) and clears the dirty bit.
		{"dirty-lazy-leak", 0, 2, 3, "leaks", 0, true},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			dir := t.TempDir()
			img := filepath.Join(dir, "img.qcow2")
			if tc.dirty {
				qi(t, dir, "create", "-q", "-f", "qcow2", "-o", "lazy_refcounts=on", img, "32M")
			} else {
				qi(t, dir, "create", "-q", "-f", "qcow2", img, "32M")
			}
			qio(t, img, "write -P 0x11 0 256k")
			if tc.dirty {
				driverstest.OrByte(t, img, 72+7, 1) // incompatible feature bit 0: dirty
			}
			if tc.cluster >= 16 {
				// Give the file room so the clusters are inside it.
				if err := os.Truncate(img, (tc.cluster+max(tc.n, 1))<<16); err != nil {
					t.Fatal(err)
				}
			}
			for c := tc.cluster; c < tc.cluster+max(tc.n, 1); c++ {
				setRefcount(t, img, c, tc.value)
			}
			compareCheck(t, img, tc.code)

			// Each repair on its own copies, by both tools: same exit
			// code, same counts fixed.
			for _, mode := range []string{"leaks", "all"} {
				// The human output of the repair: the same messages
				// (which clusters were repaired, the COPIED flags after
				// the refcount fixes, the old refcount structure freed
				// by a rebuild) and summary.
				ours, theirs := filepath.Join(dir, "ours-h-"+mode), filepath.Join(dir, "theirs-h-"+mode)
				driverstest.Cmd(t, "cp", img, ours)
				driverstest.Cmd(t, "cp", img, theirs)
				var qstdout, qstderr bytes.Buffer
				qc := exec.Command("qemu-img", "check", "-r", mode, theirs)
				qc.Stdout, qc.Stderr = &qstdout, &qstderr
				qerr := qc.Run()
				h := imgfuse(t, nil, "check", "-r", mode, ours)
				// A failed repair ends with each tool's own error line.
				qmsgs, omsgs := qstderr.String(), h.stderr
				if qerr != nil {
					qmsgs, omsgs = withoutLastLine(qmsgs), withoutLastLine(omsgs)
				}
				if h.stdout != qstdout.String() || omsgs != qmsgs {
					t.Errorf("check -r %s differs from qemu-img's:\nimgfuse:\n%s%s\nqemu-img:\n%s%s", mode, h.stderr, h.stdout, qstderr.String(), qstdout.String())
				}

				ours, theirs = filepath.Join(dir, "ours-"+mode), filepath.Join(dir, "theirs-"+mode)
				driverstest.Cmd(t, "cp", img, ours)
				driverstest.Cmd(t, "cp", img, theirs)
				qcode, qout := exitCode(t, "qemu-img", "check", "--output=json", "-r", mode, theirs)
				r := imgfuse(t, nil, "check", "--output=json", "-r", mode, ours)
				if r.code != qcode {
					t.Errorf("check -r %s: exit %d, qemu-img %d\nimgfuse: %v\nqemu-img: %s", mode, r.code, qcode, r, qout)
					continue
				}
				if qcode == 1 {
					// The check failed (a rebuild -r leaks may not do):
					// no result to compare.
					if r.stdout != "" {
						t.Errorf("check -r %s failed but printed %q", mode, r.stdout)
					}
					continue
				}
				q := decodeJSON(t, "qemu-img check -r", []byte(qout[indexByte(qout, '{'):])).(map[string]any)
				o := decodeJSON(t, "imgfuse check -r", []byte(r.stdout)).(map[string]any)
				delete(q, "filename")
				delete(o, "filename") // the copies' names differ
				sameShared(t, "check -r "+mode, o, q)
				if mode == tc.repair {
					if r.code != 0 {
						t.Errorf("check -r %s leaves the image unclean: %v", mode, r)
					}
					requireClean(t, ours)
					info := decodeJSON(t, "qemu-img info", driverstest.Cmd(t, "qemu-img", "info", "--output=json", ours)).(map[string]any)
					if info["dirty-flag"] != false {
						t.Errorf("check -r %s leaves the dirty bit: %v", mode, info["dirty-flag"])
					}
				}
			}
		})
	}
}

// TestCheckProgressOnlyOnTerminal: check shows a progress bar for a large
// image on a terminal (script(1) provides one) and none otherwise.
func TestCheckProgressOnlyOnTerminal(t *testing.T) {
	requireE2E(t, "script")
	t.Parallel()
	img := filepath.Join(t.TempDir(), "big.qcow2")
	qi(t, "", "create", "-q", "-f", "qcow2", img, "8G")
	qio(t, img, "write 0 1M", "write 7G 1M")
	out := driverstest.Cmd(t, "script", "-qec", imgfuseBin+" check "+img, "/dev/null")
	if !strings.Contains(string(out), "checking") || !strings.Contains(string(out), "No errors were found") {
		t.Errorf("on a terminal: no progress bar or no verdict:\n%q", out)
	}
	r := imgfuse(t, nil, "check", img)
	if r.code != 0 || strings.Contains(r.stdout+r.stderr, "checking") {
		t.Errorf("without a terminal: %v", r)
	}
}

// TestCheckRepairClearsCorruptBit: like qemu-img check -r, a repair that
// leaves no corruption clears the corrupt bit of an image marked corrupt
// (which otherwise mounts read-only only).
func TestCheckRepairClearsCorruptBit(t *testing.T) {
	requireE2E(t)
	t.Parallel()
	img := filepath.Join(t.TempDir(), "marked.qcow2")
	qi(t, "", "create", "-q", "-f", "qcow2", img, "32M")
	qio(t, img, "write -P 0x11 0 128k")
	driverstest.OrByte(t, img, 72+7, 0x02) // incompatible bit 1: corrupt
	compareCheck(t, img, 0)
	if r := imgfuse(t, nil, "check", "-r", "leaks", img); r.code != 0 {
		t.Fatalf("check -r leaks: %v", r)
	}
	info := decodeJSON(t, "qemu-img info", driverstest.Cmd(t, "qemu-img", "info", "--output=json", img)).(map[string]any)
	data := info["format-specific"].(map[string]any)["data"].(map[string]any)
	if data["corrupt"] != false {
		t.Errorf("corrupt bit still set after check -r: %v", data)
	}
	requireClean(t, img)
}

// withoutLastLine drops the last line of s.
func withoutLastLine(s string) string {
	s = strings.TrimSuffix(s, "\n")
	if i := strings.LastIndexByte(s, '\n'); i >= 0 {
		return s[:i+1]
	}
	return ""
}

// compareHumanMap compares `imgfuse map` with `qemu-img map` in their
// human output, byte for byte. qemu-img refuses to print a human map of an
// image with compressed clusters (they have no offset to print); imgfuse
// leaves them out and prints the rest: there only its exit status is
// checked (the JSON map, compared above, covers those runs).
func compareHumanMap(t *testing.T, name, img string) {
	t.Helper()
	code, want := exitCode(t, "qemu-img", "map", "-U", img)
	r := imgfuse(t, nil, "map", img)
	if code != 0 {
		if !strings.Contains(want, "compressed clusters") {
			t.Fatalf("qemu-img map (human) of %s: exit %d: %s", name, code, want)
		}
		if r.code != 0 {
			t.Fatalf("imgfuse map (human) of an image with compressed clusters: %v", r)
		}
		return
	}
	if r.code != 0 || r.stdout != want {
		t.Errorf("human map of %s differs from qemu-img map:\nimgfuse (exit %d):\n%s%s\nqemu-img:\n%s", name, r.code, r.stdout, r.stderr, want)
	}
}

// dropPageCache writes back and drops the page cache of the file at path,
// so that SEEK_DATA answers from the file's extents alone: ext4 reports
// an unwritten (fallocated) extent as data where its pages are cached.
func dropPageCache(t *testing.T, path string) {
	t.Helper()
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer unix.Close(fd)
	if err := unix.Fdatasync(fd); err != nil {
		t.Fatal(err)
	}
	if err := unix.Fadvise(fd, 0, 0, unix.FADV_DONTNEED); err != nil {
		t.Fatal(err)
	}
}
