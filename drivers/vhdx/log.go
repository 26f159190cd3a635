package vhdx

import (
	"fmt"
	"hash/crc32"

	"imgfuse/aio"
	"imgfuse/coroutine"
	"imgfuse/drivers"
	"imgfuse/drivers/blocktab"
)

// The log entry header (64 bytes at the start of an entry; §4.6).
const (
	lSignature   = 0  // "loge"
	lChecksum    = 4  // CRC-32C over EntryLength bytes
	lEntryLength = 8  // u32, a multiple of 4 KiB
	lTail        = 12 // u32: offset of the first entry of the sequence
	lSeq         = 16 // u64
	lDescCount   = 24 // u32
	lLogGUID     = 32 // GUID
	lFlushedOff  = 48 // u64
	lLastOff     = 56 // u64
	logHdrSize   = 64
	descSize     = 32
	dataPayload  = 4084 // target bytes 8..4091 in a data sector
	// maxLogOps bounds the sector writes and zero ranges a replay holds
	// (a read-only open keeps them as an overlay: ~48 bytes each).
	maxLogOps = 1 << 20
	// maxTarget bounds a log target's offset and length: far past any
	// 64 TiB disk's file, short of overflowing an int64.
	maxTarget = 1 << 50
)

// logOp is one write of a replay, in log order: a 4 KiB sector whose
// bytes are in the log, or a range of zeros.
type logOp struct {
	off, n int64
	zero   bool
	// A data sector: its place in the file (the log's sector), and the
	// bytes the descriptor holds (target bytes 0–7 and 4092–4095).
	src   int64
	lead  [8]byte
	trail [4]byte
}

// replay is what a dirty log holds: the writes of its active sequence, and
// what the last entry says of the file.
type replay struct {
	ops            []logOp
	flushed, last  int64
	maxSeq         uint64
	nextWrite      int64 // where the next entry goes (log-relative)
	lo, hi         int64 // the file range the ops touch
	entries        int
	sequenceLength int
}

// logEntry is a valid entry found by the scan.
type logEntry struct {
	pos, length int64
	seq         uint64
	tail        int64
}

// logReader reads the log ring: log-relative offsets, wrapping.
type logReader struct {
	co       *coroutine.Co
	f        *aio.File
	off, len int64
	budget   int64 // bytes the scan may still read
}

func (r *logReader) read(p []byte, pos int64) error {
	if int64(len(p)) > r.budget {
		return fmt.Errorf("the log scan reads more than %d bytes of a %d-byte log: %w", 16*r.len+(64<<20), r.len, drivers.ErrCorrupt)
	}
	r.budget -= int64(len(p))
	for len(p) > 0 {
		pos %= r.len
		n := min(int64(len(p)), r.len-pos)
		if err := r.f.PreadCo(r.co, p[:n], r.off+pos); err != nil {
			return err
		}
		p, pos = p[n:], pos+n
	}
	return nil
}

// descSectors is how many 4 KiB sectors hold the entry header and n
// descriptors.
func descSectors(n int64) int64 { return (logHdrSize + n*descSize + sectorSize - 1) / sectorSize }

