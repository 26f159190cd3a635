package remote

import (
	"fmt"
	"os"
	"path/filepath"
	"testing"
)

// FuzzParseContentRange: the Content-Range parser never panics, and what
// it accepts is a range inside the object that prints back as given.
func FuzzParseContentRange(f *testing.F) {
	for _, s := range []string{"bytes 0-0/1", "bytes 0-1048575/67108864", "bytes */0", "bytes 5-4/10",
		"bytes 0-9/5", "bytes -1-2/3", "bytes 1-2", "items 0-1/2", "bytes 00-1/2", "bytes 0-9223372036854775807/9223372036854775807"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		first, last, total, ok := parseContentRange(s)
		if !ok {
			return
		}
		if first < 0 || last < first || total <= last {
			t.Fatalf("%q: accepted %d-%d/%d", s, first, last, total)
		}
		if back := fmt.Sprintf("bytes %d-%d/%d", first, last, total); back != s {
			// Leading zeros or a '+' parse to the same numbers: allowed,
			// as long as the numbers are the ones written.
			var f2, l2, t2 int64
			if n, err := fmt.Sscanf(s, "bytes %d-%d/%d", &f2, &l2, &t2); n != 3 || err != nil || f2 != first || l2 != last || t2 != total {
				t.Fatalf("%q parsed as %s", s, back)
			}
		}
		if n, ok := contentRangeTotal(s); ok && n < 0 {
			t.Fatalf("%q: total %d", s, n)
		}
	})
}

// FuzzLoadMeta: a cache entry's meta.json, whatever it holds, is either
// refused (the entry is then remade) or a version with a size and a block
// size; never a panic.
func FuzzLoadMeta(f *testing.F) {
	f.Add([]byte(`{"url":"http://h/d.img","version":{"size":1048576,"etag":"\"x\""},"block":4096}`))
	f.Add([]byte(`{"url":"http://h/d.img","version":{"size":-1},"block":4096}`))
	f.Add([]byte(`{"block":0}`))
	f.Add([]byte(`not json`))
	f.Fuzz(func(t *testing.T, b []byte) {
		dir := t.TempDir()
		if err := os.WriteFile(filepath.Join(dir, metaName), b, 0o600); err != nil {
			t.Fatal(err)
		}
		if m := loadMeta(dir); m != nil && (m.Block <= 0 || m.Version.Size <= 0) {
			t.Fatalf("accepted %+v", m)
		}
	})
}
