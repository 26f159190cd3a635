package partition

import (
	"bytes"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"imgfuse/internal/testenv"
)

// sfdiskImage makes a sparse file of size bytes partitioned by sfdisk with
// script.
func sfdiskImage(t testing.TB, size int64, script string) string {
	t.Helper()
	if _, err := exec.LookPath("sfdisk"); err != nil {
		testenv.Skip(t, "sfdisk not installed")
	}
	path := filepath.Join(t.TempDir(), "disk.img")
	if err := os.WriteFile(path, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Truncate(path, size); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("sfdisk", "-q", "--no-reread", "--no-tell-kernel", path)
	cmd.Stdin = strings.NewReader(script)
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("sfdisk: %v\n%s", err, out)
	}
	return path
}

type sfPart struct {
	Node  string `json:"node"`
	Start int64  `json:"start"`
	Size  int64  `json:"size"`
	Type  string `json:"type"`
	UUID  string `json:"uuid"`
	Name  string `json:"name"`
}

// sfdiskParts is sfdisk's own listing of path: the oracle.
func sfdiskParts(t *testing.T, path string) []sfPart {
	t.Helper()
	out, err := exec.Command("sfdisk", "--json", path).Output()
	if err != nil {
		t.Fatalf("sfdisk --json: %v", err)
	}
	var v struct {
		PT struct {
			Partitions []sfPart `json:"partitions"`
		} `json:"partitiontable"`
	}
	if err := json.Unmarshal(out, &v); err != nil {
		t.Fatal(err)
	}
	return v.PT.Partitions
}

func readFile(t *testing.T, path string) (*Table, error) {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		t.Fatal(err)
	}
	return Read(f, fi.Size())
}

// checkAgainstSfdisk compares t with sfdisk's listing, leaving out
// extended partitions (MBR types 5, f, 85).
func checkAgainstSfdisk(t *testing.T, path string, tab *Table) {
	t.Helper()
	var want []string
	for _, p := range sfdiskParts(t, path) {
		if p.Type == "5" || p.Type == "f" || p.Type == "85" {
			continue
		}
		i := len(p.Node) - 1
		for i > 0 && p.Node[i-1] >= '0' && p.Node[i-1] <= '9' {
			i--
		}
		n, _ := strconv.Atoi(p.Node[i:])
		typ := p.Type
		if p.UUID == "" {
			v, _ := strconv.ParseUint(p.Type, 16, 8)
			typ = fmt.Sprintf("0x%02x", v)
		}
		want = append(want, fmt.Sprintf("%d %d %d %s %s %q", n, p.Start*512, p.Size*512, typ, p.UUID, p.Name))
	}
	var got []string
	for _, p := range tab.Parts {
		got = append(got, fmt.Sprintf("%d %d %d %s %s %q", p.Number, p.Start, p.Size, p.Type, p.UUID, p.Name))
	}
	if strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Errorf("partitions:\n%s\nsfdisk says:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
}

const mbrScript = `label: dos
start=2048, size=8M, type=83
start=18432, size=4M, type=c
start=26624, size=2M, type=83
start=30720, size=32M, type=5
size=8M, type=83
size=4M, type=82
size=6M, type=83
`

const gptScript = `label: gpt
start=2048, size=8M, name="root fs"
start=20480, size=4M, type=0657FD6D-A4AB-43C4-84E5-0933C84B4F4F, name="swap"
start=32768, size=16M, name="data"
`

func TestMBRWithLogicals(t *testing.T) {
	path := sfdiskImage(t, 64<<20, mbrScript)
	tab, err := readFile(t, path)
	if err != nil || tab == nil {
		t.Fatalf("Read: %v, %v", tab, err)
	}
	if tab.Kind != "mbr" || len(tab.Warnings) != 0 {
		t.Errorf("kind %q, warnings %q", tab.Kind, tab.Warnings)
	}
	var nums []int
	for _, p := range tab.Parts {
		nums = append(nums, p.Number)
	}
	if fmt.Sprint(nums) != "[1 2 3 5 6 7]" {
		t.Errorf("numbers %v, want [1 2 3 5 6 7]", nums)
	}
	checkAgainstSfdisk(t, path, tab)
}

func TestGPT(t *testing.T) {
	path := sfdiskImage(t, 64<<20, gptScript)
	tab, err := readFile(t, path)
	if err != nil || tab == nil {
		t.Fatalf("Read: %v, %v", tab, err)
	}
	if tab.Kind != "gpt" || len(tab.Parts) != 3 || len(tab.Warnings) != 0 {
		t.Fatalf("table %+v", tab)
	}
	checkAgainstSfdisk(t, path, tab)
}

// GPT entries keep their index as number: deleting partition 2 leaves 1, 3.
func TestGPTGapKeepsNumbers(t *testing.T) {
	path := sfdiskImage(t, 64<<20, gptScript)
	if out, err := exec.Command("sfdisk", "-q", "--no-reread", "--no-tell-kernel", "--delete", path, "2").CombinedOutput(); err != nil {
		t.Fatalf("sfdisk --delete: %v\n%s", err, out)
	}
	tab, err := readFile(t, path)
	if err != nil || tab == nil {
		t.Fatalf("Read: %v, %v", tab, err)
	}
	if len(tab.Parts) != 2 || tab.Parts[0].Number != 1 || tab.Parts[1].Number != 3 {
		t.Errorf("parts %+v", tab.Parts)
	}
	checkAgainstSfdisk(t, path, tab)
}

func corruptAt(t *testing.T, path string, off int64) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	b := make([]byte, 1)
	if _, err := f.ReadAt(b, off); err != nil {
		t.Fatal(err)
	}
	b[0] ^= 0xFF
	if _, err := f.WriteAt(b, off); err != nil {
		t.Fatal(err)
	}
}

