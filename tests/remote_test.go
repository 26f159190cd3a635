package tests

import (
	"bytes"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
)

// Tests of remote images (issue 16): an nginx started by the test on
// 127.0.0.1 and a free port, with its own configuration, serves images
// made by qemu-img.

// nginx is one nginx server of the directory www.
type nginx struct {
	t      *testing.T
	dir    string // config, pid, logs
	www    string
	addr   string
	cmd    *exec.Cmd
	access string
}

func startNginx(t *testing.T, www string) *nginx {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close()
	dir := t.TempDir()
	n := &nginx{t: t, dir: dir, www: www, addr: addr, access: filepath.Join(dir, "access.log")}
	conf := fmt.Sprintf(`daemon off;
user root;
worker_processes 1;
pid %[1]s/nginx.pid;
error_log %[1]s/error.log;
events {}
http {
	log_format sizes "$status $body_bytes_sent $http_range";
	access_log %[1]s/access.log sizes;
	client_body_temp_path %[1]s;
	proxy_temp_path %[1]s;
	fastcgi_temp_path %[1]s;
	uwsgi_temp_path %[1]s;
	scgi_temp_path %[1]s;
	server { listen %[2]s; root %[3]s; }
}
`, dir, addr, www)
	if err := os.WriteFile(filepath.Join(dir, "nginx.conf"), []byte(conf), 0o644); err != nil {
		t.Fatal(err)
	}
	n.start()
	t.Cleanup(n.stop)
	return n
}

func (n *nginx) start() {
	n.t.Helper()
	n.cmd = exec.Command("nginx", "-c", filepath.Join(n.dir, "nginx.conf"), "-p", n.dir)
	if err := n.cmd.Start(); err != nil {
		n.t.Fatal(err)
	}
	if !waitFor(5*time.Second, func() bool {
		c, err := net.Dial("tcp", n.addr)
		if err == nil {
			c.Close()
		}
		return err == nil
	}) {
		b, _ := os.ReadFile(filepath.Join(n.dir, "error.log"))
		n.t.Fatalf("nginx does not answer on %s:\n%s", n.addr, b)
	}
}

func (n *nginx) stop() {
	if n.cmd == nil {
		return
	}
	n.cmd.Process.Signal(syscall.SIGTERM)
	n.cmd.Wait()
	n.cmd = nil
}

func (n *nginx) url(name string) string { return "http://" + n.addr + "/" + name }

// log returns the access log's lines: "STATUS BODY-BYTES RANGE".
func (n *nginx) log() []string {
	b, _ := os.ReadFile(n.access)
	return strings.Split(strings.TrimSpace(string(b)), "\n")
}

// remoteImages makes, in www, a qcow2 image with data in a few places
// and a raw image, and their qemu-img convert -O raw in dir.
func remoteImages(t *testing.T, www, dir string) (qcowRaw, rawRaw string) {
	t.Helper()
	q := filepath.Join(www, "base.qcow2")
	run(t, "qemu-img", "create", "-q", "-f", "qcow2", q, "32M")
	run(t, "qemu-io", "-c", "write -P 0x5a 1M 3M", "-c", "write -P 0x11 17M 1M", "-c", "write -P 0x77 31M 64k", q)
	qcowRaw = filepath.Join(dir, "base.raw")
	run(t, "qemu-img", "convert", "-O", "raw", q, qcowRaw)
	r := filepath.Join(www, "disk.img")
	run(t, "qemu-img", "create", "-q", "-f", "raw", r, "8M")
	run(t, "qemu-io", "-f", "raw", "-c", "write -P 0x3c 0 8M", "-c", "write -P 0x42 3M 5k", r)
	rawRaw = filepath.Join(dir, "disk.raw")
	run(t, "qemu-img", "convert", "-f", "raw", "-O", "raw", r, rawRaw)
	return qcowRaw, rawRaw
}

