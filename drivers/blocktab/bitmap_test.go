package blocktab

import (
	"math/rand"
	"testing"
)

// TestBitmap holds Set, Test, Run and All to a bool-slice model, in both
// bit orders, including runs that cross bytes.
func TestBitmap(t *testing.T) {
	for _, msb := range []bool{true, false} {
		rng := rand.New(rand.NewSource(1))
		m := Bitmap{B: make([]byte, 8), MSBFirst: msb}
		model := make([]bool, 64)
		for step := 0; step < 200; step++ {
			k, n := rng.Int63n(64), int64(0)
			n = 1 + rng.Int63n(64-k)
			if rng.Intn(3) == 0 {
				m.Set(k, n)
				for i := k; i < k+n; i++ {
					model[i] = true
				}
			}
			run := int64(1)
			for run < n && model[k+run] == model[k] {
				run++
			}
			if got := m.Run(k, n); got != run {
				t.Fatalf("msb=%v step %d: Run(%d,%d)=%d want %d", msb, step, k, n, got, run)
			}
			if got := m.All(k, n); got != (run == n && model[k]) {
				t.Fatalf("msb=%v: All(%d,%d)=%v", msb, k, n, got)
			}
		}
	}
	m := Bitmap{B: []byte{0x80, 0x01}, MSBFirst: true}
	if !m.Test(0) || m.Test(7) || !m.Test(15) {
		t.Errorf("MSB-first bit order wrong: %08b", m.B)
	}
	l := Bitmap{B: []byte{0x80, 0x01}}
	if l.Test(0) || !l.Test(7) || !l.Test(8) {
		t.Errorf("LSB-first bit order wrong: %08b", l.B)
	}
}

func TestSplit(t *testing.T) {
	var got []Piece
	_ = Split(1000, 5000, 2048, func(p Piece) error { got = append(got, p); return nil })
	want := []Piece{{0, 1000, 0, 1048}, {1, 0, 1048, 2048}, {2, 0, 3096, 1904}}
	if len(got) != len(want) {
		t.Fatalf("%v", got)
	}
	for i := range want {
		if got[i] != want[i] {
			t.Fatalf("%v, want %v", got, want)
		}
	}
}
