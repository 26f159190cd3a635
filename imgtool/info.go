package imgtool

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"os"
	"strconv"
	"strings"
	"syscall"
	"text/tabwriter"
	"time"

	"imgfuse/aio"
	"imgfuse/drivers"
)

// OutputFlag validates --output and folds --json into it.
func OutputFlag(output string, asJSON bool) (jsonOut bool, err error) {
	switch output {
	case "json":
		return true, nil
	case "human":
		return asJSON, nil
	}
	return false, Usagef("invalid --output %q (want human or json)", output)
}

// ChainLink is one image of a backing chain as info describes it; err is
// set (and info only names the file) when the image could not be opened.
type ChainLink struct {
	Info drivers.ImageInfo
	Err  error
	// Parts is the top image's partition table (nil below it).
	Parts *partitionList
}

// ImageChain opens image and then each backing file in turn, each without
// its own backing file (as qemu-img info does), so that a missing or
// broken backing file still lets the images above it be described. With
// strict set, such a backing file is an error; otherwise it ends the chain
// with a link that carries the error.
func ImageChain(image, format string, strict bool) ([]ChainLink, error) {
	if err := RefuseRemote(image); err != nil {
		return nil, err
	}
	info, err := DescribeImage(image, format)
	if err != nil {
		return nil, err
	}
	links := []ChainLink{{Info: info, Parts: readPartitionList(image, format)}}
	seen := map[[2]uint64]bool{}
	fileID := func(path string) ([2]uint64, bool) {
		var st syscall.Stat_t
		if syscall.Stat(path, &st) != nil {
			return [2]uint64{}, false
		}
		return [2]uint64{st.Dev, st.Ino}, true
	}
	if id, ok := fileID(image); ok {
		seen[id] = true
	}
	for depth := 0; info.BackingFilename != ""; depth++ {
		next := PathCombine(info.Filename, info.BackingFilename)
		if depth >= 64 {
			return nil, Errorf("open", image, ExitCorrupt, "backing chain deeper than 64 images")
		}
		bfmt := info.BackingFormat
		if bfmt == "" {
			bfmt = "auto"
		}
		id, ok := fileID(next)
		if ok && seen[id] {
			// QEMU: "Backing file '...' creates an infinite loop".
			err = Errorf("open", next, ExitCorrupt, "backing chain loop: the file appears twice in the chain")
		} else {
			if ok {
				seen[id] = true
			}
			info, err = DescribeImage(next, bfmt)
			err = AsBacking(err)
		}
		if err != nil {
			if strict {
				return nil, fmt.Errorf("backing file of %s: %w", links[len(links)-1].Info.Filename, err)
			}
			links = append(links, ChainLink{Info: drivers.ImageInfo{Filename: next, Format: info.BackingFormat}, Err: err})
			break
		}
		links = append(links, ChainLink{Info: info})
	}
	return links, nil
}

// DescribeImage opens image read-only without its backing file and
// without image locks, and describes it.
func DescribeImage(image, format string) (drivers.ImageInfo, error) {
	d, f, err := OpenForInspect(image, format, drivers.OpenOptions{ForceShare: true, NoBacking: true, NoDataFile: true})
	if err != nil {
		return drivers.ImageInfo{}, err
	}
	defer d.Close()
	var info drivers.ImageInfo
	if in, ok := d.(drivers.Informer); ok {
		info = in.Info()
	} else {
		info = drivers.ImageInfo{Filename: image, Format: f.Name(), VirtualSize: d.Size()}
	}
	if fi, err := os.Stat(image); err == nil {
		info.FileSize = fi.Size()
	}
	if info.Snapshots == nil {
		if s, ok := d.(drivers.Snapshotter); ok {
			info.Snapshots = s.Snapshots()
		}
	}
	info.Filename = image
	info.Backing = nil
	info.VirtualSize = QemuVirtualSize(info.Format, info.VirtualSize)
	return info, nil
}

