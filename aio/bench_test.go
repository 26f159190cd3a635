package aio

import (
	"math/rand/v2"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"imgfuse/coroutine"
	"imgfuse/internal/testenv"
)

const benchFileSize = 256 << 20

var benchFile struct {
	once sync.Once
	dir  string
	path string
	skip string
}

// TestMain removes the benchmark's 256 MiB file.
func TestMain(m *testing.M) {
	code := m.Run()
	if benchFile.dir != "" {
		os.RemoveAll(benchFile.dir)
	}
	os.Exit(code)
}

// benchImage returns a 256 MiB file of real (written, not fallocated)
// blocks on a direct-I/O filesystem, out of the page cache.
func benchImage(b *testing.B) string {
	benchFile.once.Do(func() {
		for _, base := range []string{os.TempDir(), "/var/tmp", "/work"} {
			d, err := os.MkdirTemp(base, "aiobench")
			if err != nil {
				continue
			}
			p := filepath.Join(d, "img")
			if err := writeBenchFile(p); err != nil {
				os.RemoveAll(d)
				benchFile.skip = err.Error()
				continue
			}
			f, err := Open(p, Options{ReadOnly: true})
			if err != nil || !f.Direct() {
				os.RemoveAll(d)
				benchFile.skip = base + ": no direct I/O"
				if f != nil {
					f.Close()
				}
				continue
			}
			f.Close()
			benchFile.dir, benchFile.path, benchFile.skip = d, p, ""
			return
		}
	})
	if benchFile.path == "" {
		testenv.Skip(b, "no file for O_DIRECT benchmarks: %s", benchFile.skip)
	}
	return benchFile.path
}

func writeBenchFile(p string) error {
	f, err := os.Create(p)
	if err != nil {
		return err
	}
	defer f.Close()
	r := rand.New(rand.NewPCG(7, 7))
	chunk := randBytes(r, 1<<20)
	for off := 0; off < benchFileSize; off += len(chunk) {
		chunk[0] = byte(off >> 20) // not all identical, in case of dedup
		if _, err := f.Write(chunk); err != nil {
			return err
		}
	}
	if err := f.Sync(); err != nil {
		return err
	}
	// Drop the cached pages so that buffered readers get no advantage.
	return unix.Fadvise(int(f.Fd()), 0, 0, unix.FADV_DONTNEED)
}

func cpuTime() time.Duration {
	var ru unix.Rusage
	unix.Getrusage(unix.RUSAGE_SELF, &ru)
	return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
}

// runRandom runs b.N 4 KiB random reads from qd goroutines, each calling
// read(buf, off), and reports IOPS and CPU time per I/O.
func runRandom(b *testing.B, qd int, size int64, read func(buf []byte, off int64) error) {
	var next atomic.Int64
	var wg sync.WaitGroup
	blocks := size / 4096
	b.ResetTimer()
	start, cpu0 := time.Now(), cpuTime()
	for g := 0; g < qd; g++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			r := rand.New(rand.NewPCG(uint64(g), 11))
			buf := AlignedBuffer(4096)
			for next.Add(1) <= int64(b.N) {
				if err := read(buf, r.Int64N(blocks)*4096); err != nil {
					b.Error(err)
					return
				}
			}
		}()
	}
	wg.Wait()
	elapsed, cpu := time.Since(start), cpuTime()-cpu0
	b.StopTimer()
	b.ReportMetric(float64(b.N)/elapsed.Seconds(), "IOPS")
	b.ReportMetric(float64(cpu.Microseconds())/float64(b.N), "cpu-µs/op")
}

