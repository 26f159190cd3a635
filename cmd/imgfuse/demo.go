package main

import (
	"embed"
	"errors"
	"fmt"
	"io"
	"log"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"

	"github.com/spf13/cobra"

	"imgfuse/imgtool"
	"imgfuse/mounts"
	"imgfuse/session"
)

// The demo images, built by sample/make-sample.sh: an ext4 filesystem in
// backing.qcow2, and overlay.qcow2 on top of it with compressed and zero
// clusters. Embedded so that a user without an image can try imgfuse; they
// are written out to disk because the drivers open files by path.
//
//go:embed sample/backing.qcow2 sample/overlay.qcow2
var sampleFS embed.FS

// sampleFiles are the embedded files, in the order they are written
// (backing first: the overlay names it).
var sampleFiles = []string{"backing.qcow2", "overlay.qcow2"}

func newDemoCmd(stdout io.Writer) *cobra.Command {
	var dir string
	var foreground bool
	cmd := &cobra.Command{
		Use:   "demo [--dir DIR] [--foreground]",
		Short: "Mount a small sample qcow2 image to try imgfuse",
		Long: `Write a sample qcow2 chain (an ext4 filesystem in backing.qcow2, and
overlay.qcow2 on top of it with compressed and zero clusters) to DIR, mount
the overlay read-only on DIR/mnt, and print what to try next: a loop mount
on DIR/fs as root; for other users fuse2fs on DIR/fs, which needs no root.

DIR defaults to a new directory under $XDG_RUNTIME_DIR, or /tmp. The demo
never replaces a file: it refuses a DIR that already holds backing.qcow2,
overlay.qcow2, or an mnt that is not an empty directory. Unmounting
removes everything the demo created (the sample files, mnt, fs and DIR
itself if the demo made them).`,
		Args: exactArgs(),
		RunE: func(cmd *cobra.Command, args []string) error {
			return runDemo(dir, foreground, stdout, cmd.ErrOrStderr())
		},
	}
	cmd.Flags().StringVar(&dir, "dir", "", "directory for the sample files and the mountpoint `DIR`/mnt")
	cmd.Flags().BoolVar(&foreground, "foreground", false, "serve in the foreground until unmounted or interrupted")
	return cmd
}

func runDemo(dir string, foreground bool, stdout, stderr io.Writer) error {
	// Everything the demo creates, removed in this order (files, then
	// the directories that held them) when the server exits, or at once
	// if the mount fails: nothing of the demo outlives its mount.
	var created []string
	cleanup := func() {
		for _, p := range created {
			os.Remove(p)
		}
	}
	var err error
	if dir == "" {
		base := os.Getenv("XDG_RUNTIME_DIR")
		if base == "" {
			base = os.TempDir()
		}
		if dir, err = os.MkdirTemp(base, "imgfuse-demo-"); err != nil {
			return fmt.Errorf("demo: %w", err)
		}
		created = append(created, dir)
	} else {
		if dir, err = filepath.Abs(dir); err != nil {
			return fmt.Errorf("demo: %w", err)
		}
		if _, err := os.Stat(dir); errors.Is(err, os.ErrNotExist) {
			if err := os.MkdirAll(dir, 0o755); err != nil {
				return fmt.Errorf("demo: %w", err)
			}
			created = append(created, dir)
		}
	}
	mnt := filepath.Join(dir, "mnt")
	// Never rewrite images under a live mount of a previous demo, nor a
	// user's files.
	if mp, err := mounts.CanonicalPath(mnt); err == nil {
		if _, mounted, _ := mounts.Find(mp); mounted {
			cleanup()
			return fmt.Errorf("demo: %s is already mounted; run '%s unmount %s' first", mnt, demoCommand(), imgtool.ShellQuote(mnt))
		}
	}
	if err := checkDemoDir(dir); err != nil {
		cleanup()
		return fmt.Errorf("demo: %w", err)
	}
	if _, err := os.Stat(mnt); errors.Is(err, os.ErrNotExist) {
		if err := os.Mkdir(mnt, 0o755); err != nil {
			cleanup()
			return fmt.Errorf("demo: %w", err)
		}
		created = append([]string{mnt}, created...)
	}
	// The printed commands mount the filesystem on DIR/fs (a loop mount,
	// or without root, where there is no loop device, fuse2fs), made
	// here and removed with the rest: the demo leaves nothing behind,
	// not even a directory elsewhere.
	rootless := os.Geteuid() != 0
	if _, err := os.Lstat(filepath.Join(dir, "fs")); errors.Is(err, os.ErrNotExist) {
		fs := filepath.Join(dir, "fs")
		if err := os.Mkdir(fs, 0o755); err != nil {
			cleanup()
			return fmt.Errorf("demo: %w", err)
		}
		created = append([]string{fs}, created...)
	}
	files, err := writeSample(dir)
	created = append(files, created...)
	if err != nil {
		cleanup()
		return fmt.Errorf("demo: %w", err)
	}

	o := &session.Options{
		Image:        filepath.Join(dir, "overlay.qcow2"),
		Mountpoint:   mnt,
		Format:       "auto",
		ReadOnly:     true,
		Foreground:   foreground,
		RemoveOnExit: created,
	}
	if err := o.Validate(); err != nil {
		cleanup()
		return err
	}
	if foreground {
		logger := log.New(stderr, "imgfuse: ", 0)
		return session.Serve(o, logger, func() {
			printDemoNext(stdout, dir, true, rootless)
		})
	}
	if err := session.Start(o); err != nil {
		cleanup()
		return err
	}
	printDemoNext(stdout, dir, false, rootless)
	return nil
}

