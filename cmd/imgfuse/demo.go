package main

import (
	"embed"
	"fmt"
	"io"
	"log"
	"os"
	"path/filepath"

	"github.com/spf13/cobra"
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
the overlay read-only on DIR/mnt, and print what to try next.

DIR defaults to a new directory under $XDG_RUNTIME_DIR, or /tmp.`,
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
	var err error
	if dir == "" {
		base := os.Getenv("XDG_RUNTIME_DIR")
		if base == "" {
			base = os.TempDir()
		}
		if dir, err = os.MkdirTemp(base, "imgfuse-demo-"); err != nil {
			return fmt.Errorf("demo: %w", err)
		}
	} else if err := os.MkdirAll(dir, 0o755); err != nil {
		return fmt.Errorf("demo: %w", err)
	}
	mnt := filepath.Join(dir, "mnt")
	// Never rewrite images under a live mount of a previous demo.
	if mp, err := canonicalPath(mnt); err == nil {
		if _, mounted, _ := findMount(mp); mounted {
			return fmt.Errorf("demo: %s is already mounted; run 'imgfuse unmount %s' first", mnt, mnt)
		}
	}
	if err := writeSample(dir); err != nil {
		return fmt.Errorf("demo: %w", err)
	}
	if err := os.MkdirAll(mnt, 0o755); err != nil {
		return fmt.Errorf("demo: %w", err)
	}

	o := &mountOptions{
		image:      filepath.Join(dir, "overlay.qcow2"),
		mountpoint: mnt,
		format:     "auto",
		readOnly:   true,
		foreground: foreground,
	}
	if err := o.validate(); err != nil {
		return err
	}
	if foreground {
		logger := log.New(stderr, "imgfuse: ", 0)
		return serve(o, logger, func() {
			printDemoNext(stdout, dir, true)
		})
	}
	if err := startDaemon(o); err != nil {
		return err
	}
	printDemoNext(stdout, dir, false)
	return nil
}

// writeSample writes the embedded images into dir.
func writeSample(dir string) error {
	for _, name := range sampleFiles {
		b, err := sampleFS.ReadFile("sample/" + name)
		if err != nil {
			return err
		}
		if err := os.WriteFile(filepath.Join(dir, name), b, 0o644); err != nil {
			return err
		}
	}
	return nil
}

func printDemoNext(w io.Writer, dir string, foreground bool) {
	mnt := filepath.Join(dir, "mnt")
	fmt.Fprintf(w, `Mounted %s (qcow2: compressed and zero clusters, backing file backing.qcow2)
read-only on %s. The disk holds an ext4 filesystem. Next:

  mkdir -p /mnt/x && mount -o loop,ro %s /mnt/x    # as root
  cat /mnt/x/README.txt /mnt/x/layer.txt
  imgfuse info %s
  umount /mnt/x && imgfuse unmount %s
`, filepath.Join(dir, "overlay.qcow2"), mnt, filepath.Join(mnt, "disk"),
		filepath.Join(dir, "overlay.qcow2"), mnt)
	if foreground {
		fmt.Fprintf(w, "\nServing in the foreground: Ctrl-C (after umount /mnt/x) stops it.\n")
	}
}
