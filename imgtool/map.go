package imgtool

import (
	"bufio"
	"fmt"
	"io"

	"imgfuse/coroutine"
	"imgfuse/drivers"
)

// Map prints the allocation map of image from start, at most maxLen
// bytes (-1: to the end), as qemu-img map does.
func Map(stdout io.Writer, image, format string, start, maxLen int64, jsonOut bool) error {
	d, f, err := OpenForInspect(image, format, drivers.OpenOptions{ForceShare: true})
	if err != nil {
		return err
	}
	defer d.Close()
	// QEMU sees a raw file as whole sectors: the tail after its last
	// byte maps as zeros at depth 0 (see qemuVirtualSize).
	size := d.Size()
	end := QemuVirtualSize(f.Name(), size)
	if maxLen >= 0 {
		end = min(end, start+maxLen)
	}
	names := layerNames(d, image)
	w := bufio.NewWriter(stdout)
	if jsonOut {
		w.WriteString("[")
	} else {
		fmt.Fprintf(w, "%-16s%-16s%-16s%s\n", "Offset", "Length", "Mapped to", "File")
	}
	var cur drivers.MapEntry
	first := true
	emit := func(e drivers.MapEntry) {
		if jsonOut {
			if !first {
				w.WriteString(",\n")
			}
			fmt.Fprintf(w, `{ "start": %d, "length": %d, "depth": %d, "present": %t, "zero": %t, "data": %t`,
				e.Start, e.Length, e.Depth, e.Present, e.Zero, e.Data)
			if e.Offset != nil {
				fmt.Fprintf(w, `, "offset": %d`, *e.Offset)
			}
			w.WriteString("}")
		} else if e.Data && !e.Zero && e.Offset != nil {
			// As qemu-img prints it: data that reads as zeros (a
			// preallocated cluster) is left out.
			name := names[e.Depth]
			if fm, ok := e.Layer.(drivers.FileMapper); ok {
				if n := fm.MapFile(e.Start); n != "" {
					name = n
				}
			}
			fmt.Fprintf(w, "%-16s%-16s%-16s%s\n", cHex(e.Start), cHex(e.Length), cHex(*e.Offset), name)
		}
		first = false
	}
	var merr error
	for off := start; off < end && merr == nil; {
		var e drivers.MapEntry
		if off < size {
			coroutine.Run(func(co *coroutine.Co) { e, merr = drivers.MapAt(co, d, off) })
			if merr != nil {
				break
			}
		} else {
			tail := off
			e = drivers.MapEntry{Start: off, Length: end - off, Present: true, Zero: true, Offset: &tail}
		}
		e.Length = min(e.Length, end-off)
		off += e.Length
		if mergeable(&cur, &e) {
			cur.Length += e.Length
			continue
		}
		if cur.Length != 0 {
			emit(cur)
		}
		cur = e
	}
	if cur.Length != 0 {
		emit(cur)
	} else if merr == nil {
		// Nothing to map (an empty disk or range): qemu-img prints
		// its empty entry.
		emit(drivers.MapEntry{Start: start})
	}
	if jsonOut {
		w.WriteString("]\n")
	}
	if err := w.Flush(); err != nil {
		return err
	}
	if merr != nil {
		return DriverError("map", image, ExitFailure, merr)
	}
	return nil
}

// cHex formats n as C's printf("%#x") does: 0 without a prefix.
func cHex(n int64) string {
	if n == 0 {
		return "0"
	}
	return fmt.Sprintf("%#x", n)
}

// mergeable is qemu-img map's entry_mergeable: next continues cur with the
// same status, at the same depth, contiguously in the same file.
func mergeable(cur, next *drivers.MapEntry) bool {
	if cur.Length == 0 || cur.Zero != next.Zero || cur.Data != next.Data || cur.Depth != next.Depth ||
		cur.Present != next.Present || (cur.Offset == nil) != (next.Offset == nil) {
		return false
	}
	// qemu-img names a run's file only where it has an offset.
	return cur.Offset == nil || (*cur.Offset+cur.Length == *next.Offset && mapFile(cur) == mapFile(next))
}

// mapFile is the file a FileMapper layer names for e, "" otherwise.
func mapFile(e *drivers.MapEntry) string {
	if fm, ok := e.Layer.(drivers.FileMapper); ok {
		return fm.MapFile(e.Start)
	}
	return ""
}

// layerNames names the file that holds each layer's data, top first: the
// image file, or its external data file.
func layerNames(d drivers.Driver, image string) []string {
	var names []string
	for d != nil {
		name := image
		if in, ok := d.(drivers.Informer); ok {
			info := in.Info()
			name = info.Filename
			if info.DataFile != "" {
				name = PathCombine(info.Filename, info.DataFile)
			}
		}
		names = append(names, name)
		lm, ok := d.(drivers.LayerMapper)
		if !ok {
			break
		}
		d = lm.BackingLayer()
	}
	for len(names) < 64 {
		names = append(names, "")
	}
	return names
}