// QemuVirtualSize is the virtual size QEMU gives an image of format and
// size: a raw file's is rounded up to whole 512-byte sectors (QEMU's block
// layer counts sectors), which info, map and create -b report as qemu-img
// does. The mount exposes the file's own size.
func QemuVirtualSize(format string, size int64) int64 {
	if format == "raw" {
		return (size + 511) &^ 511
	}
	return size
}

// PathCombine resolves a file name stored in an image relative to the
// image's own name, as QEMU's path_combine does: absolute names stay, and
// a relative one replaces the last component of base.
//
// A URL stays as it is (a remote image, see package remote).
func PathCombine(base, name string) string {
	if strings.HasPrefix(name, "/") || aio.IsURL(name) {
		return name
	}
	i := strings.LastIndexByte(base, '/')
	return base[:i+1] + name
}

// qemuInfo is one image in the JSON shape of qemu-img info --output=json
// (QEMU's ImageInfo). Optional fields are left out exactly when qemu-img
// leaves them out.
type qemuInfo struct {
	Filename              string                  `json:"filename"`
	Format                string                  `json:"format"`
	DirtyFlag             bool                    `json:"dirty-flag"`
	ActualSize            *int64                  `json:"actual-size,omitempty"`
	VirtualSize           int64                   `json:"virtual-size"`
	ClusterSize           int64                   `json:"cluster-size,omitempty"`
	BackingFilename       string                  `json:"backing-filename,omitempty"`
	FullBackingFilename   string                  `json:"full-backing-filename,omitempty"`
	BackingFilenameFormat string                  `json:"backing-filename-format,omitempty"`
	Snapshots             []qemuSnapshot          `json:"snapshots,omitempty"`
	FormatSpecific        *drivers.FormatSpecific `json:"format-specific,omitempty"`
	Imgfuse               *imgfuseExtra           `json:"imgfuse,omitempty"`
}

// qemuSnapshot is QEMU's SnapshotInfo.
type qemuSnapshot struct {
	ID          string `json:"id"`
	Name        string `json:"name"`
	VMStateSize int64  `json:"vm-state-size"`
	DateSec     int64  `json:"date-sec"`
	DateNsec    int64  `json:"date-nsec"`
	VMClockSec  int64  `json:"vm-clock-sec"`
	VMClockNsec int64  `json:"vm-clock-nsec"`
	Icount      *int64 `json:"icount,omitempty"`
}

// imgfuseExtra is what imgfuse adds to QEMU's fields.
type imgfuseExtra struct {
	// FileSize is the image file's apparent size (actual-size is what it
	// occupies on disk).
	FileSize int64 `json:"file-size"`
	// Details is the format's own description (qcow2: every header
	// field qemu-img shows, plus feature bits by name).
	Details any `json:"details,omitempty"`
	// BackingError says why the backing file could not be opened.
	BackingError string `json:"backing-error,omitempty"`
	// Partitions is the disk's partition table, top image only.
	Partitions *partitionList `json:"partition-table,omitempty"`
	// BackingImage is the image below, described the same way (QEMU's
	// query-block nests it so; qemu-img info prints the top image only,
	// so it is not among QEMU's keys here).
	BackingImage *qemuInfo `json:"backing-image,omitempty"`
}

func toQemuInfo(info drivers.ImageInfo) qemuInfo {
	q := qemuInfo{
		Filename:              info.Filename,
		Format:                info.Format,
		DirtyFlag:             info.Dirty,
		VirtualSize:           info.VirtualSize,
		ClusterSize:           info.ClusterSize,
		BackingFilename:       info.BackingFilename,
		BackingFilenameFormat: info.BackingFormat,
		FormatSpecific:        info.FormatSpecific,
		Imgfuse:               &imgfuseExtra{FileSize: info.FileSize, Details: info.Extra},
	}
	if info.BackingFilename != "" {
		q.FullBackingFilename = PathCombine(info.Filename, info.BackingFilename)
	}
	if du, ok := allocated(info); ok {
		q.ActualSize = &du
	}
	for _, s := range info.Snapshots {
		qs := qemuSnapshot{
			ID: s.ID, Name: s.Name, VMStateSize: s.VMStateSize,
			DateSec: s.Date.Unix(), DateNsec: int64(s.Date.Nanosecond()),
			VMClockSec: s.VMClock / 1e9, VMClockNsec: s.VMClock % 1e9,
		}
		if s.Icount != -1 {
			ic := s.Icount
			qs.Icount = &ic
		}
		q.Snapshots = append(q.Snapshots, qs)
	}
	return q
}

