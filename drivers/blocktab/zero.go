package blocktab

import (
	"sync"

	"imgfuse/aio"
)

// zeroChunk bounds one write of zeros.
const zeroChunk = 1 << 20

var zeros = sync.OnceValue(func() []byte { return aio.AlignedBuffer(zeroChunk) })

// WriteZeros covers [off, off+n) with zeros by calling write with pieces
// of a shared, aligned, read-only buffer of zeros, each at most 1 MiB and
// none crossing a 1 MiB boundary of off.
func WriteZeros(off, n int64, write func(z []byte, off int64) error) error {
	z := zeros()
	for n > 0 {
		c := min(n, zeroChunk-off%zeroChunk)
		if err := write(z[:c], off); err != nil {
			return err
		}
		off += c
		n -= c
	}
	return nil
}
