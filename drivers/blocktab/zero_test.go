package blocktab

import (
	"errors"
	"testing"
)

func TestWriteZeros(t *testing.T) {
	type w struct{ off, n int64 }
	var got []w
	err := WriteZeros(zeroChunk-10, 2*zeroChunk+30, func(z []byte, off int64) error {
		for _, b := range z {
			if b != 0 {
				t.Fatal("a non-zero byte")
			}
		}
		got = append(got, w{off, int64(len(z))})
		return nil
	})
	want := []w{{zeroChunk - 10, 10}, {zeroChunk, zeroChunk}, {2 * zeroChunk, zeroChunk}, {3 * zeroChunk, 20}}
	if err != nil || len(got) != len(want) {
		t.Fatalf("pieces %v, %v; want %v", got, err, want)
	}
	for i := range want {
		if got[i] != want[i] {
			t.Errorf("piece %d = %v, want %v", i, got[i], want[i])
		}
	}
	boom := errors.New("boom")
	calls := 0
	if err := WriteZeros(0, 3*zeroChunk, func([]byte, int64) error { calls++; return boom }); err != boom || calls != 1 {
		t.Errorf("an error: %v after %d calls, want boom after 1", err, calls)
	}
}
