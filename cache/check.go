package cache

import "fmt"

// check verifies the cache's bookkeeping when built with the invariants tag;
// otherwise it compiles to nothing. It is O(tables), so only tests pay it.
func (c *Cache) check() {
	if !invariants {
		return
	}
	if err := c.verify(); err != nil {
		panic(err)
	}
}

// verify checks that the index, the LRU list, the pin counts and the dirty
// count agree.
func (c *Cache) verify() error {
	inLRU := make(map[*Table]bool)
	for t := c.lru.next; t != &c.lru; t = t.next {
		if t.next.prev != t {
			return fmt.Errorf("cache %s: LRU list broken at table %#x", c.name, t.off)
		}
		if inLRU[t] {
			return fmt.Errorf("cache %s: LRU list loops at table %#x", c.name, t.off)
		}
		inLRU[t] = true
	}
	dirty, indexed := 0, 0
	for i := range c.tables {
		t := &c.tables[i]
		switch {
		case t.ref < 0:
			return fmt.Errorf("cache %s: table %#x pinned %d times", c.name, t.off, t.ref)
		case (t.ref == 0) != inLRU[t]:
			return fmt.Errorf("cache %s: table %#x pinned %d times, in LRU list %v", c.name, t.off, t.ref, inLRU[t])
		case t.detached && (t.ref == 0 || t.dirty):
			return fmt.Errorf("cache %s: detached table %#x pinned %d dirty %v", c.name, t.off, t.ref, t.dirty)
		case t.off < 0 && (t.ref != 0 || t.dirty):
			return fmt.Errorf("cache %s: free slot %d pinned %d dirty %v", c.name, i, t.ref, t.dirty)
		}
		if t.dirty {
			dirty++
		}
		if t.off >= 0 && !t.detached {
			indexed++
			if got := c.index.lookup(t.off); got != t {
				return fmt.Errorf("cache %s: index maps %#x to %p, want %p", c.name, t.off, got, t)
			}
		}
	}
	if dirty != c.ndirty {
		return fmt.Errorf("cache %s: %d dirty tables, counted %d", c.name, dirty, c.ndirty)
	}
	n := 0
	for _, s := range c.index.slots {
		if s.off >= 0 {
			n++
			if s.t.off != s.off || s.t.detached {
				return fmt.Errorf("cache %s: index slot %#x holds table %#x", c.name, s.off, s.t.off)
			}
		}
	}
	if n != indexed {
		return fmt.Errorf("cache %s: index holds %d tables, want %d", c.name, n, indexed)
	}
	return nil
}
