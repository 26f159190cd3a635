package main

import (
	"encoding/json"
	"fmt"
	"io"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"imgfuse/imgtool"
	"imgfuse/remote"
	"imgfuse/session"
)

// remoteFlags are the root's flags for remote images, which every command
// that opens an image honours.
type remoteFlags struct {
	cacheDir, cacheMax, s3Endpoint string
}

func (f *remoteFlags) add(cmd *cobra.Command) {
	pf := cmd.PersistentFlags()
	pf.StringVar(&f.cacheDir, "cache-dir", "", "cache of remote images (default $XDG_CACHE_HOME/imgfuse, else ~/.cache/imgfuse)")
	pf.StringVar(&f.cacheMax, "cache-max", "", "most the cache of remote images may hold, e.g. 10G (least recently used images are evicted; default: no bound)")
	pf.StringVar(&f.s3Endpoint, "s3-endpoint", "", "S3 endpoint for s3:// URLs, host[:port] or http(s)://host[:port] (default $AWS_ENDPOINT_URL_S3, $AWS_ENDPOINT_URL, else AWS)")
}

// config returns the flags as a remote.Config.
func (f *remoteFlags) config() (remote.Config, error) {
	cfg := remote.Config{Dir: f.cacheDir, S3Endpoint: f.s3Endpoint}
	if f.cacheMax != "" {
		n, err := imgtool.ParseSize(f.cacheMax)
		if err != nil {
			return cfg, imgtool.Usagef("--cache-max: %v", err)
		}
		cfg.Max = n
	}
	return cfg, nil
}

// install makes URLs openable in this process, before the command runs;
// a mount hands the configuration to its server through o.
func (f *remoteFlags) install(o *session.Options) error {
	cfg, err := f.config()
	if err != nil {
		return err
	}
	o.Remote = cfg
	remote.Install(remote.NewObjects(cfg))
	return nil
}

const cacheLong = `See and trim the cache of remote images (http://, https://, s3:// URLs).

The cache lives in $XDG_CACHE_HOME/imgfuse (default ~/.cache/imgfuse;
--cache-dir overrides), one entry per URL, holding the blocks (4 KiB) of
the object's current version (ETag, else Last-Modified) that were read.
A mount revalidates its entry with one request; an object changed on the
server replaces its entry whole.

  imgfuse cache ls [--output=json]   list entries, least recently used first
  imgfuse cache prune [--max SIZE]   remove entries not in use, least recently
                                     used first, until the cache holds at most
                                     SIZE (default 0: everything not in use)`

func newCacheCmd(stdout io.Writer, rf *remoteFlags) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "cache ls|prune",
		Short: "List or trim the cache of remote images",
		Long:  cacheLong,
		Args:  exactArgs("ls|prune"),
		RunE: func(cmd *cobra.Command, args []string) error {
			return imgtool.Usagef("unknown cache command %q (want ls or prune)", args[0])
		},
	}
	var output string
	ls := &cobra.Command{
		Use:   "ls [--output=human|json]",
		Short: "List the cache's entries",
		Args:  exactArgs(),
		RunE: func(cmd *cobra.Command, args []string) error {
			asJSON, err := imgtool.OutputFlag(output, false)
			if err != nil {
				return err
			}
			cfg, err := rf.config()
			if err != nil {
				return err
			}
			ents, err := remote.List(cacheDir(cfg))
			if err != nil {
				return err
			}
			return printCache(stdout, ents, asJSON)
		},
	}
	ls.Flags().StringVar(&output, "output", "human", "output format: human|json")
	var maxSize string
	prune := &cobra.Command{
		Use:   "prune [--max SIZE]",
		Short: "Remove entries not in use, least recently used first",
		Args:  exactArgs(),
		RunE: func(cmd *cobra.Command, args []string) error {
			cfg, err := rf.config()
			if err != nil {
				return err
			}
			var limit int64
			if maxSize != "" {
				if limit, err = imgtool.ParseSize(maxSize); err != nil {
					return imgtool.Usagef("--max: %v", err)
				}
			}
			removed, err := remote.Prune(cacheDir(cfg), limit)
			for _, e := range removed {
				fmt.Fprintf(stdout, "removed %s (%d bytes)\n", e.URL, e.Cached)
			}
			return err
		},
	}
	prune.Flags().StringVar(&maxSize, "max", "", "keep at most `SIZE` bytes (e.g. 2G); default 0")
	cmd.AddCommand(ls, prune)
	return cmd
}

func cacheDir(cfg remote.Config) string {
	if cfg.Dir != "" {
		return cfg.Dir
	}
	return remote.DefaultDir()
}

func printCache(w io.Writer, ents []remote.Entry, asJSON bool) error {
	if asJSON {
		if ents == nil {
			ents = []remote.Entry{}
		}
		b, err := json.MarshalIndent(ents, "", "  ")
		if err != nil {
			return err
		}
		_, err = fmt.Fprintf(w, "%s\n", b)
		return err
	}
	tw := tabwriter.NewWriter(w, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "URL\tSIZE\tCACHED\tLAST-USED\tIN-USE")
	for _, e := range ents {
		fmt.Fprintf(tw, "%s\t%d\t%d\t%s\t%v\n", e.URL, e.Size, e.Cached, e.LastUsed.Format(time.RFC3339), e.InUse)
	}
	return tw.Flush()
}