func TestGPTBackup(t *testing.T) {
	const size = 64 << 20
	path := sfdiskImage(t, size, gptScript)
	corruptAt(t, path, 512+60) // the disk GUID in the primary header: its CRC fails
	tab, err := readFile(t, path)
	if err != nil || tab == nil {
		t.Fatalf("Read with a bad primary: %v, %v", tab, err)
	}
	if len(tab.Warnings) != 1 || !strings.Contains(tab.Warnings[0], "backup") {
		t.Errorf("warnings %q", tab.Warnings)
	}
	checkAgainstSfdisk(t, path, tab)

	corruptAt(t, path, size-512+60) // the backup header too
	tab, err = readFile(t, path)
	if !errors.Is(err, ErrMalformed) || tab != nil {
		t.Errorf("both headers bad: %v, %v; want ErrCorrupt", tab, err)
	}
}

func TestGPTEntryArrayCRC(t *testing.T) {
	const size = 64 << 20
	path := sfdiskImage(t, size, gptScript)
	corruptAt(t, path, 1024+56) // primary entry 1's name
	corruptAt(t, path, size-33*512+56)
	if tab, err := readFile(t, path); !errors.Is(err, ErrMalformed) {
		t.Errorf("both entry arrays bad: %v, %v; want ErrCorrupt", tab, err)
	}
}

