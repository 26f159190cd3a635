package qcow2

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"math/rand"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"imgfuse/coroutine"
	"imgfuse/drivers"
	"imgfuse/drivers/driverstest"
)

// checkImages builds images with every structure the checker must count:
// snapshots, compressed clusters, a backing file, extended L2, an external
// data file, bitmaps, v2.
func checkImages(t *testing.T, dir string) map[string]string {
	t.Helper()
	imgs := make(map[string]string)
	mk := func(name string, opts string, size string, cmds ...string) string {
		p := filepath.Join(dir, name+".qcow2")
		args := []string{"create", "-q", "-f", "qcow2"}
		if opts != "" {
			args = append(args, "-o", opts)
		}
		cmdIn(t, dir, "qemu-img", append(args, p, size)...)
		if len(cmds) > 0 {
			driverstest.QemuIO(t, p, cmds...)
		}
		imgs[name] = p
		return p
	}
	data := []string{"write -P 0x11 0 200k", "write -P 0x12 1M 4k", "write -z 2M 128k"}

	p := mk("snapshots", "", "8M", data...)
	qemuImg(t, "snapshot", "-c", "s1", p)
	driverstest.QemuIO(t, p, "write -P 0x13 64k 64k", "write -P 0x14 4M 64k")
	qemuImg(t, "snapshot", "-c", "s2", p)
	driverstest.QemuIO(t, p, "write -P 0x15 0 8k")

	src := filepath.Join(dir, "src.raw")
	raw := make([]byte, 4<<20)
	for i := range raw {
		raw[i] = byte(i / 3000)
	}
	if err := os.WriteFile(src, raw, 0o644); err != nil {
		t.Fatal(err)
	}
	for _, ct := range []string{"zlib", "zstd"} {
		p := filepath.Join(dir, "compressed-"+ct+".qcow2")
		qemuImg(t, "convert", "-c", "-f", "raw", "-O", "qcow2", "-o", "compression_type="+ct, src, p)
		driverstest.QemuIO(t, p, "write -P 0x21 100k 10k")
		imgs["compressed-"+ct] = p
	}
	p = filepath.Join(dir, "compressed-snap.qcow2")
	qemuImg(t, "convert", "-c", "-f", "raw", "-O", "qcow2", src, p)
	qemuImg(t, "snapshot", "-c", "s1", p)
	driverstest.QemuIO(t, p, "write -P 0x22 0 64k")
	imgs["compressed-snap"] = p

	base := mk("base", "", "8M", data...)
	ov := filepath.Join(dir, "overlay.qcow2")
	cmdIn(t, dir, "qemu-img", "create", "-q", "-f", "qcow2", "-b", base, "-F", "qcow2", ov)
	driverstest.QemuIO(t, ov, "write -P 0x31 4k 4k", "write -z 1M 64k", "discard 0 64k")
	imgs["overlay"] = ov

	mk("extl2", "extended_l2=on,cluster_size=64k", "8M", "write -P 0x41 2k 2k", "write -P 0x42 1M 100k", "write -z 3M 8k")
	mk("datafile", "data_file="+filepath.Join(dir, "ext.raw"), "8M", data...)
	mk("datafile-raw", "data_file="+filepath.Join(dir, "ext2.raw")+",data_file_raw=on", "8M", data...)
	mk("v2", "compat=0.10", "8M", data...)
	mk("prealloc", "preallocation=metadata,cluster_size=4k", "4M")
	mk("lazy", "lazy_refcounts=on,refcount_bits=1", "8M", data...)
	p = mk("bitmaps", "", "8M")
	qemuImg(t, "bitmap", "--add", p, "b1")
	driverstest.QemuIO(t, p, "write -P 0x51 0 1M")
	qemuImg(t, "bitmap", "--add", "-g", "512", p, "b2")
	return imgs
}

