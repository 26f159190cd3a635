package remote

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"syscall"
)

// The kinds of failure, for errors.Is. Every error of this package is an
// *Error that matches one of them and syscall.EIO (a read that cannot be
// served is an I/O error to its reader), never the network's own errno:
// a refused connection must not reach a FUSE reader as ECONNREFUSED.
var (
	ErrBadURL      = errors.New("malformed URL")
	ErrNotFound    = errors.New("no such object (404 Not Found)")
	ErrNoRange     = errors.New("the server does not support range requests (it answered a ranged GET with the whole object); imgfuse reads remote images piecewise and will not download it whole")
	ErrChanged     = errors.New("the object changed on the server since it was opened")
	ErrRefused     = errors.New("connection refused")
	ErrCertificate = errors.New("untrusted certificate")
	ErrTimeout     = errors.New("timed out")
	ErrUnreachable = errors.New("cannot reach the server")
	ErrServer      = errors.New("unexpected answer from the server")
	ErrDenied      = errors.New("the server refused the request")
	ErrCache       = errors.New("local cache")
)

// Error is a failure to open or read an object: what was done to which
// URL, the kind of failure and, in words, the cause.
type Error struct {
	Op    string // "open", "read"
	URL   string
	Kind  error  // one of the Err* sentinels
	Cause string // details, "" if Kind says it all
}

func (e *Error) Error() string {
	msg := e.Op + " " + e.URL + ": " + e.Kind.Error()
	if e.Cause != "" {
		msg += ": " + e.Cause
	}
	return msg
}

func (e *Error) Unwrap() []error { return []error{e.Kind, syscall.EIO} }

// transient reports whether a retry may succeed.
func (e *Error) transient() bool {
	switch e.Kind {
	case ErrRefused, ErrTimeout, ErrUnreachable, ErrServer:
		return true
	}
	return false
}

// netError classifies an error of the HTTP client (dial, TLS, I/O).
func netError(op, url string, err error) *Error {
	var re *Error
	if errors.As(err, &re) {
		return re
	}
	e := &Error{Op: op, URL: url, Kind: ErrUnreachable, Cause: err.Error()}
	var cv *tls.CertificateVerificationError
	var ua x509.UnknownAuthorityError
	var hn x509.HostnameError
	var ci x509.CertificateInvalidError
	var ne net.Error
	var dns *net.DNSError
	switch {
	case errors.As(err, &cv), errors.As(err, &ua), errors.As(err, &hn), errors.As(err, &ci):
		e.Kind = ErrCertificate
		if cv != nil {
			e.Cause = cv.Err.Error()
		}
	case errors.Is(err, syscall.ECONNREFUSED):
		e.Kind, e.Cause = ErrRefused, ""
	case errors.As(err, &dns):
		e.Cause = "no such host " + dns.Name
		if dns.IsTemporary {
			e.Cause = dns.Error()
		}
	case errors.Is(err, context.DeadlineExceeded), errors.As(err, &ne) && ne.Timeout():
		e.Kind, e.Cause = ErrTimeout, ""
	}
	return e
}

func errorf(op, url string, kind error, format string, args ...any) *Error {
	return &Error{Op: op, URL: url, Kind: kind, Cause: fmt.Sprintf(format, args...)}
}
