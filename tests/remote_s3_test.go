package tests

import (
	"context"
	"io"
	"log"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/johannesboyne/gofakes3"
	"github.com/johannesboyne/gofakes3/backend/s3mem"
	"github.com/minio/minio-go/v7"
	"github.com/minio/minio-go/v7/pkg/credentials"
)

// TestRemoteS3: a qcow2 image in a bucket of an S3 implementation run in
// the test process (gofakes3) reads back equal to qemu-img convert
// through a mount, with the credentials from the environment and
// --s3-endpoint; info names it, and a missing key exits 3.
func TestRemoteS3(t *testing.T) {
	requireE2E(t)
	t.Parallel()
	ts := httptest.NewServer(gofakes3.New(s3mem.New()).Server())
	defer ts.Close()
	dir, cache := t.TempDir(), t.TempDir()
	img := filepath.Join(dir, "base.qcow2")
	run(t, "qemu-img", "create", "-q", "-f", "qcow2", img, "16M")
	run(t, "qemu-io", "-c", "write -P 0x6b 2M 1M", "-c", "write -P 0x21 15M 64k", img)
	want := filepath.Join(dir, "base.raw")
	run(t, "qemu-img", "convert", "-O", "raw", img, want)
	c, err := minio.New(strings.TrimPrefix(ts.URL, "http://"), &minio.Options{
		Creds: credentials.NewStaticV4("AKTEST", "secret-test", ""), BucketLookup: minio.BucketLookupPath})
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	if err := c.MakeBucket(ctx, "images", minio.MakeBucketOptions{}); err != nil {
		t.Fatal(err)
	}
	if _, err := c.FPutObject(ctx, "images", "base/disk.qcow2", img, minio.PutObjectOptions{}); err != nil {
		t.Fatal(err)
	}
	env := []string{"AWS_ACCESS_KEY_ID=AKTEST", "AWS_SECRET_ACCESS_KEY=secret-test", "AWS_REGION=us-east-1",
		"AWS_SHARED_CREDENTIALS_FILE=/nonexistent", "AWS_CONFIG_FILE=/nonexistent"}
	common := []string{"--cache-dir", cache, "--s3-endpoint", ts.URL}
	url := "s3://images/base/disk.qcow2"
	if r := imgfuse(t, env, append([]string{"info"}, append(common, url)...)...); r.code != 0 || !strings.Contains(r.stdout, "file format: qcow2") {
		t.Errorf("info %s: %v", url, r)
	}
	if r := imgfuse(t, env, append([]string{"info"}, append(common, "s3://images/missing.qcow2")...)...); r.code != 3 || strings.Count(r.stderr, "\n") != 1 {
		t.Errorf("info of a missing key: %v, want exit 3 and one line", r)
	}
	mp := newMountpoint(t, false)
	if r := imgfuse(t, env, append(append([]string{"mount"}, common...), url, mp)...); r.code != 0 {
		t.Fatalf("mount %s: %v", url, r)
	}
	compareFiles(t, filepath.Join(mp, "disk"), want)
	unmount(t, mp)
	if _, err := os.Stat(cache); err != nil {
		t.Error(err)
	}
}

// TestRemoteOpenErrors: an untrusted certificate and a malformed URL
// fail mount and info with exit 3 and one line that says which; nothing
// is mounted.
func TestRemoteOpenErrors(t *testing.T) {
	requireE2E(t)
	t.Parallel()
	ts := httptest.NewUnstartedServer(http.NotFoundHandler())
	ts.Config.ErrorLog = log.New(io.Discard, "", 0) // the refused handshakes
	ts.StartTLS()
	defer ts.Close()
	cache := t.TempDir()
	mp := newMountpoint(t, false)
	for _, c := range []struct{ url, says string }{
		{ts.URL + "/disk.qcow2", "untrusted certificate"},
		{"http://[::1/disk.qcow2", "malformed URL"},
		{"https:///disk.qcow2", "malformed URL"},
	} {
		for _, args := range [][]string{{"info", c.url}, {"mount", c.url, mp}} {
			r := imgfuse(t, nil, append([]string{args[0], "--cache-dir", cache}, args[1:]...)...)
			if r.code != 3 || !strings.Contains(r.stderr, c.says) || strings.Count(r.stderr, "\n") != 1 {
				t.Errorf("imgfuse %s: %v\nwant exit 3 and one line: %s", strings.Join(args, " "), r, c.says)
			}
		}
	}
	if mounted(t, mp) {
		t.Error("a URL that cannot be opened got mounted")
	}
}