// servedRaw starts a parallel end-to-end test of the raw image of
// remoteImages served by nginx: the server, an empty cache directory and
// the image's bytes.
func servedRaw(t *testing.T) (ng *nginx, cache string, want []byte) {
	t.Helper()
	requireE2E(t, "nginx")
	t.Parallel()
	www, dir := t.TempDir(), t.TempDir()
	_, rawRaw := remoteImages(t, www, dir)
	want, err := os.ReadFile(rawRaw)
	if err != nil {
		t.Fatal(err)
	}
	return startNginx(t, www), t.TempDir(), want
}

func run(t *testing.T, name string, args ...string) {
	t.Helper()
	if out, err := exec.Command(name, args...).CombinedOutput(); err != nil {
		t.Fatalf("%s %s: %v\n%s", name, strings.Join(args, " "), err, out)
	}
}

// TestRemoteMount: a qcow2 and a raw image served by nginx mount
// read-only and read back equal to qemu-img convert -O raw; writes get
// EROFS; a second mount with the same cache transfers no bytes, only
// revalidations (304); info of a missing object or a refused connection
// exits 3 with one line.
func TestRemoteMount(t *testing.T) {
	requireE2E(t, "nginx")
	t.Parallel()
	www, dir, cache := t.TempDir(), t.TempDir(), t.TempDir()
	qcowRaw, rawRaw := remoteImages(t, www, dir)
	ng := startNginx(t, www)
	for _, c := range []struct{ name, want string }{{"base.qcow2", qcowRaw}, {"disk.img", rawRaw}} {
		mp, disk := mount(t, ng.url(c.name), false, "--cache-dir", cache)
		compareFiles(t, disk, c.want)
		if _, err := os.OpenFile(disk, os.O_RDWR, 0); !errorsIsErrno(err, syscall.EROFS) {
			t.Errorf("open O_RDWR of a remote image: %v, want EROFS", err)
		}
		unmount(t, mp)
		before := len(ng.log())
		mp, disk = mount(t, ng.url(c.name), false, "--cache-dir", cache)
		compareFiles(t, disk, c.want)
		unmount(t, mp)
		second := ng.log()[before:]
		if len(second) == 0 {
			t.Errorf("%s: a second mount made no request: no revalidation", c.name)
		}
		for _, l := range second {
			if !strings.HasPrefix(l, "304 0 ") {
				t.Errorf("%s: a second mount sent %q; want only revalidations (304, no body)", c.name, l)
			}
		}
	}
	mp := newMountpoint(t, false)
	r := imgfuse(t, nil, "mount", "--cache-dir", cache, ng.url("disk.img"), mp)
	if r.code != 0 || strings.Count(r.stderr, "\n") != 1 || !strings.Contains(r.stderr, "read-only") || !strings.Contains(r.stderr, "--overlay") {
		t.Errorf("mount of a URL: %v, want one line on stderr saying read-only and naming --overlay", r)
	}
	unmount(t, mp)
	r = imgfuse(t, nil, "mount", "--cache-dir", cache, ng.url("missing.qcow2"), mp)
	if r.code != 3 || !strings.Contains(r.stderr, "404") || strings.Count(r.stderr, "\n") != 1 || mounted(t, mp) {
		t.Errorf("mount of a missing object: %v, want exit 3 and one line naming 404", r)
	}
	r = imgfuse(t, nil, "info", "--cache-dir", cache, ng.url("missing.qcow2"))
	if r.code != 3 || !strings.Contains(r.stderr, "404") || strings.Count(r.stderr, "\n") != 1 {
		t.Errorf("info of a missing object: %v, want exit 3 and one line naming 404", r)
	}
	ng.stop()
	r = imgfuse(t, nil, "info", "--cache-dir", cache, ng.url("base.qcow2"))
	if r.code != 3 || !strings.Contains(r.stderr, "connection refused") || strings.Count(r.stderr, "\n") != 1 {
		t.Errorf("info with the server down: %v, want exit 3 and one line: connection refused", r)
	}
}