// checkEntry validates the entry at pos with the sector hdr already read:
// signature, GUID, length, CRC over the entry, descriptors and data
// sector sequence numbers. It returns nil, nil for what is no entry of
// this log.
func (r *logReader) checkEntry(hdr []byte, pos int64, g guid) (*logEntry, error) {
	if string(hdr[:4]) != "loge" || guid(hdr[lLogGUID:lLogGUID+16]) != g {
		return nil, nil
	}
	length := int64(le.Uint32(hdr[lEntryLength:]))
	n := int64(le.Uint32(hdr[lDescCount:]))
	seq := le.Uint64(hdr[lSeq:])
	if length < sectorSize || length%sectorSize != 0 || length > r.len || seq == 0 ||
		descSectors(n)*sectorSize > length || int64(le.Uint32(hdr[lTail:]))%sectorSize != 0 {
		return nil, nil
	}
	// The CRC over the whole entry, streamed.
	buf := aio.AlignedBuffer(64 << 10)
	c := crc32.Update(0, castagnoli, hdr[:lChecksum])
	c = crc32.Update(c, castagnoli, []byte{0, 0, 0, 0})
	c = crc32.Update(c, castagnoli, hdr[lChecksum+4:sectorSize])
	for done := int64(sectorSize); done < length; {
		k := min(int64(len(buf)), length-done)
		if err := r.read(buf[:k], pos+done); err != nil {
			return nil, err
		}
		c = crc32.Update(c, castagnoli, buf[:k])
		done += k
	}
	if c != le.Uint32(hdr[lChecksum:]) {
		return nil, nil
	}
	e := &logEntry{pos: pos, length: length, seq: seq, tail: int64(le.Uint32(hdr[lTail:]))}
	// Descriptors and data sectors must agree with the entry.
	ok := true
	err := r.descriptors(hdr, pos, func(d []byte, dataPos int64) error {
		if d == nil || le.Uint64(d[24:]) != seq {
			ok = false
		}
		return nil
	})
	if err != nil || !ok {
		return nil, err
	}
	return e, nil
}

// descriptors calls fn with each descriptor of the entry at pos (whose
// first sector is hdr) in order, and for a data descriptor the log
// position of its data sector, checking the data sector's signature and
// sequence number; a data sector that does not match ends the walk with
// fn(nil, -1) and no error, a descriptor of neither kind likewise.
func (r *logReader) descriptors(hdr []byte, pos int64, fn func(d []byte, dataPos int64) error) error {
	n := int64(le.Uint32(hdr[lDescCount:]))
	seq := le.Uint64(hdr[lSeq:])
	length := int64(le.Uint32(hdr[lEntryLength:]))
	dataPos := pos + descSectors(n)*sectorSize
	sec := hdr
	secBuf := make([]byte, sectorSize)
	dataBuf := aio.AlignedBuffer(sectorSize)
	for i := int64(0); i < n; i++ {
		at := logHdrSize + i*descSize // byte offset in the entry
		if at%sectorSize == 0 {
			if err := r.read(secBuf, pos+at); err != nil {
				return err
			}
			sec = secBuf
		}
		d := sec[at%sectorSize : at%sectorSize+descSize]
		switch string(d[:4]) {
		case "zero":
			if err := fn(d, -1); err != nil {
				return err
			}
		case "desc":
			if dataPos+sectorSize > pos+length {
				return fn(nil, -1)
			}
			if err := r.read(dataBuf, dataPos); err != nil {
				return err
			}
			if string(dataBuf[:4]) != "data" || le.Uint32(dataBuf[4:]) != uint32(seq>>32) || le.Uint32(dataBuf[4092:]) != uint32(seq) {
				return fn(nil, -1)
			}
			if err := fn(d, dataPos%r.len); err != nil {
				return err
			}
			dataPos += sectorSize
		default:
			return fn(nil, -1)
		}
	}
	return nil
}

