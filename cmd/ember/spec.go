package main

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"

	"github.com/spf13/cobra"

	"github.com/embervm/ember/vm"
)

func (a *app) specCommand() *cobra.Command {
	cmd := group(&cobra.Command{
		Use:   "spec",
		Short: "Work with VM spec files (JSON or YAML)",
	})
	cmd.AddCommand(&cobra.Command{
		Use:   "validate FILE",
		Short: "Check a VM spec and list every problem with its field path",
		Args:  exactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			_, err := loadSpec(args[0])
			return a.reportSpec(args[0], err)
		},
	})
	return cmd
}

// loadSpec reads a spec file, resolves its relative paths against the
// file's directory and validates it.
func loadSpec(path string) (vm.Spec, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return vm.Spec{}, fmt.Errorf("read spec: %w", err)
	}
	dir, err := filepath.Abs(filepath.Dir(path))
	if err != nil {
		return vm.Spec{}, fmt.Errorf("read spec: %w", err)
	}
	return vm.DecodeSpecIn(data, dir)
}

type specReport struct {
	File     string          `json:"file"`
	Valid    bool            `json:"valid"`
	Error    string          `json:"error,omitempty"`
	Problems []vm.FieldError `json:"problems,omitempty"`
}

// reportSpec prints the outcome of a spec check: every field problem on a
// line of its own on stderr (or in the JSON report).
func (a *app) reportSpec(path string, err error) error {
	var ve *vm.ValidationError
	isValidation := errors.As(err, &ve)
	if a.jsonOutput() {
		r := specReport{File: path, Valid: err == nil}
		if isValidation {
			r.Problems = ve.Problems
		} else if err != nil {
			r.Error = err.Error()
		}
		if werr := a.writeJSON(r); werr != nil {
			return werr
		}
		if err != nil {
			return errSilent
		}
		return nil
	}
	if isValidation {
		noun := "problems"
		if len(ve.Problems) == 1 {
			noun = "problem"
		}
		fmt.Fprintf(a.stderr, "%s: %d %s\n", path, len(ve.Problems), noun)
		for _, p := range ve.Problems {
			fmt.Fprintf(a.stderr, "  %s\n", p)
		}
		return errSilent
	}
	if err != nil {
		return err
	}
	fmt.Fprintf(a.stdout, "%s: valid\n", path)
	return nil
}
