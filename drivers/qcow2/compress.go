package qcow2

import (
	"bytes"
	"compress/flate"
	"errors"
	"fmt"
	"io"
	"runtime"
	"sync"

	kflate "github.com/klauspost/compress/flate"
	"github.com/klauspost/compress/zstd"
)

// Decoders are kept in bounded free lists because creating one costs more
// than the decode itself for zstd. BenchmarkDecompressCluster, one 64 KiB
// text-like cluster on the 2-core build machine:
//
//	zstd  pooled 41-49 µs,  48 B/op | fresh 121-129 µs, 324 KB/op
//	zlib  pooled 271-282 µs, 0.4 KB/op | fresh 293-312 µs, 41 KB/op
//
// A channel rather than a sync.Pool: zstd decoders own resources that
// Close releases, and a channel lets the overflow be closed instead of left
// to the garbage collector. Decoding is CPU-bound, so more than about
// GOMAXPROCS decoders are never busy at once for long; 2*GOMAXPROCS leaves
// slack for bursts, and a burst beyond it costs a fresh decoder, not a
// wait.
var (
	flatePool = make(chan io.ReadCloser, 2*runtime.GOMAXPROCS(0))
	zstdPool  = make(chan *zstd.Decoder, 2*runtime.GOMAXPROCS(0))
)

// zstdMaxWindow bounds the memory a (possibly hostile) frame can make the
// decoder allocate. QEMU writes single-segment frames whose window is the
// content size (at most one 2 MiB cluster); 8 MiB also admits frames from
// encoders that do not record the content size, up to window log 23 (what
// zstd level 19 uses).
const zstdMaxWindow = 8 << 20

func getZstd() (*zstd.Decoder, error) {
	select {
	case d := <-zstdPool:
		return d, nil
	default:
	}
	// Concurrency 1 makes stream decoding synchronous: no goroutines
	// behind the decoder, so one that is dropped leaks nothing.
	return zstd.NewReader(nil, zstd.WithDecoderConcurrency(1),
		zstd.WithDecoderMaxWindow(zstdMaxWindow), zstd.WithDecoderLowmem(true))
}

func putZstd(d *zstd.Decoder) {
	// Drop the reference to the source so the pool pins no cluster data.
	if err := d.Reset(nil); err != nil {
		d.Close()
		return
	}
	select {
	case zstdPool <- d:
	default:
		d.Close()
	}
}

func getFlate(r io.Reader) io.ReadCloser {
	select {
	case f := <-flatePool:
		if err := f.(flate.Resetter).Reset(r, nil); err == nil {
			return f
		}
	default:
	}
	return flate.NewReader(r)
}

// noInput is what pooled flate readers point at between uses, so the pool
// pins no cluster data. Reset only stores it; nothing reads it.
var noInput = bytes.NewReader(nil)

func putFlate(f io.ReadCloser) {
	if f.(flate.Resetter).Reset(noInput, nil) != nil {
		return
	}
	select {
	case flatePool <- f:
	default:
	}
}

// decompressCluster decodes exactly len(dst) bytes (one cluster) from src,
// the bytes of the compressed range [coffset, coffset+csize) (which may hold
// trailing bytes of the next cluster's stream). typ is compressionDeflate
// (raw deflate, RFC 1951, no zlib header) or compressionZstd. Safe for
// concurrent use; errors wrap drivers.ErrCorrupt.
//
// Both formats are decoded as streams and only len(dst) bytes are pulled
// out, as QEMU does (inflate(Z_FINISH) into a cluster-sized buffer, and a
// ZSTD_decompressStream loop until the output is full): src usually ends
// with bytes that are not part of this cluster's stream, which one-shot
// decoders such as zstd's DecodeAll reject.
func decompressCluster(typ uint8, src, dst []byte) error {
	var err error
	switch typ {
	case compressionDeflate:
		f := getFlate(bytes.NewReader(src))
		_, err = io.ReadFull(f, dst)
		putFlate(f)
	case compressionZstd:
		var d *zstd.Decoder
		if d, err = getZstd(); err != nil {
			return fmt.Errorf("zstd decoder: %w", err)
		}
		if err = d.Reset(bytes.NewReader(src)); err == nil {
			_, err = io.ReadFull(d, dst)
		}
		putZstd(d)
	default:
		return corruptf("unknown compression type %d", typ)
	}
	if err != nil {
		if errors.Is(err, io.EOF) || errors.Is(err, io.ErrUnexpectedEOF) {
			return corruptf("compressed cluster (%s, %d bytes) holds less than %d bytes", compressionName(typ), len(src), len(dst))
		}
		return corruptf("compressed cluster (%s, %d bytes): %v", compressionName(typ), len(src), err)
	}
	return nil
}

func compressionName(typ uint8) string {
	switch typ {
	case compressionDeflate:
		return "zlib"
	case compressionZstd:
		return "zstd"
	}
	return fmt.Sprintf("type %d", typ)
}

// Compressors. A zstd Encoder's EncodeAll may be called concurrently, so
// one suffices; flate writers are pooled (each holds ~600 KiB of state).
//
// Deflate streams are written with klauspost's flate, which emits the same
// raw RFC 1951 format as compress/flate several times faster at the same
// level (BenchmarkCompressCluster, 64 KiB text-like cluster, level 6:
// 0.31-0.33 ms against 2.0-2.9 ms for compress/flate; zstd 0.17-0.21 ms).
// QEMU reads both encoders' streams (TestQemuReadsOurClusters). Decoding
// stays on compress/flate: klauspost's decoder measured within noise of it.
var (
	zstdEncoder = sync.OnceValues(func() (*zstd.Encoder, error) {
		// Default level and a content-size field, like QEMU's frames
		// (which QEMU 7.2 reads back; see qcow2.md §1.12).
		return zstd.NewWriter(nil, zstd.WithEncoderCRC(false))
	})
	flateWriters = sync.Pool{New: func() any {
		w, _ := kflate.NewWriter(nil, kflate.DefaultCompression) // level is valid: never fails
		return w
	}}
)

// compressCluster compresses one cluster for a compressed write. It returns
// ok=false when the stream does not fit in len(src)-1 bytes, QEMU's bound:
// such a cluster is written uncompressed instead.
func compressCluster(typ uint8, src []byte) ([]byte, bool) {
	limit := len(src) - 1
	if limit <= 0 {
		return nil, false
	}
	var out []byte
	switch typ {
	case compressionDeflate:
		w := flateWriters.Get().(*kflate.Writer)
		buf := bytes.NewBuffer(make([]byte, 0, len(src)))
		w.Reset(buf)
		_, err := w.Write(src)
		if err == nil {
			err = w.Close()
		}
		w.Reset(nil)
		flateWriters.Put(w)
		if err != nil {
			return nil, false
		}
		out = buf.Bytes()
	case compressionZstd:
		enc, err := zstdEncoder()
		if err != nil {
			return nil, false
		}
		out = enc.EncodeAll(src, make([]byte, 0, len(src)))
	default:
		return nil, false
	}
	if len(out) > limit {
		return nil, false
	}
	return out, true
}
