package remote

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"strconv"
	"strings"
	"time"
)

// httpSource reads an object over HTTP(S) with ranged GETs. There is no
// HEAD: presigned URLs are signed for GET only, so the size comes from
// the Content-Range of the first ranged answer.
type httpSource struct {
	url    string
	client *http.Client
	chunk  int64
}

func newHTTPSource(u string, cfg *Config) *httpSource {
	tr := http.DefaultTransport.(*http.Transport).Clone() // proxies from the environment
	tr.DialContext = (&net.Dialer{Timeout: cfg.Timeout, KeepAlive: 30 * time.Second}).DialContext
	tr.TLSHandshakeTimeout = cfg.Timeout
	tr.ResponseHeaderTimeout = cfg.Timeout
	tr.MaxIdleConnsPerHost = cfg.Parallel
	tr.DisableCompression = true // a range of a gzipped answer is not a range of the object
	return &httpSource{url: u, client: &http.Client{Transport: tr}, chunk: cfg.Chunk}
}

func (s *httpSource) open(ctx context.Context, cached *version) (version, []byte, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, s.url, nil)
	if err != nil {
		return version{}, nil, errorf("open", s.url, ErrBadURL, "%v", err)
	}
	req.Header.Set("Range", fmt.Sprintf("bytes=0-%d", s.chunk-1))
	if cached != nil {
		if cached.ETag != "" {
			req.Header.Set("If-None-Match", cached.ETag)
		} else if cached.LastModified != "" {
			req.Header.Set("If-Modified-Since", cached.LastModified)
		}
	}
	resp, err := s.client.Do(req)
	if err != nil {
		return version{}, nil, netError("open", s.url, err)
	}
	defer drain(resp)
	switch resp.StatusCode {
	case http.StatusNotModified:
		if cached == nil {
			return version{}, nil, errorf("open", s.url, ErrServer, "304 Not Modified to an unconditional request")
		}
		return *cached, nil, nil
	case http.StatusPartialContent:
	case http.StatusOK:
		return version{}, nil, &Error{Op: "open", URL: s.url, Kind: ErrNoRange}
	case http.StatusRequestedRangeNotSatisfiable:
		// Only an empty object has no byte 0.
		if total, ok := contentRangeTotal(resp.Header.Get("Content-Range")); ok && total == 0 {
			return version{}, nil, errorf("open", s.url, ErrServer, "the object is empty")
		}
		return version{}, nil, statusError("open", s.url, resp)
	default:
		return version{}, nil, statusError("open", s.url, resp)
	}
	first, last, total, ok := parseContentRange(resp.Header.Get("Content-Range"))
	if !ok || first != 0 || last >= s.chunk {
		return version{}, nil, errorf("open", s.url, ErrServer, "206 with Content-Range %q", resp.Header.Get("Content-Range"))
	}
	v := version{Size: total, ETag: resp.Header.Get("ETag"), LastModified: resp.Header.Get("Last-Modified")}
	if v.ETag == "" && v.LastModified == "" {
		return version{}, nil, errorf("open", s.url, ErrServer, "the answer has neither ETag nor Last-Modified, so a change of the object could not be noticed")
	}
	head := make([]byte, last+1)
	if _, err := io.ReadFull(resp.Body, head); err != nil {
		return version{}, nil, netError("open", s.url, fmt.Errorf("body of %d bytes: %w", len(head), err))
	}
	return v, head, nil
}

func (s *httpSource) read(ctx context.Context, v version, off int64, n int) ([]byte, error) {
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, s.url, nil)
	if err != nil {
		return nil, errorf("read", s.url, ErrBadURL, "%v", err)
	}
	req.Header.Set("Range", fmt.Sprintf("bytes=%d-%d", off, off+int64(n)-1))
	// Pinned: a strong ETag with If-Match (412 if the object changed);
	// a weak one, or none, with If-Unmodified-Since where known, and the
	// answer's own validator compared below.
	if v.ETag != "" && !strings.HasPrefix(v.ETag, "W/") {
		req.Header.Set("If-Match", v.ETag)
	} else if v.LastModified != "" {
		req.Header.Set("If-Unmodified-Since", v.LastModified)
	}
	resp, err := s.client.Do(req)
	if err != nil {
		return nil, netError("read", s.url, err)
	}
	defer drain(resp)
	switch resp.StatusCode {
	case http.StatusPartialContent:
	case http.StatusPreconditionFailed:
		return nil, errorf("read", s.url, ErrChanged, "412 Precondition Failed")
	case http.StatusOK:
		return nil, errorf("read", s.url, ErrChanged, "a ranged GET got the whole object (200)")
	default:
		return nil, statusError("read", s.url, resp)
	}
	first, last, total, ok := parseContentRange(resp.Header.Get("Content-Range"))
	if !ok || first != off || last != off+int64(n)-1 {
		return nil, errorf("read", s.url, ErrServer, "asked for bytes %d-%d, got Content-Range %q", off, off+int64(n)-1, resp.Header.Get("Content-Range"))
	}
	if total != v.Size || v.ETag != "" && resp.Header.Get("ETag") != "" && resp.Header.Get("ETag") != v.ETag {
		return nil, errorf("read", s.url, ErrChanged, "size %d, ETag %s; opened with size %d, ETag %s", total, resp.Header.Get("ETag"), v.Size, v.ETag)
	}
	p := make([]byte, n)
	if _, err := io.ReadFull(resp.Body, p); err != nil {
		return nil, netError("read", s.url, fmt.Errorf("body of %d bytes at %d: %w", n, off, err))
	}
	return p, nil
}

func statusError(op, u string, resp *http.Response) *Error {
	if resp.StatusCode == http.StatusNotFound || resp.StatusCode == http.StatusGone {
		return &Error{Op: op, URL: u, Kind: ErrNotFound}
	}
	e := errorf(op, u, ErrServer, "%s", resp.Status)
	if resp.StatusCode < 500 && resp.StatusCode != http.StatusTooManyRequests && resp.StatusCode != http.StatusRequestTimeout {
		e.Kind = ErrDenied
	}
	return e
}

// drain reads a little of what is left of the body, so the connection can
// be reused, and closes it.
func drain(resp *http.Response) {
	io.CopyN(io.Discard, resp.Body, 64<<10)
	resp.Body.Close()
}

// parseContentRange parses "bytes FIRST-LAST/TOTAL".
func parseContentRange(s string) (first, last, total int64, ok bool) {
	rest, found := strings.CutPrefix(s, "bytes ")
	if !found {
		return 0, 0, 0, false
	}
	rng, tot, found := strings.Cut(rest, "/")
	if !found {
		return 0, 0, 0, false
	}
	a, b, found := strings.Cut(rng, "-")
	if !found {
		return 0, 0, 0, false
	}
	var err1, err2, err3 error
	first, err1 = strconv.ParseInt(a, 10, 64)
	last, err2 = strconv.ParseInt(b, 10, 64)
	total, err3 = strconv.ParseInt(tot, 10, 64)
	if err1 != nil || err2 != nil || err3 != nil || first < 0 || last < first || total <= last {
		return 0, 0, 0, false
	}
	return first, last, total, true
}

// contentRangeTotal parses "bytes */TOTAL".
func contentRangeTotal(s string) (int64, bool) {
	t, found := strings.CutPrefix(s, "bytes */")
	if !found {
		return 0, false
	}
	n, err := strconv.ParseInt(t, 10, 64)
	return n, err == nil && n >= 0
}
