package drivers_test

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"imgfuse/drivers"
)

func TestResolveParent(t *testing.T) {
	for _, c := range []struct {
		image, name, want string
		err               error
	}{
		{"/a/b/child.vmdk", "base.vmdk", "/a/b/base.vmdk", nil},
		{"/a/link/child.vmdk", "../base.vmdk", "/a/link/../base.vmdk", nil}, // not cleaned: the kernel resolves ".."
		{"child.vmdk", "base.vmdk", "base.vmdk", nil},
		{"d/child.vmdk", "/abs/base.vmdk", "/abs/base.vmdk", nil},
		{"d/child.vmdk", "sub/base:1.vmdk", "d/sub/base:1.vmdk", nil},
		{"d/child.vmdk", `C:\vms\base.vmdk`, "", drivers.ErrUnsupported},
		{"d/child.vmdk", "nbd:host:10809", "", drivers.ErrUnsupported},
		{"d/child.vmdk", "", "", drivers.ErrCorrupt},
	} {
		got, err := drivers.ResolveParent(c.image, c.name)
		if got != c.want || !errors.Is(err, c.err) || (c.err == nil) != (err == nil) {
			t.Errorf("ResolveParent(%q, %q) = %q, %v; want %q, %v", c.image, c.name, got, err, c.want, c.err)
		}
	}
}

// chainFormat is a format whose images are text files naming their
// parent ("parent NAME"), opened through the chain helpers as the VMDK
// and VHD drivers open theirs.
type chainFormat struct{ opened *int }

func (chainFormat) Name() string                    { return "chain" }
func (chainFormat) Probe(in drivers.ProbeInput) int { return 0 }
func (f chainFormat) Open(path string, opts drivers.OpenOptions) (drivers.Driver, error) {
	*f.opened++
	opts, err := drivers.EnterChain(path, opts)
	if err != nil {
		return nil, err
	}
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, err
	}
	if name, ok := strings.CutPrefix(strings.TrimSpace(string(b)), "parent "); ok {
		p, err := drivers.ResolveParent(path, name)
		if err != nil {
			return nil, err
		}
		if _, _, err := drivers.OpenParent(p, "chain", f, opts); err != nil {
			return nil, fmt.Errorf("%s: parent: %w", path, err)
		}
	}
	return nil, nil
}

// TestChainHelpers: loops (to the image itself, two images naming each
// other) are refused by name, a chain of MaxChainDepth images opens and
// one more is refused; each image opens once.
func TestChainHelpers(t *testing.T) {
	dir := t.TempDir()
	write := func(name, parent string) string {
		p := filepath.Join(dir, name)
		text := ""
		if parent != "" {
			text = "parent " + parent
		}
		if err := os.WriteFile(p, []byte(text), 0o644); err != nil {
			t.Fatal(err)
		}
		return p
	}
	n := 0
	f := chainFormat{&n}
	self := write("self", "self")
	if _, err := f.Open(self, drivers.OpenOptions{}); !errors.Is(err, drivers.ErrCorrupt) || !strings.Contains(err.Error(), "loops") {
		t.Errorf("an image that is its own parent: %v", err)
	}
	a := write("a", "b")
	write("b", "a")
	n = 0
	if _, err := f.Open(a, drivers.OpenOptions{}); !errors.Is(err, drivers.ErrCorrupt) || !strings.Contains(err.Error(), "loops") || n != 2 {
		t.Errorf("a -> b -> a: %v after %d opens", err, n)
	}
	for i := 1; i <= drivers.MaxChainDepth; i++ {
		parent := ""
		if i < drivers.MaxChainDepth {
			parent = fmt.Sprint(i + 1)
		}
		write(fmt.Sprint(i), parent)
	}
	n = 0
	if _, err := f.Open(filepath.Join(dir, "1"), drivers.OpenOptions{}); err != nil || n != drivers.MaxChainDepth {
		t.Errorf("a chain of %d: %v after %d opens", drivers.MaxChainDepth, err, n)
	}
	write("0", "1")
	if _, err := f.Open(filepath.Join(dir, "0"), drivers.OpenOptions{}); !errors.Is(err, drivers.ErrCorrupt) || !strings.Contains(err.Error(), "deeper") {
		t.Errorf("a chain of %d: %v", drivers.MaxChainDepth+1, err)
	}
}

// FuzzResolveParent: any name an image stores resolves without a panic,
// to the name itself (absolute) or the name after the image's directory.
func FuzzResolveParent(f *testing.F) {
	for _, s := range []string{"base.vmdk", "../b.vmdk", "/abs", `C:\x`, "nbd:h:1", "", "a/b:c"} {
		f.Add("/d/child.vmdk", s)
	}
	f.Fuzz(func(t *testing.T, image, name string) {
		p, err := drivers.ResolveParent(image, name)
		if err != nil {
			return
		}
		if !strings.HasSuffix(p, name) || (!strings.HasPrefix(name, "/") && !strings.HasPrefix(image, p[:len(p)-len(name)])) {
			t.Errorf("ResolveParent(%q, %q) = %q", image, name, p)
		}
	})
}
