package vmdk

import (
	"bytes"
	"fmt"
	"strconv"
	"strings"

	"imgfuse/drivers"
)

// maxDescriptor bounds a descriptor file: QEMU refuses one of 1 MiB or
// more.
const maxDescriptor = 1 << 20

// maxExtents bounds the extent lines of a descriptor: 1024 are a 2 TiB
// twoGbMaxExtent image; each opens a file.
const maxExtents = 4096

// extentLine is one extent of a descriptor: ACCESS SECTORS TYPE "FILE"
// [OFFSET].
type extentLine struct {
	access  string // RW, RDONLY, NOACCESS
	sectors int64
	typ     string // FLAT, SPARSE, ZERO, VMFS, ...
	file    string // as written: relative to the descriptor's directory
	offset  int64  // FLAT/VMFS: first sector of the extent in its file
}

// descriptor is a parsed VMDK descriptor, embedded or in its own file.
type descriptor struct {
	version    int
	cid        uint32
	parentCID  uint32
	createType string
	parentHint string // parentFileNameHint: a delta link
	extents    []extentLine
	// cidAt is the byte offset in the text of the CID's 8 hex digits, -1
	// if the CID is not written as exactly 8 of them.
	cidAt int
}

// parseDescriptor parses descriptor text line by line, stricter than
// QEMU's substring search (docs/formats.md §2.3: QEMU finds "CID=" inside
// "parentCID=" and in comments; it skips extent lines it cannot parse).
// Here a key is a whole "key = value" line outside comments, every extent
// line must parse, and the text ends at its first NUL (the padding of an
// embedded descriptor).
func parseDescriptor(text []byte) (*descriptor, error) {
	if i := bytes.IndexByte(text, 0); i >= 0 {
		text = text[:i]
	}
	d := &descriptor{parentCID: 0xffffffff, cidAt: -1}
	seen := map[string]bool{}
	pos := 0
	for lineNo, raw := range strings.SplitAfter(string(text), "\n") {
		start := pos
		pos += len(raw)
		line := strings.TrimSpace(raw)
		if line == "" || line[0] == '#' {
			continue
		}
		if k, v, ok := strings.Cut(line, "="); ok && !strings.ContainsAny(k, "\"") {
			key := strings.TrimSpace(k)
			val := strings.TrimSpace(v)
			if seen[key] && !strings.HasPrefix(key, "ddb.") {
				return nil, fmt.Errorf("descriptor line %d: %s given twice: %w", lineNo+1, key, drivers.ErrCorrupt)
			}
			seen[key] = true
			unq := strings.Trim(val, "\"")
			var err error
			switch key {
			case "version":
				d.version, err = strconv.Atoi(unq)
				if err == nil && (d.version < 1 || d.version > 3) {
					return nil, fmt.Errorf("descriptor version %d (1 to 3 are known): %w", d.version, drivers.ErrUnsupported)
				}
			case "CID":
				var c uint64
				c, err = strconv.ParseUint(unq, 16, 32)
				d.cid = uint32(c)
				if err == nil && len(val) == 8 {
					d.cidAt = start + strings.Index(raw, val)
				}
			case "parentCID":
				var c uint64
				c, err = strconv.ParseUint(unq, 16, 32)
				d.parentCID = uint32(c)
			case "createType":
				d.createType = unq
			case "parentFileNameHint":
				d.parentHint = unq
			}
			if err != nil {
				return nil, fmt.Errorf("descriptor line %d: %s = %q: %w", lineNo+1, key, val, drivers.ErrCorrupt)
			}
			continue
		}
		e, err := parseExtentLine(line)
		if err != nil {
			return nil, fmt.Errorf("descriptor line %d: %v: %w", lineNo+1, err, drivers.ErrCorrupt)
		}
		if len(d.extents) == maxExtents {
			return nil, fmt.Errorf("more than %d extents: %w", maxExtents, drivers.ErrUnsupported)
		}
		d.extents = append(d.extents, e)
	}
	if d.version == 0 {
		return nil, fmt.Errorf("descriptor without a version line: %w", drivers.ErrCorrupt)
	}
	return d, nil
}

// parseExtentLine parses ACCESS SECTORS TYPE "FILE" [OFFSET]; a ZERO
// extent has no file.
func parseExtentLine(line string) (extentLine, error) {
	var e extentLine
	f := strings.Fields(line)
	if len(f) < 3 {
		return e, fmt.Errorf("not an extent line: %q", line)
	}
	e.access, e.typ = f[0], f[2]
	switch e.access {
	case "RW", "RDONLY", "NOACCESS":
	default:
		return e, fmt.Errorf("extent access %q (RW, RDONLY or NOACCESS)", e.access)
	}
	n, err := strconv.ParseInt(f[1], 10, 64)
	if err != nil || n <= 0 || n > maxExtentSectors*64 {
		return e, fmt.Errorf("extent size %q", f[1])
	}
	e.sectors = n
	if e.typ == "ZERO" {
		if len(f) != 3 {
			return e, fmt.Errorf("a ZERO extent with a file: %q", line)
		}
		return e, nil
	}
	// The file name is quoted and may hold spaces.
	rest := line[strings.Index(line, e.typ)+len(e.typ):]
	rest = strings.TrimSpace(rest)
	if len(rest) < 2 || rest[0] != '"' {
		return e, fmt.Errorf("extent file name not quoted: %q", line)
	}
	end := strings.IndexByte(rest[1:], '"')
	if end <= 0 {
		return e, fmt.Errorf("extent file name: %q", line)
	}
	e.file = rest[1 : 1+end]
	tail := strings.Fields(rest[2+end:])
	switch {
	case len(tail) == 1:
		if e.offset, err = strconv.ParseInt(tail[0], 10, 64); err != nil || e.offset < 0 || e.offset > 1<<53 {
			return e, fmt.Errorf("extent offset %q", tail[0])
		}
	case len(tail) > 1:
		return e, fmt.Errorf("extra fields after the extent offset: %q", line)
	}
	if e.typ == "FLAT" && len(tail) == 0 {
		return e, fmt.Errorf("a FLAT extent without an offset: %q", line)
	}
	return e, nil
}

// probeDescriptor reports whether h starts like a VMDK text descriptor, by
// QEMU's rule (block/vmdk.c, vmdk_probe): comment lines ("#...") and lines
// of spaces (optionally ending "\r") are skipped, and the first other line
// must be "version=1", "=2" or "=3", ending "\n" or "\r\n". An empty line
// is not skipped: it ends the probe with no. A line cut by the end of h
// (a comment longer than 512 bytes, say) is no either.
func probeDescriptor(h []byte) bool {
	for p := h; len(p) > 0; {
		switch p[0] {
		case '#':
			i := bytes.IndexByte(p, '\n')
			if i < 0 {
				return false
			}
			p = p[i+1:]
		case ' ':
			p = bytes.TrimLeft(p, " ")
			p = bytes.TrimPrefix(p, []byte("\r"))
			if len(p) == 0 || p[0] != '\n' {
				return false
			}
			p = p[1:]
		default:
			for _, v := range []string{"1", "2", "3"} {
				if bytes.HasPrefix(p, []byte("version="+v+"\n")) || bytes.HasPrefix(p, []byte("version="+v+"\r\n")) {
					return true
				}
			}
			return false
		}
	}
	return false
}
