package remote

import (
	"context"
	"net/url"
	"strings"
)

// version identifies one version of an object: the validator every
// request is pinned to and the cache is keyed by.
type version struct {
	Size         int64  `json:"size"`
	ETag         string `json:"etag,omitempty"`
	LastModified string `json:"last-modified,omitempty"`
}

// key is the validator as one string: the ETag, else Last-Modified.
func (v version) key() string {
	if v.ETag != "" {
		return "etag:" + v.ETag
	}
	return "last-modified:" + v.LastModified
}

// source reads one object by ranges. Its methods are safe for concurrent
// use and block.
type source interface {
	// open learns the object's current version. cached is the version
	// the cache holds (nil if none): when it is still current, open
	// may answer it without transferring data (a revalidation). head,
	// if not nil, is the object's first bytes, fetched on the way.
	open(ctx context.Context, cached *version) (v version, head []byte, err error)
	// read returns exactly the n bytes at off of version v, or fails
	// (ErrChanged when the object is no longer v).
	read(ctx context.Context, v version, off int64, n int) ([]byte, error)
}

// newSource parses name (http://, https:// or s3://) into a source.
func newSource(name string, cfg *Config) (source, error) {
	u, err := url.Parse(name)
	if err != nil {
		cause := err
		if ue, ok := err.(*url.Error); ok {
			cause = ue.Err // without the URL, which Error names
		}
		return nil, &Error{Op: "open", URL: name, Kind: ErrBadURL, Cause: cause.Error()}
	}
	switch strings.ToLower(u.Scheme) {
	case "http", "https":
		if u.Host == "" {
			return nil, errorf("open", name, ErrBadURL, "no host")
		}
		if u.Path == "" || strings.HasSuffix(u.Path, "/") {
			return nil, errorf("open", name, ErrBadURL, "no object name after the host")
		}
		return newHTTPSource(name, cfg), nil
	case "s3":
		bucket, key := u.Host, strings.TrimPrefix(u.Path, "/")
		if bucket == "" || key == "" {
			return nil, errorf("open", name, ErrBadURL, "want s3://BUCKET/KEY")
		}
		return newS3Source(name, bucket, key, cfg)
	}
	return nil, errorf("open", name, ErrBadURL, "unsupported scheme %q (want http, https or s3)", u.Scheme)
}

// Supported reports whether name is a URL this package reads: http://,
// https:// or s3://.
func Supported(name string) bool {
	i := strings.Index(name, "://")
	if i < 0 {
		return false
	}
	switch strings.ToLower(name[:i]) {
	case "http", "https", "s3":
		return true
	}
	return false
}