func errorsIsErrno(err error, want syscall.Errno) bool {
	var pe *os.PathError
	if e, ok := err.(*os.PathError); ok {
		pe = e
	}
	return pe != nil && pe.Err == want
}

// TestRemoteBackingAndOverlay: a local qcow2 whose backing file is a URL
// reads as its base, and so does a remote qcow2 whose backing file name
// is relative (resolved against its URL); map and check of a URL answer
// as for the local file; --overlay-keep over a URL takes writes, judged
// by qemu-img compare against a raw model.
func TestRemoteBackingAndOverlay(t *testing.T) {
	requireE2E(t, "nginx")
	t.Parallel()
	www, dir, cache := t.TempDir(), t.TempDir(), t.TempDir()
	qcowRaw, _ := remoteImages(t, www, dir)
	ng := startNginx(t, www)
	top := filepath.Join(dir, "top.qcow2")
	run(t, "qemu-img", "create", "-q", "-f", "qcow2", "-u", "-b", ng.url("base.qcow2"), "-F", "qcow2", top, "32M")
	mp, disk := mount(t, top, false, "--cache-dir", cache, "--read-only")
	compareFiles(t, disk, qcowRaw)
	unmount(t, mp)

	run(t, "qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", filepath.Join(www, "top.qcow2"))
	mp, disk = mount(t, ng.url("top.qcow2"), false, "--cache-dir", cache)
	compareFiles(t, disk, qcowRaw)
	unmount(t, mp)
	local := imgfuse(t, nil, "map", "--output=json", filepath.Join(www, "base.qcow2"))
	remote := imgfuse(t, nil, "map", "--output=json", "--cache-dir", cache, ng.url("base.qcow2"))
	if local.code != 0 || remote.code != 0 || local.stdout != remote.stdout {
		t.Errorf("map of the URL differs from map of the file:\n%v\n%v", remote, local)
	}
	if r := imgfuse(t, nil, "check", "--cache-dir", cache, ng.url("base.qcow2")); r.code != 0 || !strings.Contains(r.stdout, "No errors were found") {
		t.Errorf("check of the URL: %v", r)
	}

	keep := filepath.Join(dir, "overlay.qcow2")
	mp, disk = mount(t, ng.url("base.qcow2"), false, "--cache-dir", cache, "--overlay-keep", keep)
	model, err := os.ReadFile(qcowRaw)
	if err != nil {
		t.Fatal(err)
	}
	f, err := os.OpenFile(disk, os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	for i, off := range []int64{0, 2<<20 + 512, 17<<20 + 4096, 30 << 20} {
		p := bytes.Repeat([]byte{byte(0xa0 + i)}, 70000)
		if _, err := f.WriteAt(p, off); err != nil {
			t.Fatal(err)
		}
		copy(model[off:], p)
	}
	f.Close()
	unmount(t, mp)
	modelPath := filepath.Join(dir, "model.raw")
	if err := os.WriteFile(modelPath, model, 0o644); err != nil {
		t.Fatal(err)
	}
	qemuCompare(t, keep, modelPath)
	if sum := fileSum(t, filepath.Join(www, "base.qcow2")); sum == "" {
		t.Error("no base")
	}
}

// TestRemoteServerGone: with the server stopped, reads of what is not
// cached fail with EIO within a bounded time (what is cached still
// reads); after a restart they succeed.
func TestRemoteServerGone(t *testing.T) {
	ng, cache, want := servedRaw(t)
	_, disk := mount(t, ng.url("disk.img"), false, "--cache-dir", cache)
	if errno, got := readErrno(t, disk, 0, 4096); errno != 0 || !bytes.Equal(got, want[:4096]) {
		t.Fatalf("first read: %v", errno)
	}
	ng.stop()
	start := time.Now()
	if errno, _ := readErrno(t, disk, 5<<20, 4096); errno != syscall.EIO {
		t.Errorf("read with the server gone: errno %v, want EIO", errno)
	}
	if d := time.Since(start); d > 10*time.Second {
		t.Errorf("the failing read took %v", d)
	}
	if errno, got := readErrno(t, disk, 0, 4096); errno != 0 || !bytes.Equal(got, want[:4096]) {
		t.Errorf("cached read with the server gone: %v", errno)
	}
	ng.start()
	if errno, got := readErrno(t, disk, 5<<20, 4096); errno != 0 || !bytes.Equal(got, want[5<<20:5<<20+4096]) {
		t.Errorf("read after the restart: errno %v", errno)
	}
}

// TestRemoteObjectReplaced: an object replaced on the server fails reads
// of what is not cached with EIO and says why in status, never serving
// new bytes; a new mount sees the new object whole.
func TestRemoteObjectReplaced(t *testing.T) {
	requireE2E(t, "nginx")
	t.Parallel()
	www, dir, cache := t.TempDir(), t.TempDir(), t.TempDir()
	_, rawRaw := remoteImages(t, www, dir)
	ng := startNginx(t, www)
	mp, disk := mount(t, ng.url("disk.img"), false, "--cache-dir", cache)
	if errno, _ := readErrno(t, disk, 0, 4096); errno != 0 {
		t.Fatalf("first read: %v", errno)
	}
	img := filepath.Join(www, "disk.img")
	run(t, "qemu-io", "-f", "raw", "-c", "write -P 0x99 0 8M", img)
	later := time.Now().Add(time.Minute)
	os.Chtimes(img, later, later) // a new ETag even within the same second
	if errno, _ := readErrno(t, disk, 6<<20, 4096); errno != syscall.EIO {
		t.Errorf("read after the object changed: errno %v, want EIO", errno)
	}
	var st []struct {
		Remote []struct {
			LastError string `json:"last-error"`
		} `json:"remote"`
	}
	if !waitFor(3*time.Second, func() bool {
		r := imgfuse(t, nil, "status", "--output=json")
		if json.Unmarshal([]byte(r.stdout), &st) != nil {
			return false
		}
		for _, e := range st {
			for _, o := range e.Remote {
				if strings.Contains(o.LastError, "changed") {
					return true
				}
			}
		}
		return false
	}) {
		t.Errorf("status does not say the object changed: %+v", st)
	}
	unmount(t, mp)
	newRaw := filepath.Join(dir, "new.raw")
	run(t, "qemu-img", "convert", "-f", "raw", "-O", "raw", img, newRaw)
	mp, disk = mount(t, ng.url("disk.img"), false, "--cache-dir", cache)
	compareFiles(t, disk, newRaw)
	unmount(t, mp)
	_ = rawRaw
}

// TestRemotePrefetchAndCache: --prefetch fetches the whole image in the
// background, with its progress in status; cache ls shows the entry (in
// use while mounted), and cache prune removes it once unmounted.
func TestRemotePrefetchAndCache(t *testing.T) {
	requireE2E(t, "nginx")
	t.Parallel()
	www, dir, cache := t.TempDir(), t.TempDir(), t.TempDir()
	_, rawRaw := remoteImages(t, www, dir)
	ng := startNginx(t, www)
	url := ng.url("disk.img")
	mp, _ := mount(t, url, false, "--cache-dir", cache, "--prefetch")
	type entry struct {
		URL    string `json:"url"`
		Size   int64  `json:"size"`
		Cached int64  `json:"cached"`
		InUse  bool   `json:"in-use"`
	}
	var ents []entry
	ls := func() []entry {
		r := imgfuse(t, nil, "cache", "ls", "--output=json", "--cache-dir", cache)
		ents = nil
		if r.code != 0 || json.Unmarshal([]byte(r.stdout), &ents) != nil {
			t.Fatalf("cache ls: %v", r)
		}
		return ents
	}
	if !waitFor(10*time.Second, func() bool {
		e := ls()
		return len(e) == 1 && e[0].Cached >= e[0].Size
	}) {
		t.Fatalf("the prefetch did not fill the cache: %+v", ents)
	}
	if ents[0].URL != url || ents[0].Size != 8<<20 || !ents[0].InUse {
		t.Errorf("cache ls while mounted: %+v", ents[0])
	}
	var st []struct {
		Remote []struct {
			Prefetch string `json:"prefetch"`
			Fetched  int64  `json:"fetched"`
		} `json:"remote"`
	}
	if !waitFor(3*time.Second, func() bool {
		r := imgfuse(t, nil, "status", "--output=json", mp)
		var one struct {
			Remote []struct {
				Prefetch string `json:"prefetch"`
				Fetched  int64  `json:"fetched"`
			} `json:"remote"`
		}
		if json.Unmarshal([]byte(r.stdout), &one) != nil || len(one.Remote) != 1 {
			return false
		}
		st = append(st[:0], one)
		return one.Remote[0].Prefetch == "done"
	}) {
		t.Errorf("status does not say the prefetch is done: %+v", st)
	}
	if r := imgfuse(t, nil, "cache", "prune", "--cache-dir", cache); r.code != 0 || len(ls()) != 1 {
		t.Errorf("cache prune removed an entry in use: %v, %+v", r, ents)
	}
	unmount(t, mp)
	r := imgfuse(t, nil, "cache", "prune", "--cache-dir", cache)
	if r.code != 0 || !strings.Contains(r.stdout, url) || len(ls()) != 0 {
		t.Errorf("cache prune after the unmount: %v, left %+v", r, ents)
	}
	_ = rawRaw
}

// faultProxy is a TCP proxy in front of a server that cuts answers
// short, delays them or drops connections, as told.
type faultProxy struct {
	addr  string
	to    string
	cuts  atomic.Int64 // answers still to cut in half (then close the connection)
	delay atomic.Int64 // nanoseconds before forwarding each read of an answer
	drop  atomic.Bool  // close every connection at once
	ln    net.Listener
}

func startFaultProxy(t *testing.T, to string) *faultProxy {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	p := &faultProxy{addr: ln.Addr().String(), to: to, ln: ln}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go p.serve(c)
		}
	}()
	return p
}