// TestCheckCleanImages: on images built by qemu-img and qemu-io, the
// checker finds no corruption and no leak, as qemu-img check does.
func TestCheckCleanImages(t *testing.T) {
	requireQemu(t)
	dir := t.TempDir()
	for name, p := range checkImages(t, dir) {
		t.Run(name, func(t *testing.T) {
			wantQemuCheck(t, p, 0, 0, 0)
			ti := openRefcountTest(t, p)
			ti.locked(func(co *coroutine.Co) {
				res, err := ti.rc.checkLocked(co, ti.read(co), ti.snaps)
				if err != nil {
					t.Fatal(err)
				}
				if res.Corruptions != 0 || res.Leaks != 0 {
					t.Fatalf("check: %d corruptions, %d leaks: %q", res.Corruptions, res.Leaks, res.Errors)
				}
				if want := qemuImageEnd(t, p); res.ImageEnd != want {
					t.Errorf("image end %#x, qemu-img check says %#x", res.ImageEnd, want)
				}
			})
		})
	}
}

// qemuImageEnd returns qemu-img check's image-end-offset.
func qemuImageEnd(t testing.TB, p string) int64 {
	out, _ := exec.Command("qemu-img", "check", "-U", "--output=json", p).Output()
	i := bytes.Index(out, []byte(`"image-end-offset":`))
	if i < 0 {
		t.Fatalf("no image-end-offset in %s", out)
	}
	var v int64
	fmt.Sscanf(strings.TrimSpace(string(out[i+len(`"image-end-offset":`):])), "%d", &v)
	return v
}

// refblockEntry returns the file offset of the refcount entry of cluster
// c (which must be in the first refcount block), read from the file.
func refblockEntry(t testing.TB, path string, c int64) (off int64, bitsPer int) {
	t.Helper()
	rt := int64(fileBE64(t, path, 48))
	rb := int64(fileBE64(t, path, rt))
	order := 4
	if fileBE64(t, path, 4)>>32 >= 3 {
		order = int(fileBE64(t, path, 96) >> 32)
	}
	if order != 4 {
		t.Fatalf("test images use 16-bit refcounts, not order %d", order)
	}
	return rb + c*2, 16
}

func putFileBE16(t testing.TB, path string, off int64, v uint16) {
	t.Helper()
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var b [2]byte
	binary.BigEndian.PutUint16(b[:], v)
	if _, err := f.WriteAt(b[:], off); err != nil {
		t.Fatal(err)
	}
}

// TestCheckLeakAndCorruption edits stored refcounts and compares the
// checker's counts with qemu-img check's.
func TestCheckLeakAndCorruption(t *testing.T) {
	requireQemu(t)
	dir := t.TempDir()
	mk := func(name string) string {
		p := filepath.Join(dir, name)
		qemuImg(t, "create", "-q", "-f", "qcow2", p, "8M")
		driverstest.QemuIO(t, p, "write -P 0x11 0 256k")
		return p
	}
	ours := func(p string) checkResult {
		ti := openRefcountTest(t, p)
		defer ti.close(t)
		var res checkResult
		ti.locked(func(co *coroutine.Co) {
			var err error
			if res, err = ti.rc.checkLocked(co, ti.read(co), ti.snaps); err != nil {
				t.Fatal(err)
			}
		})
		return res
	}
	// Layout of a fresh 64k-cluster image: header, reftable, refblock,
	// L1, then the L2 table at cluster 4 and data from cluster 5.
	for _, tc := range []struct {
		name     string
		cluster  int64
		refcount uint16
		code     int
	}{
		{"leak-data", 6, 2, 2},    // a leak, and COPIED set on refcount 2
		{"corrupt-data", 6, 0, 2}, // refcount below the references
		{"corrupt-l2", 4, 0, 2},   // the L2 table's own refcount
		{"leak-header", 0, 3, 3},  // a pure leak
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := mk(tc.name + ".qcow2")
			off, _ := refblockEntry(t, p, tc.cluster)
			putFileBE16(t, p, off, tc.refcount)
			code, qc, ql, _ := qemuCheck(t, p)
			res := ours(p)
			if code != tc.code || qc+ql == 0 {
				t.Fatalf("qemu-img check: exit %d, %d corruptions, %d leaks; the test expects exit %d",
					code, qc, ql, tc.code)
			}
			if res.Corruptions != qc || res.Leaks != ql {
				t.Fatalf("check: %d corruptions, %d leaks; qemu-img check: %d, %d\n%q",
					res.Corruptions, res.Leaks, qc, ql, res.Errors)
			}
		})
	}
}

