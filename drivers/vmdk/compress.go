package vmdk

import (
	"bytes"
	"compress/zlib"
	"fmt"
	"io"

	"imgfuse/coroutine"
	"imgfuse/drivers"
	"imgfuse/drivers/blocktab"
)

// grainMarkerBytes is a compressed grain's marker: u64 LE sector of the
// grain in the extent, u32 LE size of the compressed data that follows.
const grainMarkerBytes = 12

// readCompressed fills p, piece pc of a compressed grain whose marker is
// at host, as QEMU's vmdk_read_cluster does: it reads two grains' worth
// from the marker (less at the end of the file), takes the size the marker
// gives (neither 0 nor past what was read), and inflates the zlib stream
// (RFC 1950, not raw deflate) in a worker, to at most one grain. A stream
// that is damaged, too long, or stored for another grain fails the read
// with EIO.
func (s *sparse) readCompressed(co *coroutine.Co, p []byte, host, end int64, pc blocktab.Piece) error {
	n := min(2*s.grainBytes+grainMarkerBytes, end-host)
	if n <= grainMarkerBytes {
		return fmt.Errorf("vmdk: %s: compressed grain %d at %#x cut by the end of the file: %w", s.path, pc.Block, host, drivers.ErrCorrupt)
	}
	buf := make([]byte, n)
	if err := s.f.PreadCo(co, buf, host); err != nil {
		return fmt.Errorf("vmdk: %w", err)
	}
	lba, size := le.Uint64(buf), int64(le.Uint32(buf[8:]))
	if size == 0 || size > n-grainMarkerBytes {
		return fmt.Errorf("vmdk: %s: compressed grain %d at %#x: stream of %d bytes (at most %d): %w",
			s.path, pc.Block, host, size, n-grainMarkerBytes, drivers.ErrCorrupt)
	}
	if lba != uint64(pc.Block*s.h.grainSize) {
		return fmt.Errorf("vmdk: %s: compressed grain %d at %#x is marked as sector %d: %w",
			s.path, pc.Block, host, lba, drivers.ErrCorrupt)
	}
	grain := make([]byte, s.grainBytes)
	var err error
	coroutine.RunInWorker(co, func() { err = inflate(grain, buf[grainMarkerBytes:grainMarkerBytes+size]) })
	if err != nil {
		return fmt.Errorf("vmdk: %s: compressed grain %d at %#x: %v: %w", s.path, pc.Block, host, err, drivers.ErrCorrupt)
	}
	copy(p, grain[pc.In:pc.In+pc.Len])
	return nil
}

// inflate decompresses the zlib stream src into dst, which it must fill
// at most (the last grain of an extent may be stored short: the rest
// reads as zeros).
func inflate(dst, src []byte) error {
	zr, err := zlib.NewReader(bytes.NewReader(src))
	if err != nil {
		return err
	}
	n, err := io.ReadFull(zr, dst)
	switch {
	case err == io.ErrUnexpectedEOF || err == io.EOF:
		clear(dst[n:])
	case err != nil:
		return err
	default:
		var one [1]byte
		if k, _ := zr.Read(one[:]); k > 0 {
			return fmt.Errorf("the stream inflates past one grain")
		}
	}
	return zr.Close()
}
