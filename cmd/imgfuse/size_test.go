package main

import "testing"

func TestParseSize(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want int64
		ok   bool
	}{
		{"512", 512, true},
		{"64K", 64 << 10, true},
		{"8m", 8 << 20, true},
		{"1G", 1 << 30, true},
		{"2T", 2 << 40, true},
		{"0", 0, true},
		{"", 0, false},
		{"M", 0, false},
		{"-1M", 0, false},
		{"1.5G", 0, false},
		{"12X", 0, false},
		{"99999999999T", 0, false},
	} {
		got, err := parseSize(tc.in)
		if (err == nil) != tc.ok || got != tc.want {
			t.Errorf("parseSize(%q) = %d, %v; want %d, ok=%v", tc.in, got, err, tc.want, tc.ok)
		}
	}
}
