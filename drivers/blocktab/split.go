package blocktab

// Piece is the part of a request inside one block.
type Piece struct {
	Block int64 // block index
	In    int64 // offset inside the block
	Pos   int64 // offset inside the request
	Len   int64
}

// Split calls fn for each block-sized piece of [off, off+n), in order,
// until fn fails. blockSize is a power of two.
func Split(off, n, blockSize int64, fn func(Piece) error) error {
	for pos := int64(0); pos < n; {
		o := off + pos
		in := o & (blockSize - 1)
		l := min(n-pos, blockSize-in)
		if err := fn(Piece{Block: o / blockSize, In: in, Pos: pos, Len: l}); err != nil {
			return err
		}
		pos += l
	}
	return nil
}
