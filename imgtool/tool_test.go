package imgtool

import (
	"bytes"
	"encoding/json"
	"os"
	"path/filepath"
	"reflect"
	"runtime/debug"
	"strconv"
	"strings"
	"testing"
)

func TestShellQuote(t *testing.T) {
	for in, want := range map[string]string{
		"/tmp/a-b_c.d": "/tmp/a-b_c.d",
		"/a b":         "'/a b'",
		"it's":         `'it'\''s'`,
		"":             "''",
	} {
		if got := ShellQuote(in); got != want {
			t.Errorf("shellQuote(%q) = %s, want %s", in, got, want)
		}
	}
}

func TestParseSize(t *testing.T) {
	for _, tt := range []struct {
		in   string
		want int64
		ok   bool
	}{
		{"0", 0, true}, {"512", 512, true}, {"64k", 64 << 10, true}, {"64K", 64 << 10, true},
		{"10G", 10 << 30, true}, {"1.5M", 3 << 19, true}, {"2T", 2 << 40, true}, {"100b", 100, true},
		{"", 0, false}, {"-1", 0, false}, {"k", 0, false}, {"1x", 0, false}, {"9E", 0, false},
		// As qemu-img: hexadecimal without suffix, no exponent, no
		// fraction of bytes.
		{"0x1000", 4096, true}, {"0X1f", 31, true}, {"0x10k", 0, false}, {"0x1.5", 0, false},
		{"1e3", 0, false}, {"1.5", 0, false}, {"1.5b", 0, false}, {"1 G", 0, false}, {"+1", 0, false},
		{"0.5M", 1 << 19, true}, {"1.", 1, true}, {"512.0", 512, true}, {"1.k", 1024, true},
		{"1.3k", 1331, true}, {"1.99999k", 2048, true}, // rounded to the nearest byte
	} {
		got, err := ParseSize(tt.in)
		if (err == nil) != tt.ok || got != tt.want {
			t.Errorf("parseSize(%q) = %d, %v; want %d, ok=%v", tt.in, got, err, tt.want, tt.ok)
		}
	}
}

func TestCreateOptionsParse(t *testing.T) {
	o, err := ParseCreateOptions("cluster_size=4k,refcount_bits=8,lazy_refcounts=on,extended_l2=off,compression_type=zstd,compat=1.1,preallocation=off")
	if err != nil || o.ClusterSize != 4096 || o.RefcountBits != 8 || !o.LazyRefcounts || o.ExtendedL2 || o.CompressionType != "zstd" || o.Compat != "1.1" {
		t.Errorf("parse: %+v, %v", o, err)
	}
	if o, err := ParseCreateOptions("size=1000,backing_file=b.qcow2,backing_fmt=qcow2"); err != nil || o.Size != 1000 || o.BackingFile != "b.qcow2" || o.BackingFormat != "qcow2" {
		t.Errorf("size/backing options: %+v, %v", o, err)
	}
	for _, mode := range []string{"off", "metadata", "falloc", "full"} {
		if o, err := ParseCreateOptions("preallocation=" + mode); err != nil || o.Preallocation != mode {
			t.Errorf("preallocation=%s: %+v, %v", mode, o, err)
		}
	}
	if o, _ := ParseCreateOptions(""); o.Size != -1 {
		t.Errorf("no size option: Size %d, want -1", o.Size)
	}
	for _, bad := range []string{"cluster_size", "bogus=1", "lazy_refcounts=maybe", "preallocation=sparse", "cluster_size=x"} {
		if _, err := ParseCreateOptions(bad); Code(err) != ExitUsage {
			t.Errorf("%q: err %v is not a usage error", bad, err)
		}
	}
}

func FuzzParseSize(f *testing.F) {
	for _, s := range []string{"0", "64k", "1.5G", "9E", "-1", "1e3", "NaN", "Inf"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		n, err := ParseSize(s)
		if err == nil && n < 0 {
			t.Fatalf("parseSize(%q) = %d", s, n)
		}
	})
}

func FuzzCreateOptions(f *testing.F) {
	f.Add("cluster_size=4k,refcount_bits=8")
	f.Add("compat=0.10,lazy_refcounts=on")
	f.Add(",=,")
	f.Fuzz(func(t *testing.T, s string) {
		if _, err := ParseCreateOptions(s); err != nil && Code(err) != ExitUsage {
			t.Fatalf("%q: %v is not a usage error", s, err)
		}
	})
}

func TestHumanSize(t *testing.T) {
	tests := []struct {
		n    int64
		want string
	}{
		{0, "0 B"},
		{512, "512 B"},
		{999, "999 B"},
		{1000, "0.977 KiB"},
		{1024, "1 KiB"},
		{82343, "80.4 KiB"},
		{8 << 20, "8 MiB"},
		{10<<30 + 512<<20, "10.5 GiB"},
		{1 << 40, "1 TiB"},
	}
	for _, tt := range tests {
		if got := HumanSize(tt.n); got != tt.want {
			t.Errorf("humanSize(%d) = %q, want %q", tt.n, got, tt.want)
		}
	}
}

