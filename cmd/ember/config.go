package main

import (
	"errors"
	"fmt"
	"io/fs"
	"strconv"
	"text/tabwriter"

	"github.com/spf13/cobra"

	"github.com/embervm/ember/config"
	"github.com/embervm/ember/image"
)

func (a *app) configCommand() *cobra.Command {
	cmd := group(&cobra.Command{
		Use:   "config",
		Short: "Show or check the workspace configuration",
	})
	cmd.AddCommand(&cobra.Command{
		Use:   "show",
		Short: "Print the effective configuration and where each value came from",
		Args:  exactArgs(0),
		RunE: func(cmd *cobra.Command, _ []string) error {
			l, err := a.config()
			if err != nil {
				return err
			}
			return a.showConfig(l)
		},
	}, &cobra.Command{
		Use:   "validate FILE",
		Short: "Check a configuration file without environment overrides",
		Args:  exactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			err := config.Validate(args[0])
			if a.jsonOutput() {
				out := struct {
					Valid bool   `json:"valid"`
					Error string `json:"error,omitempty"`
				}{Valid: err == nil}
				if err != nil {
					out.Error = err.Error()
				}
				if werr := a.writeJSON(out); werr != nil {
					return werr
				}
				if err != nil {
					return errSilent
				}
				return nil
			}
			if err != nil {
				return err
			}
			fmt.Fprintf(a.stdout, "%s: valid (config version %d)\n", args[0], config.Version)
			return nil
		},
	})
	return cmd
}

type configEntry struct {
	Key    string        `json:"key"`
	Value  string        `json:"value"`
	Source config.Source `json:"source"`
	// Env is the variable that overrides the key; empty for keys without
	// an environment override.
	Env string `json:"env,omitempty"`
}

func (a *app) showConfig(l *config.Loaded) error {
	entries := make([]configEntry, 0, len(config.Keys()))
	for _, k := range config.Keys() {
		v, _ := l.Value(k)
		env, _ := config.EnvOverride(k)
		entries = append(entries, configEntry{Key: k, Value: v, Source: l.Sources[k], Env: env})
	}
	bundle, bundleErr := applyBundleDefaults(l.Config, entries)
	if a.jsonOutput() {
		return a.writeJSON(struct {
			File    string        `json:"file,omitempty"`
			Bundle  string        `json:"bundle,omitempty"`
			Entries []configEntry `json:"entries"`
		}{l.Path, bundle, entries})
	}
	if l.Path != "" {
		fmt.Fprintf(a.stdout, "# file: %s\n", l.Path)
	} else {
		fmt.Fprintln(a.stdout, "# file: none (built-in defaults)")
	}
	switch {
	case bundle != "":
		fmt.Fprintf(a.stdout, "# bundle: %s (fills the unset VM defaults)\n", bundle)
	case errors.Is(bundleErr, fs.ErrNotExist):
		fmt.Fprintf(a.stdout, "# bundle: none in %s, so VMs need defaults.kernel or 'ember image build'\n", defaultBundleDir(l.Config))
	case bundleErr != nil:
		fmt.Fprintf(a.stdout, "# bundle: unusable: %v\n", bundleErr)
	}
	tw := tabwriter.NewWriter(a.stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "KEY\tVALUE\tSOURCE")
	for _, e := range entries {
		fmt.Fprintf(tw, "%s\t%q\t%s\n", e.Key, e.Value, e.Source)
	}
	return tw.Flush()
}

// applyBundleDefaults shows in entries the VM defaults that the default
// guest bundle fills in, as ember vm create and ember run do when the
// configuration sets no kernel. It returns the bundle's directory, or
// the reason no bundle applies when there is no kernel either.
func applyBundleDefaults(cfg *config.Config, entries []configEntry) (string, error) {
	if cfg.VMDefaults().Kernel != "" {
		return "", nil
	}
	dir := defaultBundleDir(cfg)
	m, err := image.ReadManifest(dir)
	if err != nil {
		return "", err
	}
	d := bundleDefaults(cfg, dir, m)
	values := map[string]string{
		"defaults.kernel":           d.Kernel,
		"defaults.initrd":           d.Initrd,
		"defaults.rootfs":           d.Rootfs,
		"defaults.rootfs_read_only": strconv.FormatBool(d.RootfsReadOnly),
		"defaults.boot_args":        d.BootArgs,
	}
	for i, e := range entries {
		if v, ok := values[e.Key]; ok && v != e.Value {
			entries[i].Value = v
			entries[i].Source = config.Source{Kind: "bundle"}
		}
	}
	return dir, nil
}
