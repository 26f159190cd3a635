package tests

import (
	"go/ast"
	"go/parser"
	"go/token"
	"sort"
	"strings"
	"testing"
)

// textMatchers are the functions of packages strings and bytes that
// recognise or cut text: given an error's text, each decides something by
// words that no compiler checks and any rewording breaks.
var textMatchers = map[string]bool{
	"Contains": true, "ContainsAny": true, "ContainsRune": true, "ContainsFunc": true,
	"HasPrefix": true, "HasSuffix": true, "EqualFold": true, "Count": true,
	"Index": true, "IndexAny": true, "IndexByte": true, "IndexRune": true, "LastIndex": true,
	"Cut": true, "CutPrefix": true, "CutSuffix": true, "TrimPrefix": true, "TrimSuffix": true,
	"Replace": true, "ReplaceAll": true, "Split": true, "SplitN": true,
	"MatchString": true, "Match": true, // regexp
}

// errorTextMatches returns, as "file:line: func", every place in f where
// the text of an error (a call of a method Error(), or a variable holding
// one, however derived) is handed to a text matcher or compared with ==
// or !=.
func errorTextMatches(fset *token.FileSet, f *ast.File) []string {
	var found []string
	for _, decl := range f.Decls {
		fn, ok := decl.(*ast.FuncDecl)
		if !ok || fn.Body == nil {
			continue
		}
		tainted := map[string]bool{}
		var isText func(e ast.Expr) bool
		isText = func(e ast.Expr) bool {
			hit := false
			ast.Inspect(e, func(n ast.Node) bool {
				switch n := n.(type) {
				case *ast.CallExpr:
					if sel, ok := n.Fun.(*ast.SelectorExpr); ok && sel.Sel.Name == "Error" && len(n.Args) == 0 {
						hit = true
					}
				case *ast.Ident:
					if tainted[n.Name] {
						hit = true
					}
				}
				return !hit
			})
			return hit
		}
		// Taint to a fixed point: msg := err.Error(); s := msg + "x".
		for changed := true; changed; {
			changed = false
			ast.Inspect(fn.Body, func(n ast.Node) bool {
				as, ok := n.(*ast.AssignStmt)
				if !ok {
					return true
				}
				for i, lhs := range as.Lhs {
					id, ok := lhs.(*ast.Ident)
					if !ok || tainted[id.Name] || id.Name == "_" {
						continue
					}
					rhs := as.Rhs[0]
					if len(as.Rhs) == len(as.Lhs) {
						rhs = as.Rhs[i]
					}
					if isText(rhs) {
						tainted[id.Name], changed = true, true
					}
				}
				return true
			})
		}
		ast.Inspect(fn.Body, func(n ast.Node) bool {
			switch n := n.(type) {
			case *ast.CallExpr:
				sel, ok := n.Fun.(*ast.SelectorExpr)
				if !ok || !textMatchers[sel.Sel.Name] {
					return true
				}
				if x, ok := sel.X.(*ast.Ident); !ok || (x.Name != "strings" && x.Name != "bytes" && x.Name != "regexp") {
					if !ok || sel.Sel.Name != "MatchString" && sel.Sel.Name != "Match" {
						return true
					}
				}
				for _, a := range n.Args {
					if isText(a) {
						found = append(found, fset.Position(n.Pos()).String()+": "+fn.Name.Name)
						break
					}
				}
			case *ast.BinaryExpr:
				if (n.Op == token.EQL || n.Op == token.NEQ) && (isText(n.X) || isText(n.Y)) {
					found = append(found, fset.Position(n.Pos()).String()+": "+fn.Name.Name)
				}
			}
			return true
		})
	}
	return found
}

// TestErrorsNotMatchedByText: no library or command code recognises an
// error by its text (strings.Contains(err.Error(), ...), a prefix trimmed
// off it, err.Error() == "..."). Errors are values: sentinels, types and
// fields (imgtool.Error) say what happened; the text is for people.
func TestErrorsNotMatchedByText(t *testing.T) {
	fset := token.NewFileSet()
	files, _ := parseModule(t)
	checked := 0
	for _, sf := range files {
		if sf.test {
			continue
		}
		f, err := parser.ParseFile(fset, sf.path, nil, 0)
		if err != nil {
			t.Fatal(err)
		}
		checked++
		for _, hit := range errorTextMatches(fset, f) {
			t.Errorf("%s: an error recognised or cut by its text; match a sentinel or a type (errors.Is/As) instead", hit)
		}
	}
	if checked < 50 {
		t.Errorf("only %d files checked: the source walk is broken", checked)
	}
}

// TestErrorTextLintFinds is the positive control: the check finds each
// way of matching an error's text, and passes what only renders it.
func TestErrorTextLintFinds(t *testing.T) {
	const src = `package p

func direct(err error) bool { return strings.Contains(err.Error(), "busy") }

func viaVar(err error) string {
	msg := err.Error()
	s := "x: " + msg
	return strings.TrimPrefix(s, "x: ")
}

func equal(err error) bool { return err.Error() == "EOF" }

func regex(err error) bool { return re.MatchString(err.Error()) }

func render(err error) string {
	msg := err.Error()
	return strings.Join(strings.Fields(msg), " ") + fmt.Sprintf("%v", err)
}

func other(out string) bool { return strings.Contains(out, "busy") }
`
	fset := token.NewFileSet()
	f, err := parser.ParseFile(fset, "p.go", src, 0)
	if err != nil {
		t.Fatal(err)
	}
	var got []string
	for _, hit := range errorTextMatches(fset, f) {
		got = append(got, hit[strings.LastIndex(hit, ": ")+2:])
	}
	sort.Strings(got)
	if strings.Join(got, ",") != "direct,equal,regex,viaVar" {
		t.Errorf("found %v, want direct, equal, regex and viaVar", got)
	}
}