// TestCheckWalkCorruptions: damage the checker must find while walking.
func TestCheckWalkCorruptions(t *testing.T) {
	requireQemu(t)
	dir := t.TempDir()
	p := filepath.Join(dir, "w.qcow2")
	qemuImg(t, "create", "-q", "-f", "qcow2", p, "8M")
	driverstest.QemuIO(t, p, "write -P 0x11 0 128k")
	l2, _ := firstL2(t, p)
	// L2 entry 1 points past the end of the file.
	putFileBE64(t, p, l2+8, oflagCopied|1<<40)
	code, qc, _, _ := qemuCheck(t, p)
	ti := openRefcountTest(t, p)
	ti.locked(func(co *coroutine.Co) {
		res, err := ti.rc.checkLocked(co, ti.read(co), ti.snaps)
		if err != nil {
			t.Fatal(err)
		}
		if res.Corruptions == 0 || code != 2 {
			t.Fatalf("check: %d corruptions (qemu-img: exit %d, %d)", res.Corruptions, code, qc)
		}
		if !strings.Contains(strings.Join(res.Errors, "\n"), "end of the file") {
			t.Errorf("errors do not mention the end of the file: %q", res.Errors)
		}
	})
}

// clearDirty clears the dirty bit (incompatible feature bit 0).
func clearDirty(t testing.TB, path string) {
	t.Helper()
	putFileBE64(t, path, 72, fileBE64(t, path, 72)&^incompatDirty)
}

// rebuild runs rebuildLocked on path.
func rebuild(t testing.TB, path string) {
	t.Helper()
	ti := openRefcountTest(t, path)
	defer ti.close(t)
	ti.locked(func(co *coroutine.Co) {
		if err := ti.rc.rebuildLocked(co, ti.read(co), ti.snaps); err != nil {
			t.Fatal(err)
		}
		// The rebuilt structure serves allocation at once.
		off, err := ti.rc.allocLocked(co, 3)
		if err != nil {
			t.Fatal(err)
		}
		if err := ti.rc.updateLocked(co, off, 3*ti.rc.clusterSize, -1); err != nil {
			t.Fatal(err)
		}
		if err := ti.rc.flushLocked(co); err != nil {
			t.Fatal(err)
		}
		res, err := ti.rc.checkLocked(co, ti.read(co), ti.snaps)
		if err != nil || res.Corruptions != 0 {
			t.Fatalf("check after rebuild: %+v, %v", res, err)
		}
	})
}

func convertRaw(t testing.TB, path, out string) {
	t.Helper()
	cmdIn(t, filepath.Dir(path), "qemu-img", "convert", "-U", "-f", "qcow2", "-O", "raw", path, out)
}

// TestRebuildAfterLazyCrash: qemu-io writes with lazy refcounts and kills
// itself, leaving the dirty bit and stale refcounts; the rebuild makes the
// image clean with the same content.
func TestRebuildAfterLazyCrash(t *testing.T) {
	requireQemu(t)
	for _, opts := range []string{"refcount_bits=16", "refcount_bits=1,cluster_size=512", "refcount_bits=64,cluster_size=4k"} {
		t.Run(opts, func(t *testing.T) {
			dir := t.TempDir()
			p := filepath.Join(dir, "lazy.qcow2")
			qemuImg(t, "create", "-q", "-f", "qcow2", "-o", opts, p, "16M")
			driverstest.QemuIO(t, p, "write -P 0x61 0 64k")
			out, _ := exec.Command("qemu-io", "-c", "open -o lazy-refcounts=on "+p,
				"-c", "write -P 0x62 1M 3M", "-c", "write -P 0x63 8M 64k", "-c", "sigraise 9").CombinedOutput()
			if fileBE64(t, p, 72)&incompatDirty == 0 {
				t.Fatalf("qemu-io left no dirty bit:\n%s", out)
			}
			before := filepath.Join(dir, "before.raw")
			convertRaw(t, p, before)
			if code, _, _, _ := qemuCheck(t, p); code == 0 {
				t.Fatalf("qemu-img check passes the crashed image: the test proves nothing")
			}
			rebuild(t, p)
			clearDirty(t, p)
			wantQemuCheck(t, p, 0, 0, 0)
			qemuImg(t, "compare", "-q", "-f", "qcow2", "-F", "raw", p, before)
		})
	}
}

