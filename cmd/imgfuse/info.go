package main

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

	"github.com/spf13/cobra"

	"imgfuse/drivers"
)

func newInfoCmd(stdout io.Writer) *cobra.Command {
	var asJSON bool
	var format string
	cmd := &cobra.Command{
		Use:   "info [flags] IMAGE",
		Short: "Describe an image and its backing chain",
		Long: `Describe IMAGE like 'qemu-img info --backing-chain': format, sizes, format
details (qcow2: version, cluster size, feature bits, dirty/corrupt state,
compression type), internal snapshots, and every backing file down the chain.

With --json the same data is printed as one JSON object whose keys are
stable; the backing chain nests under "backing-image".`,
		Args: exactArgs("IMAGE"),
		RunE: func(cmd *cobra.Command, args []string) error {
			if err := checkFormatFlag(format); err != nil {
				return err
			}
			info, err := imageInfo(args[0], format)
			if err != nil {
				return err
			}
			if asJSON {
				return writeInfoJSON(stdout, info)
			}
			return writeInfoText(stdout, info)
		},
	}
	cmd.Flags().BoolVar(&asJSON, "json", false, "print JSON")
	cmd.Flags().StringVar(&format, "format", "auto", "image format: "+strings.Join(formatChoices(), "|"))
	return cmd
}

// imageInfo opens image read-only and describes it. It takes no image
// locks (as qemu-img info -U), so it also works on a mounted image: it only
// reads the header and the snapshot table.
func imageInfo(image, format string) (drivers.ImageInfo, error) {
	d, f, err := drivers.Open(image, format, drivers.OpenOptions{
		ReadOnly:   true,
		Formats:    imageFormats(),
		ForceShare: true,
	})
	if err != nil {
		return drivers.ImageInfo{}, fmt.Errorf("open %s: %w", image, err)
	}
	defer d.Close()
	var info drivers.ImageInfo
	if in, ok := d.(drivers.Informer); ok {
		info = in.Info()
	} else {
		info = drivers.ImageInfo{Filename: image, Format: f.Name(), VirtualSize: d.Size()}
		if fi, err := os.Stat(image); err == nil {
			info.FileSize = fi.Size()
		}
	}
	if info.Snapshots == nil {
		if s, ok := d.(drivers.Snapshotter); ok {
			info.Snapshots = s.Snapshots()
		}
	}
	if info.Filename == "" {
		info.Filename = image
	}
	return info, nil
}

func writeInfoJSON(w io.Writer, info drivers.ImageInfo) error {
	b, err := json.MarshalIndent(info, "", "  ")
	if err != nil {
		return err
	}
	_, err = w.Write(append(b, '\n'))
	return err
}

// writeInfoText prints info and each backing level as blocks separated by
// a blank line, in the shape of `qemu-img info --backing-chain`.
func writeInfoText(w io.Writer, info drivers.ImageInfo) error {
	var b strings.Builder
	for level, cur := 0, &info; cur != nil; level, cur = level+1, cur.Backing {
		if level > 0 {
			b.WriteString("\n")
		}
		writeInfoBlock(&b, cur)
	}
	_, err := io.WriteString(w, b.String())
	return err
}

func writeInfoBlock(b *strings.Builder, info *drivers.ImageInfo) {
	fmt.Fprintf(b, "image: %s\n", info.Filename)
	fmt.Fprintf(b, "file format: %s\n", info.Format)
	fmt.Fprintf(b, "virtual size: %s (%d bytes)\n", humanSize(info.VirtualSize), info.VirtualSize)
	fmt.Fprintf(b, "file size: %s (%d bytes)\n", humanSize(info.FileSize), info.FileSize)
	if du, ok := diskUsage(info.Filename); ok {
		fmt.Fprintf(b, "disk size: %s\n", humanSize(du))
	}
	if info.Backing != nil {
		fmt.Fprintf(b, "backing file: %s (format %s)\n", info.Backing.Filename, info.Backing.Format)
	}
	if info.FormatSpecific != nil {
		raw, err := json.Marshal(info.FormatSpecific)
		if err == nil {
			b.WriteString("Format specific information:\n")
			if err := writeJSONTree(b, raw, 1); err != nil {
				fmt.Fprintf(b, "    (unprintable: %v)\n", err)
			}
		}
	}
	if len(info.Snapshots) > 0 {
		b.WriteString("Snapshot list:\n")
		tw := tabwriter.NewWriter(b, 0, 4, 2, ' ', 0)
		fmt.Fprintln(tw, "ID\tTAG\tVM SIZE\tDATE\tVM CLOCK\tDISK SIZE")
		for _, s := range info.Snapshots {
			date := "-"
			if !s.Date.IsZero() {
				date = s.Date.Local().Format("2006-01-02 15:04:05")
			}
			fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\n", s.ID, s.Name, humanSize(s.VMStateSize), date,
				vmClock(s.VMClock), humanSize(s.DiskSize))
		}
		tw.Flush()
	}
}

// humanSize renders n like QEMU's size_to_str: three significant digits in
// the largest binary unit that keeps the number below 1000.
func humanSize(n int64) string {
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
