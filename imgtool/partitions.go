package imgtool

import (
	"fmt"
	"strings"
	"text/tabwriter"

	"imgfuse/drivers"
	"imgfuse/partition"
)

// partitionList is the disk's partition table as info shows it, under
// "imgfuse"."partition-table" in JSON.
type partitionList struct {
	// Table is "mbr" or "gpt".
	Table      string          `json:"table,omitempty"`
	Partitions []partitionJSON `json:"partitions,omitempty"`
	// Error says why a table that is there was ignored (a mount shows
	// no partN files then).
	Error    string   `json:"error,omitempty"`
	Warnings []string `json:"warnings,omitempty"`
}

type partitionJSON struct {
	Number int    `json:"number"`
	File   string `json:"file"`
	Start  int64  `json:"start"`
	Size   int64  `json:"size"`
	Type   string `json:"type"`
	Name   string `json:"name,omitempty"`
	UUID   string `json:"uuid,omitempty"`
}

// readPartitionList reads the partition table of image's disk as a mount
// would see it (through the backing chain). It returns nil when there is
// no table or the disk cannot be opened with its backing chain (info names
// that problem elsewhere).
func readPartitionList(image, format string) *partitionList {
	d, _, err := OpenForInspect(image, format, drivers.OpenOptions{ForceShare: true})
	if err != nil {
		return nil
	}
	defer d.Close()
	t, err := partition.Read(drivers.ReaderAt(d), d.Size())
	switch {
	case err != nil:
		return &partitionList{Error: err.Error()}
	case t == nil:
		return nil
	}
	l := &partitionList{Table: t.Kind, Warnings: t.Warnings}
	for _, p := range t.Parts {
		l.Partitions = append(l.Partitions, partitionJSON{
			Number: p.Number, File: fmt.Sprintf("part%d", p.Number),
			Start: p.Start, Size: p.Size, Type: p.Type, Name: p.Name, UUID: p.UUID,
		})
	}
	return l
}

// writePartitionsText adds the partition table to info's human output.
func writePartitionsText(b *strings.Builder, l *partitionList) {
	if l == nil {
		return
	}
	if l.Error != "" {
		fmt.Fprintf(b, "Partition table: ignored: %s\n", l.Error)
		return
	}
	fmt.Fprintf(b, "Partition table: %s\n", l.Table)
	for _, w := range l.Warnings {
		fmt.Fprintf(b, "    warning: %s\n", w)
	}
	tw := tabwriter.NewWriter(b, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "    FILE\tSTART\tSIZE\tTYPE\tNAME\tUUID")
	for _, p := range l.Partitions {
		fmt.Fprintf(tw, "    %s\t%d\t%s (%d bytes)\t%s\t%s\t%s\n", p.File, p.Start, HumanSize(p.Size), p.Size, p.Type, p.Name, p.UUID)
	}
	tw.Flush()
}
