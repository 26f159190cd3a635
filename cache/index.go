package cache

import "math/bits"

// index maps file offsets to cached tables: an open-addressed hash table
// with linear probing, sized to at most half full so a probe sequence is
// short. Unlike QEMU's lookup (a linear scan of the whole cache on a miss,
// which is every miss), a miss here ends at the first empty slot.
type index struct {
	slots []slot
	// shift turns the 64-bit product of the hash into a slot number.
	shift uint
	mask  uint64
}

type slot struct {
	off int64 // -1 if empty
	t   *Table
}

func (x *index) init(tables, tableSize int) {
	n := 1 << bits.Len(uint(2*tables-1)) // power of two >= 2*tables
	if n < 4 {
		n = 4
	}
	x.slots = make([]slot, n)
	x.mask = uint64(n - 1)
	x.shift = uint(64 - bits.TrailingZeros(uint(n)))
	x.reset()
}

func (x *index) reset() {
	for i := range x.slots {
		x.slots[i] = slot{off: -1}
	}
}

// home is the first slot probed for off. Fibonacci hashing: table offsets
// are multiples of the table size, so their low bits are all zero; the
// multiplication carries the varying bits into the top ones we keep.
func (x *index) home(off int64) uint64 {
	return (uint64(off) * 0x9E3779B97F4A7C15) >> x.shift
}

func (x *index) lookup(off int64) *Table {
	for i := x.home(off); ; i = (i + 1) & x.mask {
		s := &x.slots[i]
		if s.off == off {
			return s.t
		}
		if s.off < 0 {
			return nil
		}
	}
}

// insert adds t under t.off, which must not be present.
func (x *index) insert(t *Table) {
	i := x.home(t.off)
	for x.slots[i].off >= 0 {
		i = (i + 1) & x.mask
	}
	x.slots[i] = slot{off: t.off, t: t}
}

// remove deletes off if present, shifting later members of its probe run
// back so that lookups need no tombstones.
func (x *index) remove(off int64) {
	i := x.home(off)
	for {
		if x.slots[i].off == off {
			break
		}
		if x.slots[i].off < 0 {
			return
		}
		i = (i + 1) & x.mask
	}
	// i is the hole. Move back any later entry whose home is not in the
	// cyclic range (i, j].
	j := i
	for {
		j = (j + 1) & x.mask
		s := x.slots[j]
		if s.off < 0 {
			break
		}
		h := x.home(s.off)
		// s may fill the hole iff its home is cyclically outside (i, j].
		if (j-h)&x.mask >= (j-i)&x.mask {
			x.slots[i] = s
			i = j
		}
	}
	x.slots[i] = slot{off: -1}
}