func (p *faultProxy) serve(c net.Conn) {
	defer c.Close()
	if p.drop.Load() {
		return
	}
	s, err := net.Dial("tcp", p.to)
	if err != nil {
		return
	}
	defer s.Close()
	go func() {
		io.Copy(s, c)
		s.Close()
	}()
	buf := make([]byte, 32<<10)
	for {
		n, err := s.Read(buf)
		if n > 0 {
			if p.drop.Load() {
				return
			}
			if p.cuts.Load() > 0 && p.cuts.Add(-1) >= 0 {
				c.Write(buf[:n/2])
				return
			}
			time.Sleep(time.Duration(p.delay.Load()))
			if _, werr := c.Write(buf[:n]); werr != nil {
				return
			}
		}
		if err != nil {
			return
		}
	}
}

// TestRemoteFaults: through a proxy that cuts answers short, delays them
// or drops connections, reads either return the image's bytes (cut
// answers are retried) or fail with EIO within a bounded time, and
// succeed once the faults stop.
func TestRemoteFaults(t *testing.T) {
	ng, cache, want := servedRaw(t)
	px := startFaultProxy(t, ng.addr)
	_, disk := mount(t, "http://"+px.addr+"/disk.img", false, "--cache-dir", cache)
	// Small reads far apart: no readahead fetches what a later step
	// reads (nor the probe, which fetched the first and last MiB).
	px.cuts.Store(3)
	if errno, got := readErrno(t, disk, 1<<20, 4096); errno != 0 || !bytes.Equal(got, want[1<<20:1<<20+4096]) {
		t.Errorf("read through answers cut short: errno %v", errno)
	}
	if left := px.cuts.Load(); left > 0 {
		t.Errorf("%d cuts left: the reads did not go through the proxy", left)
	}
	px.cuts.Store(0)
	px.delay.Store(int64(20 * time.Millisecond))
	if errno, got := readErrno(t, disk, 4<<20, 4096); errno != 0 || !bytes.Equal(got, want[4<<20:4<<20+4096]) {
		t.Errorf("read through a slow proxy: errno %v", errno)
	}
	px.delay.Store(0)
	px.drop.Store(true)
	start := time.Now()
	if errno, _ := readErrno(t, disk, 6<<20, 4096); errno != syscall.EIO {
		t.Errorf("read with every connection dropped: errno %v, want EIO", errno)
	}
	if d := time.Since(start); d > 10*time.Second {
		t.Errorf("the failing read took %v", d)
	}
	px.drop.Store(false)
	if errno, got := readErrno(t, disk, 6<<20, 4096); errno != 0 || !bytes.Equal(got, want[6<<20:6<<20+4096]) {
		t.Errorf("read once the faults stopped: errno %v", errno)
	}
}