func TestMBRChainLoop(t *testing.T) {
	path := sfdiskImage(t, 64<<20, mbrScript)
	// The extended partition starts at 30720 (sectors); its first EBR
	// links to the second. Point the second EBR's link back at the first.
	f, err := os.OpenFile(path, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	sec := make([]byte, 512)
	ext := uint32(30720)
	if _, err := f.ReadAt(sec, int64(ext)*512); err != nil {
		t.Fatal(err)
	}
	second := ext + binary.LittleEndian.Uint32(sec[0x1BE+16+8:])
	if _, err := f.ReadAt(sec, int64(second)*512); err != nil {
		t.Fatal(err)
	}
	binary.LittleEndian.PutUint32(sec[0x1BE+16+8:], 0) // link to the first EBR
	if sec[0x1BE+16+4] == 0 {
		t.Fatal("second EBR has no link")
	}
	if _, err := f.WriteAt(sec, int64(second)*512); err != nil {
		t.Fatal(err)
	}
	if tab, err := readFile(t, path); !errors.Is(err, ErrMalformed) || !strings.Contains(fmt.Sprint(err), "loops") {
		t.Errorf("looping chain: %v, %v; want ErrCorrupt", tab, err)
	}
}

func TestClampAndSkipAtEnd(t *testing.T) {
	path := sfdiskImage(t, 64<<20, mbrScript)
	// Cut the disk inside partition 6 so that 6 is clamped and 7 is past
	// the end.
	tab0, err := readFile(t, path)
	if err != nil {
		t.Fatal(err)
	}
	var p6 Partition
	for _, p := range tab0.Parts {
		if p.Number == 6 {
			p6 = p
		}
	}
	cut := p6.Start + p6.Size/2
	if err := os.Truncate(path, cut); err != nil {
		t.Fatal(err)
	}
	tab, err := readFile(t, path)
	if err != nil || tab == nil {
		t.Fatalf("Read: %v, %v", tab, err)
	}
	var got []string
	for _, p := range tab.Parts {
		got = append(got, fmt.Sprintf("%d:%d+%d", p.Number, p.Start, p.Size))
		if p.Start+p.Size > cut {
			t.Errorf("partition %d runs past the disk", p.Number)
		}
	}
	// 7's EBR lies past the end: the chain ends there, as in the kernel.
	if len(tab.Parts) != 5 || tab.Parts[4].Number != 6 || tab.Parts[4].Size != p6.Size/2 {
		t.Errorf("parts %v", got)
	}
	if len(tab.Warnings) != 1 || !strings.Contains(tab.Warnings[0], "partition 6") || !strings.Contains(tab.Warnings[0], "clamped") {
		t.Errorf("warnings %q", tab.Warnings)
	}

	// Cut before primary 3: it is skipped.
	if err := os.Truncate(path, 26624*512); err != nil {
		t.Fatal(err)
	}
	tab, err = readFile(t, path)
	if err != nil || tab == nil {
		t.Fatalf("Read: %v, %v", tab, err)
	}
	if len(tab.Parts) != 2 || len(tab.Warnings) != 1 || !strings.Contains(tab.Warnings[0], "partition 3") || !strings.Contains(tab.Warnings[0], "skipped") {
		t.Errorf("parts %+v, warnings %q", tab.Parts, tab.Warnings)
	}
}

func TestNoTable(t *testing.T) {
	for name, disk := range map[string][]byte{
		"empty":       nil,
		"zeros":       make([]byte, 4096),
		"boot sector": append(append(bytes.Repeat([]byte{0xEB}, 510), 0x55, 0xAA), make([]byte, 512)...),
	} {
		tab, err := Read(bytes.NewReader(disk), int64(len(disk)))
		if tab != nil || err != nil {
			t.Errorf("%s: %v, %v; want no table", name, tab, err)
		}
	}
}

// sparseDisk is data followed by zeros up to size; it counts bytes read.
type sparseDisk struct {
	data []byte
	size int64
	read int64
}

func (d *sparseDisk) ReadAt(p []byte, off int64) (int, error) {
	if off < 0 || off >= d.size {
		return 0, io.EOF
	}
	n := len(p)
	if int64(n) > d.size-off {
		n = int(d.size - off)
	}
	d.read += int64(n)
	clear(p[:n])
	if off < int64(len(d.data)) {
		copy(p[:n], d.data[off:])
	}
	if n < len(p) {
		return n, io.EOF
	}
	return n, nil
}

func FuzzRead(f *testing.F) {
	for _, script := range []string{mbrScript, gptScript} {
		if _, err := exec.LookPath("sfdisk"); err != nil {
			break
		}
		path := sfdiskImage(f, 64<<20, script)
		img, err := os.ReadFile(path)
		if err != nil {
			f.Fatal(err)
		}
		// The first 40 KiB hold the MBR / the primary GPT; the rest of
		// the seed is zeros, so the fuzzer works on the tables.
		f.Add(img[:40<<10], uint64(64<<20))
		f.Add(append([]byte(nil), img[30720*512:30720*512+512]...), uint64(1<<30))
	}
	f.Add([]byte{}, uint64(0))
	f.Fuzz(func(t *testing.T, data []byte, size uint64) {
		size %= 1 << 42
		if size < uint64(len(data)) {
			size = uint64(len(data))
		}
		d := &sparseDisk{data: data, size: int64(size)}
		tab, err := Read(d, d.size)
		if d.read > maxEntryBytes+(maxChain+MaxPartitions+8)*SectorSize {
			t.Fatalf("read %d bytes", d.read)
		}
		if err != nil {
			if tab != nil {
				t.Fatal("table with an error")
			}
			return
		}
		if tab == nil {
			return
		}
		seen := map[int]bool{}
		for _, p := range tab.Parts {
			if p.Start < 0 || p.Size <= 0 || p.Start+p.Size > d.size || p.Start%SectorSize != 0 || p.Size%SectorSize != 0 {
				t.Fatalf("partition %+v outside a disk of %d", p, d.size)
			}
			if p.Number < 1 || p.Number >= MaxPartitions || seen[p.Number] {
				t.Fatalf("partition number %d (duplicate or out of range)", p.Number)
			}
			seen[p.Number] = true
		}
	})
}