// scanLog finds the active sequence of the log at [off, off+length) for
// log GUID g (§4.6): every 4 KiB position is tried for a valid entry (a
// valid entry's sectors are skipped: no entry header can start inside
// one); entries chain when one starts where the previous ends (wrapping)
// with the next sequence number; the chain whose last entry has the
// highest sequence number is active, from the entry its last entry's Tail
// names; a chain whose last entry's Tail names none of it is incomplete
// (an entry in between was torn) and no candidate. nil when there is no
// complete sequence. The scan reads at most 16 log lengths plus 64 MiB: a log
// built to cost more is refused.
func scanLog(co *coroutine.Co, f *aio.File, off, length int64, g guid, fileSize int64) (*replay, error) {
	r := &logReader{co: co, f: f, off: off, len: length, budget: 16*length + 64<<20}
	byPos := map[int64]*logEntry{}
	hdr := aio.AlignedBuffer(sectorSize)
	for pos := int64(0); pos < length; {
		if err := r.read(hdr, pos); err != nil {
			return nil, err
		}
		e, err := r.checkEntry(hdr, pos, g)
		if err != nil {
			return nil, err
		}
		if e == nil {
			pos += sectorSize
			continue
		}
		byPos[pos] = e
		pos += e.length
	}
	if len(byPos) == 0 {
		return nil, nil
	}
	next := func(e *logEntry) *logEntry {
		n := byPos[(e.pos+e.length)%length]
		if n != nil && n.seq == e.seq+1 {
			return n
		}
		return nil
	}
	hasPred := map[int64]bool{}
	for _, e := range byPos {
		if n := next(e); n != nil {
			hasPred[n.pos] = true
		}
	}
	var best []*logEntry
	for _, e := range byPos {
		if hasPred[e.pos] {
			continue
		}
		var chain []*logEntry
		for c := e; c != nil && len(chain) <= len(byPos); c = next(c) {
			chain = append(chain, c)
		}
		// A sequence is complete only if its last entry's Tail names one
		// of its entries: the ones from there on are to replay, and
		// everything before the tail is in place. An entry whose tail is
		// missing (a torn entry between them, with a bad CRC) cannot be
		// replayed without it.
		last := chain[len(chain)-1]
		from := -1
		for i, c := range chain {
			if c.pos == last.tail {
				from = i
				break
			}
		}
		if from < 0 {
			continue
		}
		if best == nil || last.seq > best[len(best)-1].seq {
			best = chain[from:]
		}
	}
	if best == nil {
		return nil, nil
	}
	last := best[len(best)-1]
	rp := &replay{maxSeq: last.seq, nextWrite: (last.pos + last.length) % length, lo: -1, entries: len(byPos), sequenceLength: len(best)}
	for _, e := range best {
		if err := r.read(hdr, e.pos); err != nil {
			return nil, err
		}
		rp.flushed = int64(le.Uint64(hdr[lFlushedOff:]) & (1<<62 - 1))
		rp.last = int64(le.Uint64(hdr[lLastOff:]) & (1<<62 - 1))
		err := r.descriptors(hdr, e.pos, func(d []byte, dataPos int64) error {
			if d == nil {
				return fmt.Errorf("log entry %d at %#x changed under the scan: %w", e.seq, e.pos, drivers.ErrCorrupt)
			}
			op := logOp{off: int64(le.Uint64(d[16:])), n: sectorSize}
			if string(d[:4]) == "zero" {
				op.zero, op.n = true, int64(le.Uint64(d[8:]))
			} else {
				op.src = off + dataPos
				copy(op.lead[:], d[8:16])
				copy(op.trail[:], d[4:8])
			}
			switch {
			case op.off%sectorSize != 0 || op.n%sectorSize != 0 || op.off < 0 || op.off > maxTarget || op.n > maxTarget:
				return fmt.Errorf("log entry %d writes [%#x, +%#x), not whole 4 KiB sectors: %w", e.seq, op.off, op.n, drivers.ErrCorrupt)
			case op.off < region1Off || (op.off < off+length && off < op.off+op.n):
				return fmt.Errorf("log entry %d writes [%#x, +%#x), over the headers or the log: %w", e.seq, op.off, op.n, drivers.ErrCorrupt)
			case len(rp.ops) >= maxLogOps:
				return fmt.Errorf("the log holds more than %d writes: %w", maxLogOps, drivers.ErrUnsupported)
			}
			if op.n == 0 {
				return nil
			}
			if rp.lo < 0 || op.off < rp.lo {
				rp.lo = op.off
			}
			rp.hi = max(rp.hi, op.off+op.n)
			rp.ops = append(rp.ops, op)
			return nil
		})
		if err != nil {
			return nil, err
		}
	}
	if rp.flushed > fileSize {
		return nil, fmt.Errorf("the log says the file was flushed to %#x, but it ends at %#x: the image has been truncated: %w",
			rp.flushed, fileSize, drivers.ErrCorrupt)
	}
	return rp, nil
}

// sector builds op's 4 KiB target sector from its log data sector in buf.
func (op *logOp) sector(buf []byte) {
	copy(buf[:8], op.lead[:])
	copy(buf[4092:], op.trail[:])
}