// WriteInfoJSON prints the chain as qemu-img info --output=json does: an
// array of objects with --backing-chain, else the top image alone, the
// images below nested under imgfuse.backing-image.
func WriteInfoJSON(w io.Writer, links []ChainLink, chain bool) error {
	var v any
	if chain {
		arr := make([]qemuInfo, len(links))
		for i, l := range links {
			arr[i] = toQemuInfo(l.Info)
			arr[i].Imgfuse.Partitions = l.Parts
		}
		v = arr
	} else {
		var below *qemuInfo
		for i := len(links) - 1; i >= 0; i-- {
			if links[i].Err != nil {
				continue // named by the image above, under imgfuse.backing-error
			}
			q := toQemuInfo(links[i].Info)
			q.Imgfuse.Partitions = links[i].Parts
			q.Imgfuse.BackingImage = below
			if i+1 < len(links) && links[i+1].Err != nil {
				q.Imgfuse.BackingError = links[i+1].Err.Error()
			}
			below = &q
		}
		v = below
	}
	b, err := json.MarshalIndent(v, "", "    ")
	if err != nil {
		return err
	}
	_, err = w.Write(append(b, '\n'))
	return err
}

// WriteInfoText prints each image of the chain as a block, blocks separated
// by a blank line, in the shape of `qemu-img info --backing-chain`.
func WriteInfoText(w io.Writer, links []ChainLink) error {
	var b strings.Builder
	for i, l := range links {
		if i > 0 {
			b.WriteString("\n")
		}
		if l.Err != nil {
			fmt.Fprintf(&b, "image: %s\ncannot open: %v\n", l.Info.Filename, l.Err)
			continue
		}
		writeInfoBlock(&b, &l.Info)
		writePartitionsText(&b, l.Parts)
	}
	_, err := io.WriteString(w, b.String())
	return err
}

func writeInfoBlock(b *strings.Builder, info *drivers.ImageInfo) {
	fmt.Fprintf(b, "image: %s\n", info.Filename)
	fmt.Fprintf(b, "file format: %s\n", info.Format)
	fmt.Fprintf(b, "virtual size: %s (%d bytes)\n", HumanSize(info.VirtualSize), info.VirtualSize)
	fmt.Fprintf(b, "file size: %s (%d bytes)\n", HumanSize(info.FileSize), info.FileSize)
	if du, ok := allocated(*info); ok {
		fmt.Fprintf(b, "disk size: %s\n", HumanSize(du))
	}
	if info.ClusterSize != 0 {
		fmt.Fprintf(b, "cluster_size: %d\n", info.ClusterSize)
	}
	if info.BackingFilename != "" {
		full := PathCombine(info.Filename, info.BackingFilename)
		fmt.Fprintf(b, "backing file: %s", info.BackingFilename)
		if full != info.BackingFilename {
			fmt.Fprintf(b, " (actual path: %s)", full)
		}
		b.WriteString("\n")
		if info.BackingFormat != "" {
			fmt.Fprintf(b, "backing file format: %s\n", info.BackingFormat)
		}
	}
	if info.Extra != nil {
		raw, err := json.Marshal(info.Extra)
		if err == nil {
			b.WriteString("Format specific information:\n")
			if err := writeJSONTree(b, raw, 1); err != nil {
				fmt.Fprintf(b, "    (unprintable: %v)\n", err)
			}
		}
	} else if info.FormatSpecific != nil {
		// No fields of imgfuse's own (a VMDK's): QEMU's, as qemu-img
		// dumps them.
		if raw, err := json.Marshal(info.FormatSpecific.Data); err == nil {
			if obj, err := decodeOrdered(raw); err == nil && len(obj) > 0 {
				b.WriteString("Format specific information:\n")
				writeQemuDump(b, obj, 1)
			}
		}
	}
	if len(info.Snapshots) > 0 {
		b.WriteString("Snapshot list:\n")
		tw := tabwriter.NewWriter(b, 0, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "ID\tTAG\tVM SIZE\tDATE\tVM CLOCK\tICOUNT\tDISK SIZE")
		for _, s := range info.Snapshots {
			date := "-"
			if !s.Date.IsZero() {
				date = s.Date.Local().Format("2006-01-02 15:04:05")
			}
			icount := ""
			if s.Icount != -1 {
				icount = strconv.FormatInt(s.Icount, 10)
			}
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%s\n", s.ID, s.Name, HumanSize(s.VMStateSize), date,
				vmClock(s.VMClock), icount, HumanSize(s.DiskSize))
		}
		tw.Flush()
	}
}