// TestRemoteLazy: a read of a few KiB of a remote qcow2 image transfers
// its metadata and the clusters read, not the image: a small part of the
// file's size, counted in nginx's access log.
func TestRemoteLazy(t *testing.T) {
	requireE2E(t, "nginx")
	t.Parallel()
	www, cache := t.TempDir(), t.TempDir()
	img := filepath.Join(www, "big.qcow2")
	run(t, "qemu-img", "create", "-q", "-f", "qcow2", img, "64M")
	run(t, "qemu-io", "-c", "write -P 0x31 0 24M", "-c", "write -P 0x32 40M 8M", img)
	fi, err := os.Stat(img)
	if err != nil {
		t.Fatal(err)
	}
	ng := startNginx(t, www)
	mp, disk := mount(t, ng.url("big.qcow2"), false, "--cache-dir", cache)
	if errno, got := readErrno(t, disk, 41<<20, 4096); errno != 0 || !bytes.Equal(got, bytes.Repeat([]byte{0x32}, 4096)) {
		t.Fatalf("read: errno %v", errno)
	}
	unmount(t, mp)
	var sent int64
	for _, l := range ng.log() {
		var status, n int64
		fmt.Sscanf(l, "%d %d", &status, &n)
		sent += n
	}
	// The open's first MiB (header, L1, refcount table; the server
	// only revalidates it), the probe's last 64 KiB, the metadata reads
	// that follow each other (taken as a sequential reader's: a chunk),
	// an L2 table, the block read.
	if sent == 0 || sent > 3<<20 || sent > fi.Size()/8 {
		t.Errorf("a 4 KiB read transferred %d bytes of a %d-byte image:\n%s", sent, fi.Size(), strings.Join(ng.log(), "\n"))
	}
}

