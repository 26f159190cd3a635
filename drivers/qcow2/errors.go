package qcow2

import "imgfuse/drivers"

// Errors name the image once. Code inside the driver returns bare context
// ("L2 table at 0x50000: ...: image is corrupt"), each layer adding its own
// words and wrapping with %w; the driver's exported methods and the open
// pass what they return through named, which puts "qcow2: PATH: " in front
// once. An error of another image of the chain (a backing file) keeps its
// own name inside: each file is named once. Callers match the wrapped
// sentinels (drivers.ErrCorrupt, …) with errors.Is, never the text.

// imageError is an error of one image, named once.
type imageError struct {
	// path is the image; "" when err names the file itself (an error of
	// package os or aio from opening it).
	path string
	err  error
}

func (e *imageError) Error() string {
	if e.path == "" {
		return "qcow2: " + e.err.Error()
	}
	return "qcow2: " + e.path + ": " + e.err.Error()
}

func (e *imageError) Unwrap() error { return e.err }

// named returns err named as an error of the image at path, or err itself
// when it is nil or already names the image (a drivers.DamageError names
// its file). An error of another image (the backing file's, reaching a
// read of this one) is named inside this image's.
func named(path string, err error) error {
	if err == nil {
		return nil
	}
	switch e := err.(type) {
	case *imageError:
		if e.path == path || e.path == "" {
			return err
		}
	case *drivers.DamageError:
		if e.Path == path {
			return err
		}
	}
	return &imageError{path: path, err: err}
}

// named is named(img.path, err).
func (img *image) named(err error) error { return named(img.path, err) }

// nameErr names *err as the image's error: the exported methods defer it.
func (img *image) nameErr(err *error) { *err = img.named(*err) }