// HumanSize renders n like QEMU's size_to_str: three significant digits in
// the largest binary unit that keeps the number below 1000.
func HumanSize(n int64) string {
	units := []string{"B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"}
	if n < 0 {
		return strconv.FormatInt(n, 10) + " B"
	}
	v := float64(n)
	i := 0
	for i < len(units)-1 && v >= 1000 {
		v /= 1024
		i++
	}
	return strconv.FormatFloat(v, 'g', 3, 64) + " " + units[i]
}

// vmClock renders a snapshot's guest clock as QEMU does: HH:MM:SS.mmm.
func vmClock(nsec int64) string {
	d := time.Duration(nsec)
	h := int64(d / time.Hour)
	m := int64(d/time.Minute) % 60
	s := int64(d/time.Second) % 60
	ms := int64(d/time.Millisecond) % 1000
	return fmt.Sprintf("%02d:%02d:%02d.%03d", h, m, s, ms)
}

// allocated is what qemu-img info calls actual-size (disk size): the
// space the files of the image occupy, as its driver counts them, or else
// that of the image file.
func allocated(info drivers.ImageInfo) (int64, bool) {
	if info.AllocatedSize > 0 {
		return info.AllocatedSize, true
	}
	return diskUsage(info.Filename)
}

// diskUsage is the space the file occupies on its filesystem.
func diskUsage(path string) (int64, bool) {
	var st syscall.Stat_t
	if err := syscall.Stat(path, &st); err != nil {
		return 0, false
	}
	return st.Blocks * 512, true
}

// writeJSONTree prints a JSON object as indented "key: value" lines,
// keeping the producer's key order (a map would lose it). Keys have their
// dashes turned into spaces. An object of the form {"bits": N, "names":
// [...]} (a feature word) prints as one line: 0x3 (dirty, corrupt).
func writeJSONTree(b *strings.Builder, raw []byte, depth int) error {
	obj, err := decodeOrdered(raw)
	if err != nil {
		return err
	}
	writeOrdered(b, obj, depth)
	return nil
}

// orderedField is one key of a JSON object, in document order.
type orderedField struct {
	key   string
	value any // ordered object ([]orderedField), []any, json.Number, string, bool, nil
}

func decodeOrdered(raw []byte) ([]orderedField, error) {
	dec := json.NewDecoder(bytes.NewReader(raw))
	dec.UseNumber()
	v, err := decodeValue(dec)
	if err != nil {
		return nil, err
	}
	obj, ok := v.([]orderedField)
	if !ok {
		return []orderedField{{key: "value", value: v}}, nil
	}
	return obj, nil
}

