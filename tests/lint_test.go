package tests

import (
	"go/ast"
	"go/parser"
	"go/token"
	"io/fs"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
)

// sourceFile is one parsed Go file of the module.
type sourceFile struct {
	dir  string // package directory relative to the module root ("fusefs")
	path string
	test bool
	f    *ast.File
}

func parseModule(t *testing.T) ([]sourceFile, *token.FileSet) {
	fset := token.NewFileSet()
	var files []sourceFile
	err := filepath.WalkDir("..", func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			return err
		}
		if d.IsDir() {
			if n := d.Name(); p != ".." && (strings.HasPrefix(n, ".") || n == "testdata") {
				return filepath.SkipDir
			}
			return nil
		}
		if !strings.HasSuffix(p, ".go") {
			return nil
		}
		f, err := parser.ParseFile(fset, p, nil, parser.ImportsOnly|parser.ParseComments)
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel("..", filepath.Dir(p))
		files = append(files, sourceFile{dir: filepath.ToSlash(rel), path: p, test: strings.HasSuffix(p, "_test.go"), f: f})
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return files, fset
}

func under(dir, prefix string) bool { return dir == prefix || strings.HasPrefix(dir, prefix+"/") }

// TestImportRules enforces the package boundaries of the design: go-fuse
// only in fusefs and cmd; the drivers package never imports a format (the
// list of formats is handed in from above); coroutine, aio and cache know
// nothing about images; partition reads a table from any io.ReaderAt and
// imports no imgfuse package.
func TestImportRules(t *testing.T) {
	files, _ := parseModule(t)
	if len(files) == 0 {
		t.Fatal("no Go files found")
	}
	rules := []struct {
		name    string
		applies func(sf sourceFile) bool
		banned  func(imp string) bool
	}{
		{
			"go-fuse outside fusefs and cmd",
			func(sf sourceFile) bool { return !under(sf.dir, "fusefs") && !under(sf.dir, "cmd") },
			func(imp string) bool { return strings.HasPrefix(imp, "github.com/hanwen/go-fuse") },
		},
		{
			"a format imported by package drivers",
			func(sf sourceFile) bool { return sf.dir == "drivers" || sf.dir == "drivers/driverstest" },
			func(imp string) bool {
				return imp == "imgfuse/drivers/qcow2" || imp == "imgfuse/drivers/raw" || imp == "imgfuse/drivers/foreign"
			},
		},
		{
			"an imgfuse package imported by coroutine",
			func(sf sourceFile) bool { return under(sf.dir, "coroutine") && !sf.test },
			func(imp string) bool { return strings.HasPrefix(imp, "imgfuse/") },
		},
		{
			"drivers or fusefs imported by aio or cache",
			func(sf sourceFile) bool { return (under(sf.dir, "aio") || under(sf.dir, "cache")) && !sf.test },
			func(imp string) bool {
				return strings.HasPrefix(imp, "imgfuse/drivers") || strings.HasPrefix(imp, "imgfuse/fusefs")
			},
		},
		{
			// A partition table is guest data: the package reads any
			// io.ReaderAt and has its own error, ErrMalformed.
			"an imgfuse package imported by partition",
			func(sf sourceFile) bool { return under(sf.dir, "partition") && !sf.test },
			func(imp string) bool { return strings.HasPrefix(imp, "imgfuse/") },
		},
		{
			"fusefs imported by a driver",
			func(sf sourceFile) bool { return under(sf.dir, "drivers") },
			func(imp string) bool {
				return strings.HasPrefix(imp, "imgfuse/fusefs") || strings.HasPrefix(imp, "imgfuse/cmd")
			},
		},
	}
	sawFuse := false // a positive control: the walk sees fusefs's imports
	for _, sf := range files {
		for _, is := range sf.f.Imports {
			imp, _ := strconv.Unquote(is.Path.Value)
			if sf.dir == "fusefs" && strings.HasPrefix(imp, "github.com/hanwen/go-fuse") {
				sawFuse = true
			}
			for _, r := range rules {
				if r.applies(sf) && r.banned(imp) {
					t.Errorf("%s imports %s: %s", sf.path, imp, r.name)
				}
			}
		}
	}
	if !sawFuse {
		t.Error("no file of fusefs imports go-fuse: the source walk is broken")
	}
}

// TestNoExitOutsideCmd: no os.Exit or log.Fatal in library code, so no
// image byte or FUSE request can end the daemon, and no init() in the
// drivers (formats are listed by the caller, not registered).
func TestNoExitOutsideCmd(t *testing.T) {
	fset := token.NewFileSet()
	files, _ := parseModule(t)
	for _, sf := range files {
		if sf.test || under(sf.dir, "cmd") || under(sf.dir, "tests") {
			continue
		}
		f, err := parser.ParseFile(fset, sf.path, nil, 0)
		if err != nil {
			t.Fatal(err)
		}
		ast.Inspect(f, func(n ast.Node) bool {
			switch n := n.(type) {
			case *ast.FuncDecl:
				if n.Recv == nil && n.Name.Name == "init" && under(sf.dir, "drivers") {
					t.Errorf("%s: func init() in a driver", fset.Position(n.Pos()))
				}
			case *ast.SelectorExpr:
				if x, ok := n.X.(*ast.Ident); ok {
					name := x.Name + "." + n.Sel.Name
					if name == "os.Exit" || strings.HasPrefix(name, "log.Fatal") {
						t.Errorf("%s: %s in library code", fset.Position(n.Pos()), name)
					}
				}
			}
			return true
		})
	}
}