func TestVMClock(t *testing.T) {
	if got := vmClock(3723_004_000_000); got != "01:02:03.004" {
		t.Errorf("vmClock = %q", got)
	}
}

func TestWriteJSONTreeKeepsOrder(t *testing.T) {
	var b strings.Builder
	raw := `{"zeta":1,"alpha":{"bits":3,"names":["dirty","corrupt"]},"nested":{"b-c":true,"a":[1,2]},"empty":{"bits":0}}`
	if err := writeJSONTree(&b, []byte(raw), 1); err != nil {
		t.Fatal(err)
	}
	want := "    zeta: 1\n    alpha: 0x3 (dirty, corrupt)\n    nested:\n        b c: true\n        a: [1, 2]\n    empty: 0x0\n"
	if b.String() != want {
		t.Errorf("got\n%s\nwant\n%s", b.String(), want)
	}
}

func TestVersion(t *testing.T) {
	bi := &debug.BuildInfo{GoVersion: "go1.99.1", Settings: []debug.BuildSetting{
		{Key: "vcs", Value: "git"}, {Key: "vcs.revision", Value: "0123abcd"}, {Key: "vcs.modified", Value: "true"},
	}}
	var b bytes.Buffer
	if err := WriteVersion(&b, VersionOf("1.2.3", bi), false); err != nil {
		t.Fatal(err)
	}
	if want := "imgfuse 1.2.3\ncommit: 0123abcd (with uncommitted changes)\ngo: go1.99.1\n"; b.String() != want {
		t.Errorf("version:\n%s\nwant:\n%s", b.String(), want)
	}
	b.Reset()
	if err := WriteVersion(&b, VersionOf("1.2.3", bi), true); err != nil {
		t.Fatal(err)
	}
	var got map[string]any
	if err := json.Unmarshal(b.Bytes(), &got); err != nil {
		t.Fatal(err)
	}
	if got["version"] != "1.2.3" || got["commit"] != "0123abcd" || got["modified"] != true || got["go"] != "go1.99.1" || len(got) != 4 {
		t.Errorf("version --output=json: %v", got)
	}
	// Built outside a repository: no commit, modified unknown.
	b.Reset()
	if err := WriteVersion(&b, VersionOf("1.2.3", &debug.BuildInfo{GoVersion: "go1.99.1"}), true); err != nil {
		t.Fatal(err)
	}
	got = nil
	if err := json.Unmarshal(b.Bytes(), &got); err != nil {
		t.Fatal(err)
	}
	if got["commit"] != "" || got["modified"] != nil {
		t.Errorf("version --output=json without VCS stamps: %v", got)
	}
}

// TestFindLockHolders: the processes with the image open are found from a
// /proc tree by their descriptors' links; an imgfuse server is known by
// its command line, with its mountpoint.
func TestFindLockHolders(t *testing.T) {
	dir := t.TempDir()
	img := filepath.Join(dir, "img.qcow2")
	if err := os.WriteFile(img, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	proc := filepath.Join(dir, "proc")
	fake := func(pid, comm, cmdline string, fds ...string) {
		for i, target := range fds {
			fd := filepath.Join(proc, pid, "fd")
			if err := os.MkdirAll(fd, 0o755); err != nil {
				t.Fatal(err)
			}
			if err := os.Symlink(target, filepath.Join(fd, strconv.Itoa(i))); err != nil {
				t.Fatal(err)
			}
		}
		os.WriteFile(filepath.Join(proc, pid, "comm"), []byte(comm+"\n"), 0o644)
		os.WriteFile(filepath.Join(proc, pid, "cmdline"), []byte(cmdline), 0o644)
	}
	fake("10", "qemu-system-x86", "qemu-system-x86_64\x00-hda\x00img.qcow2\x00", "/dev/null", img)
	fake("11", "exe", "/usr/bin/imgfuse\x00mount\x00--\x00"+img+"\x00/no/such/mnt\x00", img)
	fake("12", "cat", "cat\x00other\x00", "/dev/null")
	fake("13", "self", "imgfuse\x00check\x00img.qcow2\x00", img)
	hs := findLockHolders(proc, img, 13)
	want := []lockHolder{{pid: 10, name: "qemu-system-x86"}, {pid: 11, name: "imgfuse", mountpoint: "/no/such/mnt"}}
	if !reflect.DeepEqual(hs, want) {
		t.Errorf("findLockHolders = %+v, want %+v", hs, want)
	}
	for cmdline, want := range map[string]string{
		"/tmp/x/imgfuse\x00mount\x00--\x00/i\x00/m\x00":   "/m",
		"imgfuse\x00mount\x00-r\x00/i\x00/m\x00":          "",
		"imgfuse\x00mount\x00--\x00/i\x00/m\x00extra\x00": "",
		"imgfuse\x00unmount\x00--\x00/i\x00/m\x00":        "",
	} {
		if got, _ := serverMountpoint([]byte(cmdline)); got != want {
			t.Errorf("serverMountpoint(%q) = %q, want %q", cmdline, got, want)
		}
	}
}