func decodeValue(dec *json.Decoder) (any, error) {
	tok, err := dec.Token()
	if err != nil {
		return nil, err
	}
	switch t := tok.(type) {
	case json.Delim:
		switch t {
		case '{':
			var obj []orderedField
			for dec.More() {
				kt, err := dec.Token()
				if err != nil {
					return nil, err
				}
				v, err := decodeValue(dec)
				if err != nil {
					return nil, err
				}
				obj = append(obj, orderedField{key: kt.(string), value: v})
			}
			_, err := dec.Token() // '}'
			return obj, err
		case '[':
			arr := []any{}
			for dec.More() {
				v, err := decodeValue(dec)
				if err != nil {
					return nil, err
				}
				arr = append(arr, v)
			}
			_, err := dec.Token() // ']'
			return arr, err
		}
		return nil, fmt.Errorf("unexpected %v", t)
	default:
		return tok, nil
	}
}

func writeOrdered(b *strings.Builder, obj []orderedField, depth int) {
	indent := strings.Repeat("    ", depth)
	for _, f := range obj {
		key := strings.ReplaceAll(f.key, "-", " ")
		switch v := f.value.(type) {
		case []orderedField:
			if s, ok := featureWord(v); ok {
				fmt.Fprintf(b, "%s%s: %s\n", indent, key, s)
				continue
			}
			fmt.Fprintf(b, "%s%s:\n", indent, key)
			writeOrdered(b, v, depth+1)
		default:
			fmt.Fprintf(b, "%s%s: %s\n", indent, key, scalarString(v))
		}
	}
}

// writeQemuDump prints a decoded JSON value as qemu-img info's
// dump_qobject does: "key: value", a composite value on the lines below
// one level deeper, list elements as "[i]:", dashes in keys as spaces.
func writeQemuDump(b *strings.Builder, v any, depth int) {
	indent := strings.Repeat("    ", depth)
	line := func(label string, v any) {
		switch v.(type) {
		case []orderedField, []any:
			fmt.Fprintf(b, "%s%s:\n", indent, label)
			writeQemuDump(b, v, depth+1)
		default:
			fmt.Fprintf(b, "%s%s: %s\n", indent, label, scalarString(v))
		}
	}
	switch v := v.(type) {
	case []orderedField:
		for _, f := range v {
			line(strings.ReplaceAll(f.key, "-", " "), f.value)
		}
	case []any:
		for i, e := range v {
			line(fmt.Sprintf("[%d]", i), e)
		}
	}
}

// featureWord recognises {"bits": N, "names": [...]}.
func featureWord(obj []orderedField) (string, bool) {
	var bits json.Number
	var names []string
	for _, f := range obj {
		switch f.key {
		case "bits":
			n, ok := f.value.(json.Number)
			if !ok {
				return "", false
			}
			bits = n
		case "names":
			arr, ok := f.value.([]any)
			if !ok {
				return "", false
			}
			for _, a := range arr {
				names = append(names, scalarString(a))
			}
		default:
			return "", false
		}
	}
	if bits == "" {
		return "", false
	}
	u, err := strconv.ParseUint(bits.String(), 10, 64)
	if err != nil {
		return "", false
	}
	if len(names) == 0 {
		return fmt.Sprintf("%#x", u), true
	}
	return fmt.Sprintf("%#x (%s)", u, strings.Join(names, ", ")), true
}

func scalarString(v any) string {
	switch v := v.(type) {
	case nil:
		return "null"
	case string:
		return v
	case json.Number:
		return v.String()
	case bool:
		return strconv.FormatBool(v)
	case []any:
		parts := make([]string, len(v))
		for i, e := range v {
			parts[i] = scalarString(e)
		}
		return "[" + strings.Join(parts, ", ") + "]"
	case []orderedField:
		parts := make([]string, len(v))
		for i, f := range v {
			parts[i] = f.key + ": " + scalarString(f.value)
		}
		return "{" + strings.Join(parts, ", ") + "}"
	}
	return fmt.Sprint(v)
}
