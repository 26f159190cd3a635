package luks

import (
	"bytes"

	"imgfuse/drivers"
)

// magic starts every LUKS header (LUKS1 and LUKS2).
var magic = []byte("LUKS\xba\xbe")

// ErrEncrypted is the error of every open: the file is a LUKS container.
// It matches drivers.ErrUnsupported without repeating its text.
var ErrEncrypted error = encryptedError{}

type encryptedError struct{}

func (encryptedError) Error() string { return "is a LUKS-encrypted image: not supported" }
func (encryptedError) Unwrap() error { return drivers.ErrUnsupported }

// Format recognises LUKS containers and opens none.
type Format struct{}

var _ drivers.Format = Format{}

// Name implements drivers.Format.
func (Format) Name() string { return "luks" }

// Probe implements drivers.Format: 100 on the LUKS magic, whatever version
// follows it.
func (Format) Probe(header []byte) int {
	if bytes.HasPrefix(header, magic) {
		return 100
	}
	return 0
}

// Open implements drivers.Format: it always fails with ErrEncrypted.
func (Format) Open(path string, opts drivers.OpenOptions) (drivers.Driver, error) {
	return nil, ErrEncrypted
}
