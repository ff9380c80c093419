package main

import (
	"fmt"
	"runtime"
	"runtime/debug"

	"github.com/spf13/cobra"

	"github.com/embervm/ember/config"
)

// version is set at build time with -ldflags "-X main.version=...".
var version = "dev"

type versionInfo struct {
	Version       string `json:"version"`
	Commit        string `json:"commit,omitempty"`
	GoVersion     string `json:"go_version"`
	Platform      string `json:"platform"`
	ConfigVersion int    `json:"config_version"`
}

func currentVersion() versionInfo {
	v := versionInfo{
		Version:       version,
		GoVersion:     runtime.Version(),
		Platform:      runtime.GOOS + "/" + runtime.GOARCH,
		ConfigVersion: config.Version,
	}
	if bi, ok := debug.ReadBuildInfo(); ok {
		for _, s := range bi.Settings {
			if s.Key == "vcs.revision" {
				v.Commit = s.Value
			}
		}
		if v.Version == "dev" && bi.Main.Version != "" && bi.Main.Version != "(devel)" {
			v.Version = bi.Main.Version
		}
	}
	return v
}

func (a *app) versionCommand() *cobra.Command {
	return &cobra.Command{
		Use:   "version",
		Short: "Print Ember's version",
		Args:  exactArgs(0),
		RunE: func(cmd *cobra.Command, _ []string) error {
			v := currentVersion()
			if a.jsonOutput() {
				return a.writeJSON(v)
			}
			fmt.Fprintf(a.stdout, "ember %s (%s, %s", v.Version, v.GoVersion, v.Platform)
			if v.Commit != "" {
				fmt.Fprintf(a.stdout, ", commit %s", v.Commit)
			}
			fmt.Fprintf(a.stdout, ")\nconfig schema version %d\n", v.ConfigVersion)
			return nil
		},
	}
}