// TestRemoteFormats: images of the other formats served over HTTP read
// back as qemu-img convert says, probed from the bytes fetched: every
// driver reads a remote image through the same cached file, and a VMDK
// descriptor's extents are fetched from beside it.
func TestRemoteFormats(t *testing.T) {
	requireE2E(t, "nginx")
	t.Parallel()
	www, cache := t.TempDir(), t.TempDir()
	names := map[string]bool{"dynamic.vdi": true, "dynamic.vhd": true, "fixed.vhd": true,
		"dynamic.vhdx": true, "sparse.vmdk": true, "stream.vmdk": true, "flat.vmdk": true, "split-sparse.vmdk": true}
	var imgs []blockImage
	for _, b := range blockImages {
		if names[b.name] {
			imgs = append(imgs, b)
		}
	}
	if len(imgs) != len(names) {
		t.Fatalf("found %d of the %d images in blockImages", len(imgs), len(names))
	}
	ng := startNginx(t, www)
	for _, b := range imgs {
		_, ref := b.build(t, www)
		want := filepath.Join(t.TempDir(), "want.raw")
		writeModel(t, want, ref)
		mp, disk := mount(t, ng.url(b.name), false, "--cache-dir", cache)
		compareFiles(t, disk, want)
		unmount(t, mp)
	}
}
