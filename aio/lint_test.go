package aio

import (
	"go/ast"
	"go/parser"
	"go/token"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// imageSyscalls are the calls that read, write, sync, resize or punch an
// image file. Only this package makes them, so alignment, bounce buffers,
// the range lock and the fallback engine cannot be bypassed.
var imageSyscalls = map[string]bool{
	"Pread": true, "Pwrite": true, "Preadv": true, "Pwritev": true,
	"Preadv2": true, "Pwritev2": true, "Fdatasync": true, "Fsync": true,
	"Fallocate": true, "Ftruncate": true, "Seek": true, "Syscall": true,
	"Syscall6": true, "RawSyscall": true,
}

func TestOnlyAioTouchesImageFiles(t *testing.T) {
	root, err := filepath.Abs("..")
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(root, "go.mod")); err != nil {
		t.Fatalf("module root not found above aio: %v", err)
	}
	files := 0
	err = filepath.WalkDir(root, func(path string, e fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		name := e.Name()
		if e.IsDir() {
			if path != root && (strings.HasPrefix(name, ".") || name == "testdata" || name == "vendor") {
				return filepath.SkipDir
			}
			return nil
		}
		rel, _ := filepath.Rel(root, path)
		rel = filepath.ToSlash(rel)
		// Tests may poke at files directly (fault injection, models).
		if !strings.HasSuffix(name, ".go") || strings.HasSuffix(name, "_test.go") || strings.HasPrefix(rel, "aio/") {
			return nil
		}
		files++
		f, err := parser.ParseFile(token.NewFileSet(), path, nil, 0)
		if err != nil {
			return err
		}
		ast.Inspect(f, func(n ast.Node) bool {
			sel, ok := n.(*ast.SelectorExpr)
			if !ok {
				return true
			}
			if x, ok := sel.X.(*ast.Ident); ok && (x.Name == "unix" || x.Name == "syscall") && imageSyscalls[sel.Sel.Name] {
				t.Errorf("%s calls %s.%s: image file I/O belongs in package aio", rel, x.Name, sel.Sel.Name)
			}
			return true
		})
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	if files < 10 {
		t.Fatalf("walked only %d .go files: wrong module root?", files)
	}
}
