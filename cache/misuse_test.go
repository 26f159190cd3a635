package cache

import (
	"strings"
	"testing"

	"imgfuse/coroutine"
)

// TestMisuseInvariants: with the invariants tag, caller bugs panic at the
// call that commits them.
func TestMisuseInvariants(t *testing.T) {
	if !invariants {
		t.Skip("needs -tags invariants")
	}
	for _, tc := range []struct {
		name string
		fn   func(co *coroutine.Co, c *Cache)
		want string
	}{
		{"Put unpinned", func(co *coroutine.Co, c *Cache) {
			tb, _ := c.Get(co, 0x1000)
			c.Put(tb)
			c.Put(tb)
		}, "Put of a table"},
		{"MarkDirty unpinned", func(co *coroutine.Co, c *Cache) {
			tb, _ := c.Get(co, 0x1000)
			c.Put(tb)
			c.MarkDirty(tb)
		}, "MarkDirty of a table"},
		{"Discard pinned", func(co *coroutine.Co, c *Cache) {
			c.Get(co, 0x1000)
			c.Discard(0x1000)
		}, "Discard of table"},
		{"GetEmpty pinned", func(co *coroutine.Co, c *Cache) {
			c.Get(co, 0x1000)
			c.GetEmpty(co, 0x1000)
		}, "GetEmpty(0x1000) of a table pinned 1 times"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := New("c", 2, tsize, newFake("c", &opLog{}))
			got := ""
			coroutine.Run(func(co *coroutine.Co) {
				defer func() {
					if r, ok := recover().(string); ok {
						got = r
					}
				}()
				tc.fn(co, c)
			})
			if !strings.Contains(got, tc.want) {
				t.Fatalf("panic %q, want one containing %q", got, tc.want)
			}
		})
	}
}

// TestDiscardPinned: without the invariants tag, discarding a pinned table
// detaches it: the holder keeps valid memory, later Gets re-read, and the
// last Put frees the slot.
func TestDiscardPinned(t *testing.T) {
	if invariants {
		t.Skip("panics with -tags invariants")
	}
	log := &opLog{}
	f := newFake("c", log)
	c := New("c", 2, tsize, f)
	run(t, c, func(co *coroutine.Co) {
		a := mustGet(t, co, c, 0x1000)
		a.Bytes()[0] = 1
		c.MarkDirty(a)
		c.Discard(0x1000)
		c.MarkDirty(a) // no effect on a discarded table
		if c.ndirty != 0 {
			t.Fatalf("%d dirty tables after discarding the only one", c.ndirty)
		}
		b := mustGet(t, co, c, 0x1000)
		if b == a {
			t.Fatal("Get after Discard returned the discarded table")
		}
		if err := c.verify(); err != nil {
			t.Fatal(err)
		}
		c.Put(a)
		c.Put(b)
		if err := c.Flush(co); err != nil {
			t.Fatal(err)
		}
		checkOps(t, log, "c R 0x1000", "c R 0x1000", "c S")
		// The freed slot is reused before 0x1000 is evicted.
		c.Put(mustGet(t, co, c, 0x2000))
		c.Put(mustGet(t, co, c, 0x1000))
		checkOps(t, log, "c R 0x2000")
	})
}
