package remote

import (
	"bytes"
	"context"
	"errors"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/johannesboyne/gofakes3"
	"github.com/johannesboyne/gofakes3/backend/s3mem"
	"github.com/minio/minio-go/v7"
	"github.com/minio/minio-go/v7/pkg/credentials"
)

// TestS3 reads an object of an in-process S3 implementation (gofakes3)
// by ranges with credentials from the environment and --s3-endpoint:
// bytes equal, a missing key is ErrNotFound, a replaced object fails
// reads not yet cached with ErrChanged, and a new open sees it whole.
func TestS3(t *testing.T) {
	backend := s3mem.New()
	ts := httptest.NewServer(gofakes3.New(backend).Server())
	defer ts.Close()
	if err := backend.CreateBucket("images"); err != nil {
		t.Fatal(err)
	}
	put := func(data []byte) {
		// Through the S3 API, which records Last-Modified.
		c, err := minio.New(strings.TrimPrefix(ts.URL, "http://"), &minio.Options{
			Creds: credentials.NewStaticV4("test", "test-secret", ""), BucketLookup: minio.BucketLookupPath})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := c.PutObject(context.Background(), "images", "base/disk.img", bytes.NewReader(data), int64(len(data)), minio.PutObjectOptions{}); err != nil {
			t.Fatal(err)
		}
	}
	old := randomBytes(300<<10, 11)
	put(old)
	t.Setenv("AWS_ACCESS_KEY_ID", "test")
	t.Setenv("AWS_SECRET_ACCESS_KEY", "test-secret")
	t.Setenv("AWS_REGION", "us-east-1")
	cfg := testConfig(t)
	cfg.S3Endpoint = ts.URL // http://127.0.0.1:PORT
	objs := NewObjects(cfg)
	o, err := objs.Open("s3://images/base/disk.img")
	if err != nil {
		t.Fatal(err)
	}
	if o.Size() != int64(len(old)) {
		t.Fatalf("size %d, want %d", o.Size(), len(old))
	}
	if got := readBack(t, o, 1000, 100<<10); !bytes.Equal(got, old[1000:1000+100<<10]) {
		t.Error("bytes differ")
	}
	if _, err := objs.Open("s3://images/base/missing.img"); !errors.Is(err, ErrNotFound) {
		t.Errorf("missing key: %v, want ErrNotFound", err)
	}
	updated := randomBytes(300<<10, 12)
	put(updated)
	if err := o.Fill(250<<10, 10); !errors.Is(err, ErrChanged) {
		t.Errorf("read after the object changed: %v, want ErrChanged", err)
	}
	objs.Close()
	objs2 := NewObjects(cfg)
	defer objs2.Close()
	o2, err := objs2.Open("s3://images/base/disk.img")
	if err != nil {
		t.Fatal(err)
	}
	if got := readBack(t, o2, 0, o2.Size()); !bytes.Equal(got, updated) {
		t.Error("a new open does not read the new object whole")
	}
	if o2.Stats().LastError != "" {
		t.Errorf("last error %q", o2.Stats().LastError)
	}
}
