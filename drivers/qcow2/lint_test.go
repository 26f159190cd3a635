package qcow2

import (
	"go/ast"
	"go/parser"
	"go/token"
	"io/fs"
	"strings"
	"testing"
)

// TestLockedFunctionsAssert makes the package doc's claim a rule: every
// function whose name ends in Locked asserts the metadata lock with
// AssertHeld as its first statement.
func TestLockedFunctionsAssert(t *testing.T) {
	fset := token.NewFileSet()
	pkgs, err := parser.ParseDir(fset, ".", func(fi fs.FileInfo) bool {
		return !strings.HasSuffix(fi.Name(), "_test.go")
	}, 0)
	if err != nil {
		t.Fatal(err)
	}
	checked := 0
	for _, pkg := range pkgs {
		for _, f := range pkg.Files {
			for _, d := range f.Decls {
				fn, ok := d.(*ast.FuncDecl)
				if !ok || !strings.HasSuffix(fn.Name.Name, "Locked") || fn.Body == nil {
					continue
				}
				checked++
				if !assertsFirst(fn.Body) {
					t.Errorf("%s: %s does not start with AssertHeld", fset.Position(fn.Pos()), fn.Name.Name)
				}
			}
		}
	}
	if checked < 40 {
		t.Fatalf("found only %d Locked functions: the parse missed files", checked)
	}
}

// assertsFirst reports whether the first statement of body is a call of a
// method named AssertHeld.
func assertsFirst(body *ast.BlockStmt) bool {
	if len(body.List) == 0 {
		return false
	}
	es, ok := body.List[0].(*ast.ExprStmt)
	if !ok {
		return false
	}
	call, ok := es.X.(*ast.CallExpr)
	if !ok {
		return false
	}
	sel, ok := call.Fun.(*ast.SelectorExpr)
	return ok && sel.Sel.Name == "AssertHeld"
}