// imageSyscalls are the calls that read, write, sync, resize, punch or
// lock an image file. Only package aio makes them, so alignment, bounce
// buffers, the write range lock, image locks and the fallback engine cannot
// be bypassed.
var imageSyscalls = map[string]bool{
	"Pread": true, "Pwrite": true, "Preadv": true, "Pwritev": true,
	"Preadv2": true, "Pwritev2": true, "Fdatasync": true, "Fsync": true,
	"Fallocate": true, "Ftruncate": true, "Seek": true, "FcntlFlock": true,
	"Syscall": true, "Syscall6": true, "RawSyscall": true,
}

// TestImageIOOnlyInAio: no library code outside aio makes image-file
// syscalls (tests may, for fault injection and models).
func TestImageIOOnlyInAio(t *testing.T) {
	fset := token.NewFileSet()
	files, _ := parseModule(t)
	seen := 0
	for _, sf := range files {
		// internal/uring's system calls are io_uring_setup and
		// io_uring_enter on its own ring (FUSE requests), never on an
		// image file.
		if sf.test || under(sf.dir, "tests") || under(sf.dir, "internal/uring") {
			continue
		}
		f, err := parser.ParseFile(fset, sf.path, nil, 0)
		if err != nil {
			t.Fatal(err)
		}
		ast.Inspect(f, func(n ast.Node) bool {
			sel, ok := n.(*ast.SelectorExpr)
			if !ok {
				return true
			}
			x, ok := sel.X.(*ast.Ident)
			if !ok || (x.Name != "unix" && x.Name != "syscall") || !imageSyscalls[sel.Sel.Name] {
				return true
			}
			if under(sf.dir, "aio") {
				seen++
			} else {
				t.Errorf("%s: %s.%s: image file I/O belongs in package aio", fset.Position(n.Pos()), x.Name, sel.Sel.Name)
			}
			return true
		})
	}
	if seen == 0 {
		t.Error("package aio makes none of the image syscalls: the source walk is broken")
	}
}

// unconditionalSkips are the skips that do not depend on what the machine
// has, and so are not testenv.Skip's to decide, by file and enclosing
// top-level function: a test that needs (or cannot run under) a build tag,
// one that only runs when asked for, a driver suite subtest for a
// capability the driver under test does not have. Every entry must still
// be found, so a stale one fails too.
var unconditionalSkips = map[string]string{
	"cache/misuse_test.go:TestMisuseInvariants":              "needs -tags invariants; .ci/run runs the cache package with it",
	"cache/misuse_test.go:TestDiscardPinned":                 "panics by design under -tags invariants; .ci/run runs it without",
	"drivers/qcow2/fuzz_tables_test.go:TestUpdateImageSeeds": "regenerates checked-in seeds, only when IMGFUSE_UPDATE_SEEDS=1",
	"drivers/qcow2/fuzz_test.go:TestUpdateFuzzSeeds":         "regenerates checked-in seeds, only when IMGFUSE_UPDATE_SEEDS=1",
	"drivers/driverstest/driverstest.go:Run":                 "a driver without the direct-read fast path has nothing to test there",
	"drivers/driverstest/driverstest.go:RunWritable":         "a disk smaller than 16 sectors has no room for 16 writer stripes",
}

// TestSkipsThroughTestenv: a test skips for want of a tool, a device,
// root or a kind of filesystem only through testenv.Skip (directly or
// through driverstest.SkipUnless), which fails it in CI instead: a test
// skipped there by its own t.Skip would pass unseen. The exceptions are
// listed in unconditionalSkips.
func TestSkipsThroughTestenv(t *testing.T) {
	fset := token.NewFileSet()
	files, _ := parseModule(t)
	found := map[string]bool{}
	for _, sf := range files {
		if sf.dir == "internal/testenv" {
			continue // the one place that may call Skip
		}
		f, err := parser.ParseFile(fset, sf.path, nil, 0)
		if err != nil {
			t.Fatal(err)
		}
		for _, decl := range f.Decls {
			fn, ok := decl.(*ast.FuncDecl)
			if !ok || fn.Body == nil {
				continue
			}
			key := sf.dir + "/" + filepath.Base(sf.path) + ":" + fn.Name.Name
			ast.Inspect(fn.Body, func(n ast.Node) bool {
				call, ok := n.(*ast.CallExpr)
				if !ok {
					return true
				}
				sel, ok := call.Fun.(*ast.SelectorExpr)
				if !ok || (sel.Sel.Name != "Skip" && sel.Sel.Name != "Skipf" && sel.Sel.Name != "SkipNow") {
					return true
				}
				if x, ok := sel.X.(*ast.Ident); ok && x.Name == "testenv" {
					return true
				}
				if _, ok := unconditionalSkips[key]; ok {
					found[key] = true
					return true
				}
				t.Errorf("%s: %s: a skip for a missing prerequisite must go through testenv.Skip (fails in CI); an unconditional one belongs in unconditionalSkips", fset.Position(call.Pos()), key)
				return true
			})
		}
	}
	for key := range unconditionalSkips {
		if !found[key] {
			t.Errorf("unconditionalSkips: no skip found in %s: remove the entry (or the source walk is broken)", key)
		}
	}
}
