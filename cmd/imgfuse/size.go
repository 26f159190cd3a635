package main

import (
	"fmt"
	"strconv"
	"strings"
)

// parseSize parses a size in bytes with an optional binary suffix, as
// qemu-img spells them: 512, 64K, 8M, 1G, 2T (k/m/g/t too).
func parseSize(s string) (int64, error) {
	t := strings.TrimSpace(s)
	shift := 0
	if n := len(t); n > 0 {
		switch t[n-1] {
		case 'k', 'K':
			shift = 10
		case 'm', 'M':
			shift = 20
		case 'g', 'G':
			shift = 30
		case 't', 'T':
			shift = 40
		}
		if shift != 0 {
			t = t[:n-1]
		}
	}
	v, err := strconv.ParseInt(t, 10, 64)
	if err != nil || v < 0 || v > (1<<62)>>shift {
		return 0, fmt.Errorf("invalid size %q (a number of bytes, optionally with K, M, G or T)", s)
	}
	return v << shift, nil
}
