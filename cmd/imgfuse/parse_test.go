package main

import (
	"errors"
	"strings"
	"testing"
)

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
		got, err := parseSize(tt.in)
		if (err == nil) != tt.ok || got != tt.want {
			t.Errorf("parseSize(%q) = %d, %v; want %d, ok=%v", tt.in, got, err, tt.want, tt.ok)
		}
	}
}

func TestCreateOptionsParse(t *testing.T) {
	o, err := parseCreateOptions("cluster_size=4k,refcount_bits=8,lazy_refcounts=on,extended_l2=off,compression_type=zstd,compat=1.1,preallocation=off")
	if err != nil || o.ClusterSize != 4096 || o.RefcountBits != 8 || !o.LazyRefcounts || o.ExtendedL2 || o.CompressionType != "zstd" || o.Compat != "1.1" {
		t.Errorf("parse: %+v, %v", o, err)
	}
	if o, err := parseCreateOptions("size=1000,backing_file=b.qcow2,backing_fmt=qcow2"); err != nil || o.Size != 1000 || o.BackingFile != "b.qcow2" || o.BackingFormat != "qcow2" {
		t.Errorf("size/backing options: %+v, %v", o, err)
	}
	if o, _ := parseCreateOptions(""); o.Size != -1 {
		t.Errorf("no size option: Size %d, want -1", o.Size)
	}
	for _, bad := range []string{"cluster_size", "bogus=1", "lazy_refcounts=maybe", "preallocation=full", "cluster_size=x"} {
		if _, err := parseCreateOptions(bad); exitCode(err) != exitUsage {
			t.Errorf("%q: err %v is not a usage error", bad, err)
		}
	}
}

func TestReportRoundTrip(t *testing.T) {
	err := decodeReport(encodeReport(codedError{exitLocked, errors.New("open x: locked")}))
	if exitCode(err) != exitLocked || err.Error() != "open x: locked" {
		t.Errorf("round trip: %v (code %d)", err, exitCode(err))
	}
	if err := decodeReport("plain message"); exitCode(err) != exitFailure || err.Error() != "plain message" {
		t.Errorf("uncoded report: %v", err)
	}
}

func FuzzParseSize(f *testing.F) {
	for _, s := range []string{"0", "64k", "1.5G", "9E", "-1", "1e3", "NaN", "Inf"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		n, err := parseSize(s)
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
		if _, err := parseCreateOptions(s); err != nil && exitCode(err) != exitUsage {
			t.Fatalf("%q: %v is not a usage error", s, err)
		}
	})
}

func FuzzDecodeReport(f *testing.F) {
	f.Add("E4 open x: locked")
	f.Add("E99 x")
	f.Add("E2 x")
	f.Fuzz(func(t *testing.T, s string) {
		err := decodeReport(s)
		if c := exitCode(err); c <= exitUsage && c != exitFailure {
			t.Fatalf("%q: code %d", s, c)
		}
		if !strings.Contains(s, strings.TrimSpace(err.Error())) {
			t.Fatalf("%q: message %q lost", s, err)
		}
	})
}

func TestCompletionAndVersion(t *testing.T) {
	for _, sh := range []string{"bash", "zsh", "fish"} {
		code, out, stderr := runCLI(t, "completion", sh)
		if code != exitOK || !strings.Contains(out, "imgfuse") {
			t.Errorf("completion %s: exit %d, %d bytes, %s", sh, code, len(out), stderr)
		}
	}
	code, out, _ := runCLI(t, "version")
	if code != exitOK || out != "imgfuse "+version+"\n" {
		t.Errorf("version: exit %d, %q", code, out)
	}
	code, out, _ = runCLI(t, "--help")
	if code != exitOK || !strings.Contains(out, exitCodesHelp) {
		t.Errorf("--help lacks the exit codes: exit %d\n%s", code, out)
	}
}

func TestArticle(t *testing.T) {
	for fstype, want := range map[string]string{"ext4": "an", "xfs": "an", "overlay": "an", "tmpfs": "a", "btrfs": "a", "": "a"} {
		if got := article(fstype); got != want {
			t.Errorf("article(%q) = %q, want %q", fstype, got, want)
		}
	}
}
