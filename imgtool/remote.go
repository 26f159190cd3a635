package imgtool

import (
	"errors"
	"os"
	"regexp"
)

// ErrRemote is the cause of the refusal of an image named by a URL
// (https://, s3://, nbd://, ...): imgfuse reads local files and block
// devices only, for now. It exits ExitUnsupported, as a format imgfuse
// cannot read does, rather than "no such file".
var ErrRemote = errors.New("remote images are not supported yet")

// urlScheme matches the scheme:// of a URL (RFC 3986's scheme), the way
// qemu-img names its network protocols: http, https, ftp, ftps, nbd,
// nbd+unix, ssh, iscsi, ..., and s3 for object stores.
var urlScheme = regexp.MustCompile(`^([A-Za-z][A-Za-z0-9+.-]*)://`)

// RefuseRemote fails, with exit 5 and ErrRemote, when image is a URL
// rather than a file: "open https://host/disk.qcow2: remote images are not
// supported yet (copy it to a local file first)". A local
// file whose name merely looks like one (a directory "https:") is left
// alone.
func RefuseRemote(image string) error {
	m := urlScheme.FindStringSubmatch(image)
	if m == nil {
		return nil
	}
	if _, err := os.Lstat(image); err == nil {
		return nil
	}
	return &Error{Op: "open", Path: image, Code: ExitUnsupported, Err: ErrRemote,
		Hint: "copy it to a local file first"}
}
