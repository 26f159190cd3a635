package imgtool

import (
	"errors"

	"imgfuse/aio"
	"imgfuse/remote"
)

// ErrRemote is the cause of the refusal of an image named by a URL of a
// kind imgfuse does not read (ftp://, nbd://, ...): it reads local files
// and block devices, and http://, https:// and s3:// URLs (package
// remote). It exits ExitUnsupported, as a format imgfuse cannot read does,
// rather than "no such file".
var ErrRemote = errors.New("remote images of this kind are not supported")

// ErrRemoteReadOnly is the cause of the refusal to create or write a
// remote image.
var ErrRemoteReadOnly = errors.New("remote images are read-only")

// RefuseRemote fails, with exit 5 and ErrRemote, when image is a URL
// imgfuse cannot read: "open nbd://host/export: remote images of this
// kind are not supported (imgfuse reads http://, https:// and s3:// URLs)".
// A local file whose name merely looks like a URL (a directory "https:")
// is left alone, and so are the URLs package remote reads.
func RefuseRemote(image string) error {
	if !aio.IsURL(image) || remote.Supported(image) {
		return nil
	}
	return &Error{Op: "open", Path: image, Code: ExitUnsupported, Err: ErrRemote,
		Hint: "imgfuse reads http://, https:// and s3:// URLs; copy it to a local file first"}
}

// IsRemote reports whether image names a remote image imgfuse reads.
func IsRemote(image string) bool { return aio.IsURL(image) && remote.Supported(image) }