// TestRebuildZeroedRefblocks: with every refcount block zeroed (and with
// snapshots and compressed clusters, so refcounts above 1), the rebuild
// restores a clean image with the same content and snapshots.
func TestRebuildZeroedRefblocks(t *testing.T) {
	requireQemu(t)
	dir := t.TempDir()
	imgs := checkImages(t, dir)
	for _, name := range []string{"snapshots", "compressed-snap", "extl2", "datafile", "v2", "bitmaps", "overlay"} {
		t.Run(name, func(t *testing.T) {
			p := imgs[name]
			before := filepath.Join(dir, name+".before.raw")
			convertRaw(t, p, before)
			snapBefore := filepath.Join(dir, name+".s1.raw")
			if name == "snapshots" {
				cmdIn(t, dir, "qemu-img", "convert", "-l", "snapshot.name=s1", "-f", "qcow2", "-O", "raw", p, snapBefore)
			}
			rt := int64(fileBE64(t, p, 48))
			cs := int64(1) << (fileBE64(t, p, 20) >> 32)
			zero := make([]byte, cs)
			f, err := os.OpenFile(p, os.O_RDWR, 0)
			if err != nil {
				t.Fatal(err)
			}
			for i := int64(0); ; i++ {
				var b [8]byte
				if _, err := f.ReadAt(b[:], rt+i*8); err != nil {
					t.Fatal(err)
				}
				rb := int64(binary.BigEndian.Uint64(b[:]))
				if rb == 0 {
					break
				}
				if _, err := f.WriteAt(zero, rb); err != nil {
					t.Fatal(err)
				}
			}
			f.Close()
			if code, _, _, _ := qemuCheck(t, p); code != 2 {
				t.Fatalf("qemu-img check exit %d on zeroed refcount blocks, want 2", code)
			}
			rebuild(t, p)
			wantQemuCheck(t, p, 0, 0, 0)
			qemuImg(t, "compare", "-q", "-f", "qcow2", "-F", "raw", p, before)
			if name == "snapshots" {
				after := filepath.Join(dir, "s1.after.raw")
				cmdIn(t, dir, "qemu-img", "convert", "-l", "snapshot.name=s1", "-f", "qcow2", "-O", "raw", p, after)
				a, _ := os.ReadFile(after)
				b, _ := os.ReadFile(snapBefore)
				if !bytes.Equal(a, b) || len(a) == 0 {
					t.Fatalf("snapshot s1 differs after the rebuild")
				}
			}
		})
	}
}

