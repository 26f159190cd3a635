package remote

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net/http"
	"net/url"
	"os"
	"strings"

	"github.com/minio/minio-go/v7"
	"github.com/minio/minio-go/v7/pkg/credentials"
)

// s3Source reads an object of an S3-compatible store with minio-go: the
// credentials and endpoint the way the AWS tools find them.
type s3Source struct {
	url         string
	bucket, key string
	client      *minio.Client
}

// s3Endpoint returns the endpoint (host[:port]) and whether it is TLS,
// from --s3-endpoint, AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL, or AWS's.
func s3Endpoint(cfg *Config) (string, bool, error) {
	ep := cfg.S3Endpoint
	for _, v := range []string{"AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"} {
		if ep == "" {
			ep = os.Getenv(v)
		}
	}
	if ep == "" {
		return "s3.amazonaws.com", true, nil
	}
	if !strings.Contains(ep, "://") {
		return ep, true, nil
	}
	u, err := url.Parse(ep)
	if err != nil || u.Host == "" || (u.Scheme != "http" && u.Scheme != "https") {
		return "", false, fmt.Errorf("S3 endpoint %q: want host[:port] or http(s)://host[:port]", ep)
	}
	return u.Host, u.Scheme == "https", nil
}

func newS3Source(name, bucket, key string, cfg *Config) (source, error) {
	ep, secure, err := s3Endpoint(cfg)
	if err != nil {
		return nil, &Error{Op: "open", URL: name, Kind: ErrBadURL, Cause: err.Error()}
	}
	creds := credentials.NewChainCredentials([]credentials.Provider{
		&credentials.EnvAWS{},
		&credentials.FileAWSCredentials{},
		&credentials.IAM{},
	})
	tr := http.DefaultTransport.(*http.Transport).Clone()
	tr.ResponseHeaderTimeout = cfg.Timeout
	tr.MaxIdleConnsPerHost = cfg.Parallel
	region := os.Getenv("AWS_REGION")
	if region == "" {
		region = os.Getenv("AWS_DEFAULT_REGION")
	}
	c, err := minio.New(ep, &minio.Options{Creds: creds, Secure: secure, Transport: tr, Region: region,
		BucketLookup: minio.BucketLookupPath})
	if err != nil {
		return nil, &Error{Op: "open", URL: name, Kind: ErrBadURL, Cause: err.Error()}
	}
	return &s3Source{url: name, bucket: bucket, key: key, client: c}, nil
}

func (s *s3Source) open(ctx context.Context, cached *version) (version, []byte, error) {
	info, err := s.client.StatObject(ctx, s.bucket, s.key, minio.StatObjectOptions{})
	if err != nil {
		return version{}, nil, s.error("open", err)
	}
	if info.Size <= 0 {
		return version{}, nil, errorf("open", s.url, ErrServer, "the object is empty")
	}
	v := version{Size: info.Size, ETag: info.ETag}
	if !info.LastModified.IsZero() {
		v.LastModified = info.LastModified.UTC().Format(http.TimeFormat)
	}
	return v, nil, nil
}

func (s *s3Source) read(ctx context.Context, v version, off int64, n int) ([]byte, error) {
	opts := minio.GetObjectOptions{}
	if err := opts.SetRange(off, off+int64(n)-1); err != nil {
		return nil, errorf("read", s.url, ErrServer, "%v", err)
	}
	if v.ETag != "" {
		if err := opts.SetMatchETag(v.ETag); err != nil {
			return nil, errorf("read", s.url, ErrServer, "%v", err)
		}
	}
	obj, err := s.client.GetObject(ctx, s.bucket, s.key, opts)
	if err != nil {
		return nil, s.error("read", err)
	}
	defer obj.Close()
	// Checked here too: not every S3 implementation honours If-Match
	// on GET.
	info, err := obj.Stat()
	if err != nil {
		return nil, s.error("read", err)
	}
	if info.ETag != v.ETag {
		return nil, errorf("read", s.url, ErrChanged, "ETag %s; opened with ETag %s", info.ETag, v.ETag)
	}
	p := make([]byte, n)
	if _, err := io.ReadFull(obj, p); err != nil {
		return nil, s.error("read", err)
	}
	return p, nil
}

// error classifies a minio-go error.
func (s *s3Source) error(op string, err error) *Error {
	var resp minio.ErrorResponse
	if errors.As(err, &resp) {
		switch {
		case resp.StatusCode == http.StatusNotFound || resp.Code == "NoSuchKey" || resp.Code == "NoSuchBucket":
			return &Error{Op: op, URL: s.url, Kind: ErrNotFound, Cause: resp.Code}
		case resp.StatusCode == http.StatusPreconditionFailed || resp.Code == "PreconditionFailed":
			return &Error{Op: op, URL: s.url, Kind: ErrChanged, Cause: "412 Precondition Failed"}
		case resp.StatusCode >= 500 || resp.StatusCode == http.StatusTooManyRequests:
			return &Error{Op: op, URL: s.url, Kind: ErrServer, Cause: resp.Code + ": " + resp.Message}
		case resp.StatusCode != 0:
			return &Error{Op: op, URL: s.url, Kind: ErrDenied, Cause: resp.Code + ": " + resp.Message}
		}
	}
	return netError(op, s.url, err)
}
