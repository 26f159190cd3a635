// Package driverstest is the conformance suite every drivers.Driver passes,
// plus the helpers the driver and end-to-end tests share for building test
// images with qemu-img and qemu-io, the reference implementation.
//
// Run checks the read side of the contract against a reference copy of the
// virtual disk: size, whole-disk and random unaligned reads (seeded; the seed
// is logged on failure and can be replayed with DRIVERSTEST_SEED), concurrent
// reads from many goroutines each in its own coroutine, the BlockStatus
// contract, and the io.ReaderAt adapter. RunWritable adds a metamorphic
// write test: a seeded random sequence of writes, zero-writes and discards is
// applied both to the driver and to an in-memory model, and every touched
// range is read back and compared after each step.
//
// Run also drives the DirectReader fast path, when the driver has one, from
// plain goroutines. RunReadOnly checks that a read-only driver refuses every
// kind of write with ErrReadOnly.
//
// Catalogue lists qcow2 images built with qemu-img/qemu-io, one per feature,
// and ConvertRef produces the reference for each; Damaged lists damaged
// images a reader must refuse or fail reads of. Both the driver tests and
// the end-to-end tests use them, so every feature is checked below and
// above FUSE. Qcow2Oracle decodes, independently of the driver, what each
// cluster of a damaged qcow2 image must read as (its mapped bytes, or a
// failure where the mapping is invalid or names metadata), and
// CheckHostileRead judges one read against it: the hostile-image tests of
// both levels judge every read of every case with them. Missing tools skip those tests, or fail them when
// IMGFUSE_REQUIRE_E2E=1 or CI=true (see Required).
//
// Concurrency: the suite drives the driver the way fusefs does, from many
// goroutines, each request in its own coroutine (coroutine.Run, on the
// process's event loops). It owns no
// locks of its own; run it under the race detector.
//
// Numbers: random reads span 1 byte to 3 MiB because 3 MiB crosses at
// least one 2 MiB cluster boundary (the largest qcow2 cluster) wherever it
// starts, and 16 goroutines is twice what a FUSE mount with the default
// max_background keeps in flight per CPU on a small machine, enough to make
// the metadata lock contend.
package driverstest