// apply replays rp into the file (a writable open): each op in order,
// then the file extended to the last entry's LastFileOffset, then
// fdatasync. The headers are the caller's.
func (rp *replay) apply(co *coroutine.Co, f *aio.File) error {
	buf := aio.AlignedBuffer(sectorSize)
	for i := range rp.ops {
		op := &rp.ops[i]
		if op.zero {
			if err := blocktab.WriteZeros(op.off, op.n, func(z []byte, at int64) error { return f.PwriteCo(co, z, at) }); err != nil {
				return err
			}
			continue
		}
		if err := f.PreadCo(co, buf, op.src); err != nil {
			return err
		}
		op.sector(buf)
		if err := f.PwriteCo(co, buf, op.off); err != nil {
			return err
		}
	}
	size, err := f.Size()
	if err != nil {
		return err
	}
	if rp.last > size {
		if err := f.TruncateCo(co, (rp.last+mib-1)/mib*mib); err != nil {
			return err
		}
	}
	return f.FdatasyncCo(co)
}

// patch lays the replayed writes over p, read from the file at off (a
// read-only open of a dirty image): later ops over earlier ones, as a
// replay would leave the file.
func (rp *replay) patch(co *coroutine.Co, f *aio.File, p []byte, off int64) error {
	end := off + int64(len(p))
	if rp == nil || end <= rp.lo || off >= rp.hi {
		return nil
	}
	var buf []byte
	for i := range rp.ops {
		op := &rp.ops[i]
		lo, hi := max(off, op.off), min(end, op.off+op.n)
		if lo >= hi {
			continue
		}
		if op.zero {
			clear(p[lo-off : hi-off])
			continue
		}
		if buf == nil {
			buf = aio.AlignedBuffer(sectorSize)
		}
		if err := f.PreadCo(co, buf, op.src); err != nil {
			return err
		}
		op.sector(buf)
		copy(p[lo-off:hi-off], buf[lo-op.off:hi-op.off])
	}
	return nil
}

// sectorWrite is one 4 KiB metadata sector to write through the log.
type sectorWrite struct {
	off  int64
	data []byte // 4 KiB
}

// maxEntrySectors bounds the data sectors of one entry this driver
// writes (a 1 MiB log holds 255).
const maxEntrySectors = 64

// buildEntry lays out a log entry as sectors to write at log position
// pos (its Tail: the entry is a sequence of its own): the header and
// descriptor sectors — zero ranges zs first, then the writes ws (at most
// maxEntrySectors in all) — then one data sector per write.
func buildEntry(ws []sectorWrite, zs []region, g guid, seq uint64, pos, flushed, last int64) []byte {
	n := int64(len(ws))
	ds := descSectors(n + int64(len(zs)))
	b := aio.AlignedBuffer(int((ds + n) * sectorSize))
	copy(b, "loge")
	le.PutUint32(b[lEntryLength:], uint32(len(b)))
	le.PutUint32(b[lTail:], uint32(pos))
	le.PutUint64(b[lSeq:], seq)
	le.PutUint32(b[lDescCount:], uint32(n+int64(len(zs))))
	copy(b[lLogGUID:], g[:])
	le.PutUint64(b[lFlushedOff:], uint64(flushed))
	le.PutUint64(b[lLastOff:], uint64(last))
	for i, z := range zs {
		d := b[logHdrSize+i*descSize:]
		copy(d, "zero")
		le.PutUint64(d[8:], uint64(z.length))
		le.PutUint64(d[16:], uint64(z.off))
		le.PutUint64(d[24:], seq)
	}
	for i, w := range ws {
		d := b[logHdrSize+(len(zs)+i)*descSize:]
		copy(d, "desc")
		copy(d[4:8], w.data[4092:])
		copy(d[8:16], w.data[:8])
		le.PutUint64(d[16:], uint64(w.off))
		le.PutUint64(d[24:], seq)
		s := b[(ds+int64(i))*sectorSize:]
		copy(s, "data")
		le.PutUint32(s[4:], uint32(seq>>32))
		copy(s[8:4092], w.data[8:4092])
		le.PutUint32(s[4092:], uint32(seq))
	}
	le.PutUint32(b[lChecksum:], crcOf(b, lChecksum))
	return b
}
