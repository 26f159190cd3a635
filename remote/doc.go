// Package remote reads disk images named by URLs (http://, https://,
// s3://) lazily: it fetches only the ranges read, keeps them in a
// persistent local cache shared by mounts, and pins each object to the
// version it was opened at. It sits below the image drivers, as a kind of
// file, and knows no image format.
//
// # How a URL becomes a file
//
// Install hands aio an opener: aio.Open (and aio.OpenHead, for probing)
// of a URL opens, read-only, the cache's sparse data file of the object,
// with the Object as its aio.Filler. Every read of that aio.File first
// calls Object.Fill for its range (on a worker, coroutine.RunInWorker: the
// coroutine waits without blocking its event loop), then reads the local
// file. So qcow2, raw and every other driver, the raw driver's direct-read
// fast path included (it goes through pread), work on a remote image
// unchanged; FUSE passthrough is refused (aio.File.LendFd fails), since
// the kernel would read holes never fetched. A URL is opened once per
// process (Objects): the probe, the driver and a chain that names a URL
// twice share one Object.
//
// # Files
//
//   - source.go: the source interface (open: learn or revalidate the
//     version; read: a pinned ranged read), URL parsing.
//   - http.go: HTTP(S) by ranged GETs. No HEAD (presigned URLs are signed
//     for GET only): the open's GET of the first chunk learns the size from
//     Content-Range, and the ETag or Last-Modified; a 200 to that ranged
//     GET means no range support and is refused (never a silent full
//     download). Every later request carries If-Match with a strong ETag
//     (If-Unmodified-Since otherwise) and its answer's Content-Range and
//     ETag are checked: a 412 or a mismatch is ErrChanged. Proxies come
//     from the *_proxy variables and CAs from SSL_CERT_FILE/SSL_CERT_DIR, as
//     Go's standard library reads them.
//   - s3.go: s3://BUCKET/KEY through minio-go: credentials from the
//     environment, the shared AWS files and IAM; the endpoint from
//     --s3-endpoint, AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL; StatObject
//     for the version, ranged GetObject with If-Match and the answer's ETag
//     compared.
//   - object.go: Object: Fill (a random reader fetches the 4 KiB blocks it
//     reads; a sequential one whole 1 MiB chunks and a readahead window
//     that doubles up to Config.Readahead chunks), duplicate requests for
//     a block merged (the first caller fetches, the others wait for its
//     call), at most Config.Parallel requests in flight, bounded retries
//     with doubling pauses for transient failures (refused or dropped
//     connections, timeouts, 5xx, bodies cut short), the prefetch, the
//     counters status shows.
//   - cache.go: the cache entries (layout and crash-safety rules in the
//     comment at its top), List and Prune.
//   - config.go: Config, its defaults, Objects (one per process), Install.
//   - errors.go: *Error and its kinds (ErrNotFound, ErrNoRange,
//     ErrChanged, ErrRefused, ErrCertificate, ...); every Error also matches
//     syscall.EIO, and never the network's own errno.
//
// # Pinning
//
// An object is read at one version for the life of the Object. Once the
// server says it changed, every fetch fails with ErrChanged (EIO to the
// reader; the error is in status and the log), while blocks already cached
// still read the old bytes: new bytes are never mixed with old ones. A new
// open revalidates (If-None-Match: a 304 costs no body), and a changed
// object replaces its cache entry whole.
//
// # Concurrency and locks
//
// Object.mu protects the in-flight map, the readahead state and the
// changed error; entry.mu the present bitmap. Neither is held across a
// request or file I/O; Object.mu is never taken while holding entry.mu.
// Between processes, an entry's lock file is flock'ed shared while in
// use, and eviction takes it exclusive without waiting (an entry in use
// is never evicted). Two processes filling one entry at once write the
// same bytes (the version is pinned) and each marks its own blocks.
//
// # Numbers
//
// Blocks are 4 KiB, so random 4 KiB reads transfer what they read (1.02×
// for fio randread 4 KiB of a 64 MiB raw image over loopback, against
// 256× with 1 MiB fetches); a sequential reader's requests are 1 MiB
// chunks with up to 16 MiB of readahead (cold dd of that image: 386–599
// MB/s, where serial 1 MiB requests gave 105 MB/s, on a loaded 2-CPU
// machine). A read counts as sequential after two in a row that start
// within 256 KiB of where the reads before ended; one up to two chunks
// behind that front (the first of a batch the kernel sent together)
// changes nothing. The block bitmaps take 2 bits of memory per 4 KiB: 64
// MiB for the largest object, 1 TiB (MaxSize). Timeouts are 10 s per request with 3
// retries (100, 200, 400 ms apart), so a read of a server that vanished
// fails within about 40 s, one of a refused connection within a second.
// The cache is bounded by --cache-max at each open and after every eighth
// of it (at most 64 MiB) stored: least recently used objects not in use
// are evicted whole. An object in use is never trimmed (a reader between
// its Fill and its pread would read a hole).
package remote
