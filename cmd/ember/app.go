package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"strings"

	"github.com/spf13/cobra"
	"github.com/spf13/pflag"

	"github.com/embervm/ember/config"
)

// Output formats of --output.
const (
	outputText = "text"
	outputJSON = "json"
)

// Exit codes.
const (
	exitOK      = 0
	exitFailure = 1
	exitUsage   = 2
)

// app carries what every command shares: streams, the environment and the
// global flags. Commands get it explicitly instead of reading globals.
type app struct {
	stdout, stderr io.Writer
	environ        []string

	output     string
	configPath string

	loaded *config.Loaded
}

// usageError marks an error in how the command was invoked.
type usageError struct{ err error }

func (e usageError) Error() string { return e.err.Error() }
func (e usageError) Unwrap() error { return e.err }

// errSilent reports failure after the command already printed why.
var errSilent = errors.New("failed")

func run(ctx context.Context, args []string, stdout, stderr io.Writer, environ []string) int {
	a := &app{stdout: stdout, stderr: stderr, environ: environ}
	root := a.rootCommand()
	root.SetArgs(args)
	root.SetOut(stdout)
	root.SetErr(stderr)
	cmd, err := root.ExecuteContextC(ctx)
	switch {
	case err == nil:
		return exitOK
	case errors.Is(err, errSilent):
		return exitFailure
	case errors.As(err, new(exitStatus)):
		var st exitStatus
		errors.As(err, &st)
		if st.signal != "" {
			fmt.Fprintf(stderr, "ember: %v\n", err)
			return exitFailure
		}
		return st.code
	case errors.As(err, new(usageError)):
		path := "ember"
		if cmd != nil {
			path = cmd.CommandPath()
		}
		printError(stderr, err)
		fmt.Fprintf(stderr, "Run '%s --help' for usage.\n", path)
		return exitUsage
	default:
		printError(stderr, err)
		return exitFailure
	}
}

// printError writes err to w after the "ember: " prefix, with each error
// that errors.Join combined on lines of its own, so that a command that
// failed for several VMs or snapshots shows one prefixed line each.
func printError(w io.Writer, err error) {
	if joined, ok := err.(interface{ Unwrap() []error }); ok {
		for _, e := range joined.Unwrap() {
			printError(w, e)
		}
		return
	}
	fmt.Fprintf(w, "ember: %v\n", err)
}

func (a *app) rootCommand() *cobra.Command {
	root := &cobra.Command{
		Use:           "ember",
		Short:         "Provision, snapshot and restore microVMs",
		Long:          "Ember runs Firecracker and QEMU microvm virtual machines from workspace defaults with per-VM overrides.",
		SilenceUsage:  true,
		SilenceErrors: true,
		PersistentPreRunE: func(cmd *cobra.Command, _ []string) error {
			if a.output != outputText && a.output != outputJSON {
				return usageError{fmt.Errorf("--output %q is invalid, use %q or %q", a.output, outputText, outputJSON)}
			}
			return nil
		},
	}
	root.SetFlagErrorFunc(func(_ *cobra.Command, err error) error { return usageError{flagError(err)} })
	group(root)
	flags := root.PersistentFlags()
	flags.StringVarP(&a.output, "output", "o", outputText, `output format: "text" or "json"`)
	flags.StringVar(&a.configPath, "config", "", "configuration file (default: $EMBER_CONFIG, then "+config.DefaultPath+" if it exists)")

	root.AddCommand(
		a.versionCommand(),
		a.configCommand(),
		a.specCommand(),
		a.snapshotCommand(),
		newImageCommand(a),
		a.runCommand(),
		a.vmCommand(),
		a.poolCommand(),
	)
	return root
}

