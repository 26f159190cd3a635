package fusefs

import (
	"imgfuse/coroutine"

	"fmt"
	"io"
	"log"
	"slices"
	"strings"

	"github.com/hanwen/go-fuse/v2/fuse"

	"imgfuse/drivers"
	"imgfuse/partition"
)

// This file keeps the partN files in step with the partition table on the
// disk: which writes may change the table (the footprint), re-reading it
// once the writer is done, and telling the kernel what changed. The package
// doc ("Partitions follow the table") gives the rules and their cost.

// partFile is one partition served as a file. Immutable.
type partFile struct {
	partition.Partition
	name string
	ino  uint64
}

// partTable is one reading of the partition table and the files made of
// it. Immutable once published in diskFS.table: a re-read publishes a new
// one.
type partTable struct {
	// parts are the partition files in directory order.
	parts []*partFile
	// byName maps the directory's file names (the disk's too) to inodes.
	byName map[string]uint64
	// byIno maps a partition file's inode to it. An inode that is not
	// here (and not the disk or the root) belonged to a partition that
	// changed or vanished: its handles are stale.
	byIno map[uint64]*partFile
	// footprint is every byte range of the disk the table was read from,
	// sorted and merged: the table read is a function of those bytes
	// (and the disk's size), so only a write that overlaps one can
	// change it.
	footprint []diskRange
}

// diskRange is a byte range [off, end) of the disk.
type diskRange struct{ off, end int64 }

// overlaps reports whether [off, off+n) meets a range of the footprint:
// a binary search over a few sorted ranges, no allocation (it runs after
// every write).
func (t *partTable) overlaps(off, n int64) bool {
	fp := t.footprint
	if n <= 0 || len(fp) == 0 {
		return false
	}
	end := off + n
	// The first range ending after off is the only candidate.
	lo, hi := 0, len(fp)
	for lo < hi {
		m := int(uint(lo+hi) >> 1)
		if fp[m].end <= off {
			lo = m + 1
		} else {
			hi = m
		}
	}
	return lo < len(fp) && fp[lo].off < end
}

// recorder is an io.ReaderAt that notes the ranges read through it.
type recorder struct {
	r     io.ReaderAt
	spans []diskRange
}

func (r *recorder) ReadAt(p []byte, off int64) (int, error) {
	r.spans = append(r.spans, diskRange{off, off + int64(len(p))})
	return r.r.ReadAt(p, off)
}

// merged returns the recorded ranges sorted, with overlapping and adjacent
// ranges joined.
func (r *recorder) merged() []diskRange {
	s := slices.Clone(r.spans)
	slices.SortFunc(s, func(a, b diskRange) int {
		switch {
		case a.off < b.off:
			return -1
		case a.off > b.off:
			return 1
		}
		return 0
	})
	var out []diskRange
	for _, x := range s {
		if k := len(out) - 1; k >= 0 && x.off <= out[k].end {
			out[k].end = max(out[k].end, x.end)
			continue
		}
		out = append(out, x)
	}
	return out
}

// readPartitions reads the disk's partition table for the partN files and
// returns the partitions and the footprint (see partTable). A table that
// cannot be read is ignored with one log line: the disk itself is still
// served, and a write to what was read (the MBR at least) reads it again.
func readPartitions(d drivers.Driver, logger *log.Logger) ([]partition.Partition, []diskRange) {
	rec := &recorder{r: drivers.ReaderAt(d)}
	t, err := partition.Read(rec, d.Size())
	fp := rec.merged()
	if err != nil {
		logger.Printf("ignoring the partition table, no partN files: %v", err)
		return nil, fp
	}
	if t == nil {
		return nil, fp
	}
	for _, w := range t.Warnings {
		logger.Printf("partition table: %s", w)
	}
	return t.Parts, fp
}

// newPartTable builds the files of parts. A partition whose number and
// byte range are those of a file in old keeps that file's inode, so its
// open handles go on working; every other partition gets an inode never
// used before (*nextIno counts them), so that a handle opened on an older
// range can never reach a new one.
func newPartTable(diskName string, diskIno uint64, old *partTable, parts []partition.Partition, footprint []diskRange, nextIno *uint64) *partTable {
	t := &partTable{
		byName:    map[string]uint64{diskName: diskIno},
		byIno:     map[uint64]*partFile{},
		footprint: footprint,
	}
	for _, p := range parts {
		name := partName(p.Number)
		if _, dup := t.byName[name]; dup {
			continue // --name part1 wins over partition 1
		}
		f := &partFile{Partition: p, name: name}
		if old != nil {
			if ino, ok := old.byName[name]; ok {
				if o := old.byIno[ino]; o != nil && o.Start == p.Start && o.Size == p.Size {
					f.ino = ino
				}
			}
		}
		if f.ino == 0 {
			f.ino = *nextIno
			*nextIno++
		}
		t.byName[name] = f.ino
		t.byIno[f.ino] = f
		t.parts = append(t.parts, f)
	}
	return t
}

