package main

import (
	"fmt"
	"text/tabwriter"

	"github.com/spf13/cobra"

	"github.com/embervm/ember/config"
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
	Env    string        `json:"env"`
}

func (a *app) showConfig(l *config.Loaded) error {
	entries := make([]configEntry, 0, len(config.Keys()))
	for _, k := range config.Keys() {
		v, _ := l.Value(k)
		entries = append(entries, configEntry{Key: k, Value: v, Source: l.Sources[k], Env: config.EnvName(k)})
	}
	if a.jsonOutput() {
		return a.writeJSON(struct {
			File    string        `json:"file,omitempty"`
			Entries []configEntry `json:"entries"`
		}{l.Path, entries})
	}
	if l.Path != "" {
		fmt.Fprintf(a.stdout, "# file: %s\n", l.Path)
	} else {
		fmt.Fprintln(a.stdout, "# file: none (built-in defaults)")
	}
	tw := tabwriter.NewWriter(a.stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "KEY\tVALUE\tSOURCE")
	for _, e := range entries {
		fmt.Fprintf(tw, "%s\t%q\t%s\n", e.Key, e.Value, e.Source)
	}
	return tw.Flush()
}