// TestCheckRebuildDamaged flips random bytes of an image's metadata
// (header fields, reftable, refcount blocks, L1 and L2 tables) and runs the
// checker and the rebuild on the result: never a panic; and after a rebuild
// that ran, no stored refcount is below its references and nothing leaks,
// even after allocating and freeing through the new structure.
func TestCheckRebuildDamaged(t *testing.T) {
	requireQemu(t)
	seed := driverstest.Seed(t)
	rng := rand.New(rand.NewSource(seed))
	dir := t.TempDir()
	orig := filepath.Join(dir, "orig.qcow2")
	qemuImg(t, "create", "-q", "-f", "qcow2", "-o", "cluster_size=4k,refcount_bits=8", orig, "8M")
	driverstest.QemuIO(t, orig, "write -P 0x11 0 300k", "write -c -P 0x12 4M 4k", "write -c -P 0x13 5M 4k")
	qemuImg(t, "snapshot", "-c", "s1", orig)
	driverstest.QemuIO(t, orig, "write -P 0x14 8k 8k")
	good, err := os.ReadFile(orig)
	if err != nil {
		t.Fatal(err)
	}
	const cs = 4096
	// Metadata byte ranges worth damaging.
	var targets [][2]int64
	targets = append(targets, [2]int64{40, 72})
	rt := int64(binary.BigEndian.Uint64(good[48:]))
	targets = append(targets, [2]int64{rt, rt + cs})
	rb := int64(binary.BigEndian.Uint64(good[rt:]))
	targets = append(targets, [2]int64{rb, rb + cs})
	l1 := int64(binary.BigEndian.Uint64(good[40:]))
	targets = append(targets, [2]int64{l1, l1 + 8})
	l2 := int64(binary.BigEndian.Uint64(good[l1:]) & l1eOffsetMask)
	targets = append(targets, [2]int64{l2, l2 + cs})

	// A rebuild either runs (it moves the refcount table: nil, or an
	// error wrapping ErrCorrupt for the corruptions of the L1/L2 tables
	// it found and counted around) or refuses before touching anything
	// (ErrCorrupt, the table where it was): any other outcome fails.
	rebuilt, withCorruptions, refused := 0, 0, 0
	for iter := range 40 {
		b := append([]byte(nil), good...)
		for range 1 + rng.Intn(3) {
			tg := targets[rng.Intn(len(targets))]
			i := tg[0] + rng.Int63n(tg[1]-tg[0])
			b[i] ^= byte(1 << rng.Intn(8))
		}
		p := filepath.Join(dir, fmt.Sprintf("d%d.qcow2", iter))
		if err := os.WriteFile(p, b, 0o644); err != nil {
			t.Fatal(err)
		}
		ti, err := openRefcountErr(t, p)
		if err != nil {
			continue
		}
		ti.locked(func(co *coroutine.Co) {
			if _, err := ti.rc.checkLocked(co, ti.read(co), ti.snaps); err != nil {
				t.Logf("iteration %d: check: %v", iter, err)
			}
			oldTable := ti.rc.h.ReftableOffset
			err := ti.rc.rebuildLocked(co, ti.read(co), ti.snaps)
			moved := ti.rc.h.ReftableOffset != oldTable
			switch {
			case err == nil && moved:
			case errors.Is(err, drivers.ErrCorrupt) && moved:
				withCorruptions++
			case errors.Is(err, drivers.ErrCorrupt):
				refused++
				return
			default:
				t.Errorf("iteration %d: rebuild: %v (refcount table moved: %v)", iter, err, moved)
				return
			}
			rebuilt++
			off, err := ti.rc.allocLocked(co, 2)
			if err != nil {
				t.Fatalf("iteration %d: allocation after the rebuild: %v", iter, err)
			}
			if err := ti.rc.updateLocked(co, off, 2*cs, -1); err != nil {
				t.Fatalf("iteration %d: free after the rebuild: %v", iter, err)
			}
			res, err := ti.rc.checkLocked(co, ti.read(co), ti.snaps)
			if err != nil {
				t.Fatalf("iteration %d: check after the rebuild: %v", iter, err)
			}
			if res.Undercounted != 0 || res.Leaks != 0 {
				t.Fatalf("iteration %d: after the rebuild %d clusters undercounted, %d leaked: %q",
					iter, res.Undercounted, res.Leaks, res.Errors)
			}
		})
		ti.close(t)
	}
	t.Logf("%d of 40 damaged images rebuilt (%d with corruptions left for a repair), %d refused", rebuilt, withCorruptions, refused)
	if rebuilt < 10 {
		t.Fatalf("only %d of 40 damaged images were rebuilt: the test proves little", rebuilt)
	}
}