// partitions returns the table's partitions.
func (t *partTable) partitions() []partition.Partition {
	out := make([]partition.Partition, len(t.parts))
	for i, f := range t.parts {
		out[i] = f.Partition
	}
	return out
}

// notifier is what the table needs of fuse.Server: invalidating the
// kernel's cached entries and attributes.
type notifier interface {
	EntryNotify(parent uint64, name string) fuse.Status
	InodeNotify(node uint64, off int64, length int64) fuse.Status
}

// tableChange is what a re-read changed, for the kernel and the log.
type tableChange struct {
	// names are the directory entries whose inode changed, appeared or
	// went away.
	names []string
	// log describes the change, one item per file.
	log []string
}

// diff compares two tables.
func diff(old, nt *partTable) tableChange {
	var c tableChange
	for _, f := range old.parts {
		if ino, ok := nt.byName[f.name]; !ok || nt.byIno[ino] == nil {
			c.names = append(c.names, f.name)
			c.log = append(c.log, f.name+" removed")
		} else if ino != f.ino {
			c.names = append(c.names, f.name)
			n := nt.byIno[ino]
			c.log = append(c.log, fmt.Sprintf("%s now %d+%d (was %d+%d)", f.name, n.Start, n.Size, f.Start, f.Size))
		}
	}
	for _, f := range nt.parts {
		if _, ok := old.byName[f.name]; !ok {
			c.names = append(c.names, f.name)
			c.log = append(c.log, fmt.Sprintf("%s added at %d+%d", f.name, f.Start, f.Size))
		}
	}
	return c
}

// noteWrite records that [off, off+n) of the disk was written (or
// discarded, or zeroed): if that range was read for the partition table,
// the table is read again once the writer is done with it. It costs an
// atomic load and a comparison or two, and allocates nothing: it runs on
// every write. Call it after the write, so that a re-read that cleared the
// flag before the write landed is followed by another.
func (fs *diskFS) noteWrite(off, n int64) {
	if !fs.dirMode {
		return
	}
	if fs.table.Load().overlaps(off, n) {
		fs.tableDirty.Store(true)
	}
}

// readTable reads the partition table at mount time, before serving.
func (fs *diskFS) readTable() {
	parts, fp := readPartitions(fs.d, fs.logger)
	fs.table.Store(newPartTable(fs.name, fs.diskIno, nil, parts, fp, &fs.nextIno))
}

// settle is settleTable from a request's coroutine. Re-reading the table
// reads through the driver with coroutine.Run, waits for ioMu and may wait
// for the kernel (notifications): all of it leaves the loop through a
// worker. The check that nothing changed, the common case, stays here.
func (fs *diskFS) settle(co *coroutine.Co, wait bool) (changed bool) {
	if !fs.tableDirty.Load() {
		return false
	}
	coroutine.RunInWorker(co, func() { changed = fs.settleTable(wait) })
	return changed
}

// settleTable re-reads the partition table if a write touched it since the
// last reading, publishes the new files and tells the kernel what changed.
// wait says whether to tell the kernel before returning: only from a
// request that holds no directory lock in the kernel (FLUSH, FSYNC,
// RELEASE), since invalidating an entry takes the directory's lock, which
// LOOKUP and READDIR hold while they wait for our answer. Those answer from
// the new table at once and leave the invalidation to a goroutine. It
// reports whether the files changed.
func (fs *diskFS) settleTable(wait bool) (changed bool) {
	if !fs.tableDirty.Load() {
		return false
	}
	fs.refreshMu.Lock()
	if !fs.tableDirty.Swap(false) {
		fs.refreshMu.Unlock()
		return false
	}
	parts, fp := readPartitions(fs.d, fs.logger)
	old := fs.table.Load()
	nt := newPartTable(fs.name, fs.diskIno, old, parts, fp, &fs.nextIno)
	// Taking ioMu waits for the partition I/O in flight, which started
	// under the old table: once the new table is published no request
	// reaches a range that changed or vanished.
	fs.ioMu.Lock()
	fs.table.Store(nt)
	fs.ioMu.Unlock()
	fs.refreshMu.Unlock()

	c := diff(old, nt)
	if len(c.names) == 0 {
		return false
	}
	fs.logger.Printf("partition table changed: %s", strings.Join(c.log, ", "))
	switch {
	case fs.notify == nil:
	case wait:
		fs.invalidate(c.names)
	default:
		go fs.invalidate(c.names)
	}
	return true
}

// invalidate drops the kernel's cached entries of names, the directory's
// attributes and cached listing (OpenDir lets the kernel cache it), and
// the disk's attributes (its attribute timeout depends on the partitions).
// A name the kernel has not cached answers ENOENT, which is fine.
func (fs *diskFS) invalidate(names []string) {
	for _, n := range names {
		fs.notify.EntryNotify(fuse.FUSE_ROOT_ID, n)
	}
	fs.notify.InodeNotify(fuse.FUSE_ROOT_ID, 0, 0)
	fs.notify.InodeNotify(fs.diskIno, -1, 0)
}
