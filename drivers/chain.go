package drivers

import (
	"fmt"
	"os"
	"strings"
	"syscall"

	"imgfuse/aio"
)

// MaxChainDepth bounds a chain of parent images (VMDK delta links, VHD
// and VHDX differencing disks) counted across formats: deeper is refused, taken
// for a loop the file identities did not catch (a chain through bind
// mounts, say). QEMU has no such bound; qcow2 backing chains have the
// same one (drivers/qcow2).
const MaxChainDepth = 64

// Chain is the list of files an open is below: the image that names a
// parent, its own parent, and so on up to the image the user opened. A
// driver that opens parents carries it in OpenOptions.Chain, so that a
// loop is found even when it passes through another format (a VMDK whose
// parent is a VHD whose parent is the VMDK). Immutable: each layer links
// a new node to the one above it.
type Chain struct {
	up    *Chain
	id    chainFileID
	path  string
	depth int
}

// chainFileID identifies a file of a chain by device and inode, or a
// remote image by its URL.
type chainFileID struct {
	dev, ino uint64
	url      string
}

func fileIdentity(path string) (chainFileID, error) {
	if aio.IsURL(path) {
		return chainFileID{url: path}, nil
	}
	fi, err := os.Stat(path)
	if err != nil {
		return chainFileID{}, err
	}
	st, ok := fi.Sys().(*syscall.Stat_t)
	if !ok {
		return chainFileID{}, fmt.Errorf("%s: cannot identify the file: %w", path, ErrUnsupported)
	}
	return chainFileID{dev: uint64(st.Dev), ino: st.Ino}, nil
}

// push links path below c. It refuses a file already in the chain (a
// loop) and a chain deeper than MaxChainDepth.
func (c *Chain) push(path string) (*Chain, error) {
	id, err := fileIdentity(path)
	if err != nil {
		return nil, err
	}
	for p := c; p != nil; p = p.up {
		if p.id == id {
			return nil, fmt.Errorf("%s: the parent chain loops: %s is already in it (as %s): %w",
				path, path, p.path, ErrCorrupt)
		}
	}
	n := &Chain{up: c, id: id, path: path, depth: 1}
	if c != nil {
		n.depth = c.depth + 1
	}
	if n.depth > MaxChainDepth {
		return nil, fmt.Errorf("%s: parent chain deeper than %d images: %w", path, MaxChainDepth, ErrCorrupt)
	}
	return n, nil
}

// EnterChain records the image at path, being opened with opts, in the
// chain opts carries, and returns opts carrying the longer chain for the
// image's parents. A driver that opens parents calls it first thing in
// its Open. When OpenParent is opening this very file (the chain's last
// file is path's), the chain is returned as is.
func EnterChain(path string, opts OpenOptions) (OpenOptions, error) {
	if c := opts.Chain; c != nil {
		if id, err := fileIdentity(path); err == nil && id == c.id {
			return opts, nil
		}
	}
	c, err := opts.Chain.push(path)
	if err != nil {
		return opts, err
	}
	opts.Chain = c
	return opts, nil
}

// ResolveParent returns the path of a parent image that the image at
// image names name, as QEMU resolves a backing file name
// (bdrv_get_full_backing_filename_from_filename): JoinParent, after
// refusing a name with a protocol prefix ("nbd:...", "C:\..." — QEMU
// reads "C" as a protocol).
func ResolveParent(image, name string) (string, error) {
	if name == "" {
		return "", fmt.Errorf("%s: an empty parent name: %w", image, ErrCorrupt)
	}
	if i := strings.IndexAny(name, ":/"); i >= 0 && name[i] == ':' {
		return "", fmt.Errorf("%s: parent %q names a protocol or a drive (%q), not a file: %w",
			image, name, name[:i], ErrUnsupported)
	}
	return JoinParent(image, name), nil
}

// JoinParent is QEMU's path_combine: an absolute name as is, a relative
// one appended to the image's path up to its last '/', text for text, so
// that ".." is resolved by the kernel from the directory the image was
// reached through (filepath.Join would clean it lexically, and miss the
// parent of a child reached through a symbolic link).
func JoinParent(image, name string) string {
	if strings.HasPrefix(name, "/") {
		return name
	}
	return image[:strings.LastIndexByte(image, '/')+1] + name
}

// OpenParent opens the parent image at path read-only, as the format
// called format (self if opts.Formats does not list it), or probed
// among opts.Formats if format is "". opts are the child's, as returned
// by EnterChain: the parent joins the chain first, so a loop or an
// over-deep chain is refused by name before the parent's Open. It must
// not be called from a coroutine.
func OpenParent(path, format string, self Format, opts OpenOptions) (Driver, Format, error) {
	c, err := opts.Chain.push(path)
	if err != nil {
		return nil, nil, err
	}
	popts := opts
	popts.Chain = c
	popts.ReadOnly, popts.Repair, popts.Probed = true, false, false
	popts.Snapshot = ""
	formats := opts.Formats
	if self != nil {
		if _, err := Lookup(formats, self.Name()); err != nil {
			formats = append(formats[:len(formats):len(formats)], self)
		}
	}
	var f Format
	if format == "" {
		f, err = ProbeFile(formats, path)
	} else {
		f, err = Lookup(formats, format)
	}
	if err != nil {
		return nil, nil, err
	}
	d, err := f.Open(path, popts)
	if err != nil {
		return nil, nil, err
	}
	return d, f, nil
}