// BenchmarkRandRead4k compares, on one 256 MiB O_DIRECT file, 4 KiB random
// reads at queue depth 1 and 32: qd coroutines on one event loop reading
// through its AIO context (PreadCo, and PreadAlignedCo, the raw fast
// path), and plain pread(2) on an O_DIRECT descriptor from qd goroutines.
func BenchmarkRandRead4k(b *testing.B) {
	path := benchImage(b)
	f, err := Open(path, Options{ReadOnly: true})
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_DIRECT|unix.O_CLOEXEC, 0)
	if err != nil {
		b.Fatal(err)
	}
	defer unix.Close(fd)
	l := testLoop(b)
	e := loopEngine(b, l)
	for _, qd := range []int{1, 32} {
		b.Run("PreadCo/QD"+itoa(qd), func(b *testing.B) {
			s0 := stats(e)
			runOnLoop(b, l, qd, benchFileSize, func(co *coroutine.Co, buf []byte, off int64) error {
				return f.PreadCo(co, buf, off)
			})
			if s1 := stats(e); s1.submitCalls > s0.submitCalls {
				b.ReportMetric(float64(s1.submitted-s0.submitted)/float64(s1.submitCalls-s0.submitCalls), "iocbs/submit")
			}
		})
		b.Run("PreadAlignedCo/QD"+itoa(qd), func(b *testing.B) {
			runOnLoop(b, l, qd, benchFileSize, func(co *coroutine.Co, buf []byte, off int64) error {
				_, err := f.PreadAlignedCo(co, buf, off)
				return err
			})
		})
		b.Run("unix.Pread/QD"+itoa(qd), func(b *testing.B) {
			runRandom(b, qd, benchFileSize, func(buf []byte, off int64) error {
				_, err := unix.Pread(fd, buf, off)
				return err
			})
		})
	}
}

// runOnLoop runs b.N random reads of bs bytes from qd coroutines of loop l
// and reports IOPS and CPU time per I/O.
func runOnLoop(b *testing.B, l *coroutine.Loop, qd int, size int64, read func(co *coroutine.Co, buf []byte, off int64) error) {
	runOnLoopBS(b, l, qd, size, 4096, read)
}

func runOnLoopBS(b *testing.B, l *coroutine.Loop, qd int, size int64, bs int, read func(co *coroutine.Co, buf []byte, off int64) error) {
	var wg sync.WaitGroup
	var left atomic.Int64
	left.Store(int64(b.N))
	blocks := size / int64(bs)
	worker := func(co *coroutine.Co, arg any) {
		defer wg.Done()
		r := rand.New(rand.NewPCG(uint64(arg.(int)), 11))
		buf := AlignedBuffer(bs)
		for left.Add(-1) >= 0 {
			if err := read(co, buf, r.Int64N(blocks)*int64(bs)); err != nil {
				b.Error(err)
				return
			}
		}
	}
	b.ResetTimer()
	start, cpu0 := time.Now(), cpuTime()
	wg.Add(qd)
	l.Post(func() {
		for g := range qd {
			l.Go(worker, g)
		}
	})
	wg.Wait()
	elapsed, cpu := time.Since(start), cpuTime()-cpu0
	b.StopTimer()
	b.ReportMetric(float64(b.N)/elapsed.Seconds(), "IOPS")
	b.ReportMetric(float64(cpu.Microseconds())/float64(b.N), "cpu-µs/op")
}

// BenchmarkFallbackRead measures the fallback engine on tmpfs, where it
// runs pread in place on the loop: how long one read holds the loop, for
// 4 KiB and 1 MiB reads at QD1.
func BenchmarkFallbackRead(b *testing.B) {
	d := shmDir(b)
	if d == "" {
		testenv.Skip(b, "/dev/shm is not tmpfs")
	}
	const size = 64 << 20
	p := filepath.Join(d, "img")
	if err := os.WriteFile(p, make([]byte, size), 0o644); err != nil {
		b.Fatal(err)
	}
	f, err := Open(p, Options{})
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	l := testLoop(b)
	for _, bs := range []int{4 << 10, 1 << 20} {
		b.Run(itoa(bs>>10)+"k", func(b *testing.B) {
			runOnLoopBS(b, l, 1, size, bs, func(co *coroutine.Co, buf []byte, off int64) error {
				return f.PreadCo(co, buf, off)
			})
		})
	}
}

func itoa(n int) string {
	if n < 10 {
		return string(rune('0' + n))
	}
	return itoa(n/10) + string(rune('0'+n%10))
}
