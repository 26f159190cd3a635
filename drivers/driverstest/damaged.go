package driverstest

import (
	"encoding/binary"
	"os"
	"path/filepath"
	"regexp"
	"testing"
)

// Damage is a recipe for a damaged qcow2 image. A reader must either refuse
// to open it, with an error matching Msg, or open it and fail reads of
// [ReadOff, ReadOff+64k) (which hold 0x5c in the undamaged image): never
// return other data for that range, never panic.
type Damage struct {
	Name string
	// Apply returns the damaged bytes of the image; l1 is the L1 table
	// offset from the header.
	Apply func(b []byte, l1 int64) []byte
	// MustFail: opening must fail.
	MustFail bool
	// Msg must match the error of a refused open.
	Msg *regexp.Regexp
	// Format, if set, is the format to force instead of probing.
	Format  string
	ReadOff int64
}

// Damaged returns the damaged-image catalogue.
func Damaged() []Damage {
	return []Damage{
		{
			Name:  "header-only",
			Apply: func(b []byte, _ int64) []byte { return b[:512] },
			Msg:   regexp.MustCompile(`(?i)trunc|corrupt|short|EOF|past the end|beyond`),
		},
		{
			Name:  "cut-mid-L1",
			Apply: func(b []byte, l1 int64) []byte { return b[:l1+4] },
			Msg:   regexp.MustCompile(`(?i)trunc|corrupt|short|EOF|past the end|beyond|L1`),
		},
		{
			Name: "unknown-incompatible-bit-20",
			// incompatible_features is bytes 72-79, big-endian: bit 20
			// is 0x10 in byte 77.
			Apply:    func(b []byte, _ int64) []byte { b[77] |= 0x10; return b },
			MustFail: true,
			Msg:      regexp.MustCompile(`(?i)incompatible.*20|20.*incompatible|feature.*20|bit 20`),
		},
		{
			Name: "L2-offset-past-EOF",
			Apply: func(b []byte, l1 int64) []byte {
				// L1[0]: COPIED (bit 63) | an L2 table 1 GiB past the end.
				bad := uint64(len(b)+1<<30)&^0xffff | 1<<63
				binary.BigEndian.PutUint64(b[l1:], bad)
				return b
			},
			Msg: regexp.MustCompile(`(?i)corrupt|past the end|beyond|L2|EOF`),
		},
		{
			Name: "L2-offset-unaligned",
			Apply: func(b []byte, l1 int64) []byte {
				v := binary.BigEndian.Uint64(b[l1:])
				binary.BigEndian.PutUint64(b[l1:], v+512)
				return b
			},
			Msg: regexp.MustCompile(`(?i)corrupt|align|L2`),
		},
		{
			Name: "data-cluster-past-EOF",
			Apply: func(b []byte, l1 int64) []byte {
				// First L2 entry: a standard cluster 1 GiB past the end.
				l2 := int64(binary.BigEndian.Uint64(b[l1:]) & 0x00fffffffffffe00)
				binary.BigEndian.PutUint64(b[l2:], uint64(len(b)+1<<30)&^0xffff|1<<63)
				return b
			},
			Msg: regexp.MustCompile(`(?i)corrupt|past the end|beyond|EOF`),
		},
		{
			Name:     "bad-magic-with-format-qcow2",
			Apply:    func(b []byte, _ int64) []byte { copy(b, "XXXX"); return b },
			MustFail: true,
			Format:   "qcow2",
			Msg:      regexp.MustCompile(`(?i)magic|not a qcow2`),
		},
	}
}

// BuildDamaged builds a 16 MiB qcow2 image whose first 4 MiB hold 0x5c, in
// a new temporary directory, and applies d to it.
func BuildDamaged(t testing.TB, d Damage) string {
	t.Helper()
	img := filepath.Join(t.TempDir(), "bad.qcow2")
	Cmd(t, "qemu-img", "create", "-q", "-f", "qcow2", img, "16M")
	QemuIO(t, img, "write -P 0x5c 0 4M", "write -P 0x5d 12M 64k")
	b, err := os.ReadFile(img)
	if err != nil {
		t.Fatal(err)
	}
	l1 := int64(binary.BigEndian.Uint64(b[40:48]))
	if err := os.WriteFile(img, d.Apply(b, l1), 0o644); err != nil {
		t.Fatal(err)
	}
	return img
}