// checkDemoDir refuses a directory where the demo would overwrite a file
// or mount over something: the sample files must not exist, and mnt must
// be missing or an empty directory.
func checkDemoDir(dir string) error {
	for _, name := range sampleFiles {
		p := filepath.Join(dir, name)
		if _, err := os.Lstat(p); err == nil {
			return fmt.Errorf("%s exists; refusing to overwrite it (choose another --dir, or remove it)", p)
		}
	}
	mnt := filepath.Join(dir, "mnt")
	fi, err := os.Lstat(mnt)
	switch {
	case errors.Is(err, os.ErrNotExist):
		return nil
	case err != nil:
		return err
	case !fi.IsDir():
		return fmt.Errorf("%s exists and is not a directory; refusing to mount over it", mnt)
	}
	ents, err := os.ReadDir(mnt)
	if err != nil {
		return err
	}
	if len(ents) > 0 {
		return fmt.Errorf("%s is not empty; refusing to mount over it", mnt)
	}
	return nil
}

// writeSample writes the embedded images into dir, never replacing a file,
// and returns the paths it wrote (last first, for removal).
func writeSample(dir string) ([]string, error) {
	var written []string
	for _, name := range sampleFiles {
		b, err := sampleFS.ReadFile("sample/" + name)
		if err != nil {
			return written, err
		}
		p := filepath.Join(dir, name)
		f, err := os.OpenFile(p, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o644)
		if err != nil {
			return written, err
		}
		written = append([]string{p}, written...)
		_, err = f.Write(b)
		if cerr := f.Close(); err == nil {
			err = cerr
		}
		if err != nil {
			return written, err
		}
	}
	return written, nil
}

// printDemoNext prints what to try on the demo's mount; rootless: with
// fuse2fs instead of a loop device, which needs root.
func printDemoNext(w io.Writer, dir string, foreground, rootless bool) {
	mnt := filepath.Join(dir, "mnt")
	self := demoCommand()
	overlay := imgtool.ShellQuote(filepath.Join(dir, "overlay.qcow2"))
	disk := imgtool.ShellQuote(filepath.Join(mnt, "disk"))
	fmt.Fprintf(w, `Mounted %s (qcow2: compressed and zero clusters, backing file backing.qcow2)
read-only on %s. The disk holds an ext4 filesystem. Next:

`, overlay, imgtool.ShellQuote(mnt))
	fsmnt := imgtool.ShellQuote(filepath.Join(dir, "fs"))
	umount := "umount " + fsmnt
	if rootless {
		umount = "fusermount3 -u " + fsmnt
		fmt.Fprintf(w, "  fuse2fs -o ro %s %s    # no root needed (package fuse2fs)\n", disk, fsmnt)
	} else {
		fmt.Fprintf(w, "  mount -o loop,ro %s %s    # as root\n", disk, fsmnt)
	}
	fmt.Fprintf(w, `  cat %s/README.txt %s/layer.txt
  %s info %s
  %s && %s unmount %s
`, fsmnt, fsmnt, self, overlay, umount, self, imgtool.ShellQuote(mnt))
	if foreground {
		fmt.Fprintf(w, "\nServing in the foreground: Ctrl-C (after %s) stops it.\n", umount)
	} else {
		fmt.Fprintf(w, "\nUnmounting removes the sample files (and %s, if the demo created it).\n", imgtool.ShellQuote(dir))
	}
}

// demoCommand is how the user can run imgfuse again, for the commands the
// demo prints: "imgfuse" when that is this binary on $PATH; under `go run`
// (whose binary is deleted when it exits) "go run ./cmd/imgfuse" from the
// module's directory; otherwise this binary's absolute path.
func demoCommand() string {
	exe, err := os.Executable()
	if err != nil {
		return "imgfuse"
	}
	wd, _ := os.Getwd()
	onPath, _ := exec.LookPath("imgfuse")
	return chooseDemoCommand(exe, wd, onPath, moduleRoot(wd))
}

// goRunBinary matches the binaries `go run` runs: a temporary one it
// deletes on exit, or (Go 1.24 and later) one kept in the build cache,
// which the cache may trim at any time.
var goRunBinary = regexp.MustCompile(`/go-build[0-9]+/b[0-9]+/exe/[^/]+$|/[0-9a-f]{2}/[0-9a-f]{64}-d/[^/]+$`)

// chooseDemoCommand is demoCommand's decision: exe is this binary, wd the
// working directory, onPath what $PATH finds as "imgfuse" ("" for
// nothing), root the imgfuse module directory around wd ("" if none).
func chooseDemoCommand(exe, wd, onPath, root string) string {
	if goRunBinary.MatchString(exe) {
		switch {
		case root == "":
			return "imgfuse"
		case root == wd:
			return "go run ./cmd/imgfuse"
		}
		return "go run -C " + imgtool.ShellQuote(root) + " ./cmd/imgfuse"
	}
	if onPath != "" && sameFile(onPath, exe) {
		return "imgfuse"
	}
	return imgtool.ShellQuote(exe)
}

func sameFile(a, b string) bool {
	fa, err := os.Stat(a)
	if err != nil {
		return false
	}
	fb, err := os.Stat(b)
	return err == nil && os.SameFile(fa, fb)
}

// moduleRoot returns the directory at or above dir whose go.mod declares
// module imgfuse, or "".
func moduleRoot(dir string) string {
	for d := dir; d != "" && d != "/" && d != "."; d = filepath.Dir(d) {
		b, err := os.ReadFile(filepath.Join(d, "go.mod"))
		if err != nil {
			continue
		}
		for _, line := range strings.Split(string(b), "\n") {
			if f := strings.Fields(line); len(f) == 2 && f[0] == "module" {
				if f[1] == "imgfuse" {
					return d
				}
				return ""
			}
		}
		return ""
	}
	return ""
}