// config loads the workspace configuration once.
func (a *app) config() (*config.Loaded, error) {
	if a.loaded != nil {
		return a.loaded, nil
	}
	path := a.configPath
	if path == "" {
		path = a.getenv("EMBER_CONFIG")
	}
	if path == "" {
		if _, err := os.Stat(config.DefaultPath); err == nil {
			path = config.DefaultPath
		}
	}
	l, err := config.Load(path, a.environ)
	if err != nil {
		return nil, err
	}
	a.loaded = l
	return l, nil
}

func (a *app) getenv(name string) string {
	prefix := name + "="
	for i := len(a.environ) - 1; i >= 0; i-- {
		if len(a.environ[i]) >= len(prefix) && a.environ[i][:len(prefix)] == prefix {
			return a.environ[i][len(prefix):]
		}
	}
	return ""
}

func (a *app) jsonOutput() bool { return a.output == outputJSON }

// writeJSON prints v as indented JSON on stdout.
func (a *app) writeJSON(v any) error {
	enc := json.NewEncoder(a.stdout)
	enc.SetIndent("", "  ")
	return enc.Encode(v)
}

// exactArgs is cobra.ExactArgs with usage-error classification and a
// message that names the arguments from the command's Use line, such as
// "missing NEW-ID" for "restore VM/SNAPSHOT NEW-ID".
func exactArgs(n int) cobra.PositionalArgs {
	return func(cmd *cobra.Command, args []string) error {
		if len(args) == n {
			return nil
		}
		var names []string
		afterFlag := false
		for _, w := range strings.Fields(cmd.Use)[1:] {
			switch {
			case strings.HasPrefix(w, "-"):
				afterFlag = true
			case afterFlag:
				afterFlag = false // the flag's value
			case !strings.HasPrefix(w, "["):
				names = append(names, w)
			}
		}
		switch {
		case len(names) != n:
			return usageError{cobra.ExactArgs(n)(cmd, args)}
		case len(args) < n:
			return usageError{fmt.Errorf("missing %s", strings.Join(names[len(args):], " and "))}
		case n == 0:
			return usageError{fmt.Errorf("%s takes no arguments, got %q", cmd.Name(), args)}
		}
		return usageError{fmt.Errorf("%s takes %s, got %d arguments: %q", cmd.Name(), strings.Join(names, " "), len(args), args)}
	}
}

// flagError rewords an invalid flag value, such as a word for a number,
// to name the flag, the value and the form expected, without the parser's
// own message.
func flagError(err error) error {
	var ive *pflag.InvalidValueError
	if !errors.As(err, &ive) {
		return err
	}
	var want string
	switch typ := ive.GetFlag().Value.Type(); typ {
	case "int", "int8", "int16", "int32", "int64":
		want = "a whole number"
	case "uint", "uint8", "uint16", "uint32", "uint64":
		want = "a whole number of 0 or more"
	case "duration":
		want = "a duration such as 30s or 2m"
	case "bool":
		want = "true or false"
	default:
		return err
	}
	return fmt.Errorf("--%s %q is invalid, want %s", ive.GetFlag().Name, ive.GetValue(), want)
}

// addBackendFlag adds the --backend flag, which picks the backend in
// place of the configured one, to flags.
func addBackendFlag(flags *pflag.FlagSet, backend *string) {
	flags.StringVar(backend, "backend", "", `backend: "qemu" or "firecracker" (default: the configured backend)`)
}

// group makes a command that only holds subcommands print its help when
// called alone and report a usage error for an unknown subcommand.
func group(cmd *cobra.Command) *cobra.Command {
	cmd.Args = cobra.ArbitraryArgs
	cmd.RunE = func(cmd *cobra.Command, args []string) error {
		if len(args) > 0 {
			return usageError{fmt.Errorf("unknown command %q for %q", args[0], cmd.CommandPath())}
		}
		return cmd.Help()
	}
	return cmd
}

// progressf reports progress of a long command: on stdout in text mode, on
// stderr when stdout carries JSON.
func (a *app) progressf(format string, args ...any) {
	w := a.stdout
	if a.jsonOutput() {
		w = a.stderr
	}
	fmt.Fprintf(w, format, args...)
}
