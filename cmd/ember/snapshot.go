package main

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/spf13/cobra"

	"github.com/embervm/ember/provider/firecracker"
	"github.com/embervm/ember/provider/firecracker/memfile"
	"github.com/embervm/ember/snapshot"
	"github.com/embervm/ember/vm"
)

func (a *app) snapshotCommand() *cobra.Command {
	cmd := group(&cobra.Command{
		Use:   "snapshot",
		Short: "List, check, flatten and remove stored snapshots",
	})
	var full bool
	verify := &cobra.Command{
		Use:   "verify VM/SNAPSHOT",
		Short: "Check that a snapshot's files exist with their recorded sizes (and digests with --full)",
		Args:  exactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return a.withSnapshotRef(args[0], func(s *snapshot.Store, vmID, id string) error {
				if err := s.Verify(cmd.Context(), vmID, id, full); err != nil {
					return err
				}
				if a.jsonOutput() {
					return a.writeJSON(map[string]any{"snapshot": args[0], "valid": true, "full": full || s.Recovered()})
				}
				fmt.Fprintf(a.stdout, "%s: valid\n", args[0])
				return nil
			})
		},
	}
	verify.Flags().BoolVar(&full, "full", false, "also compare SHA-256 digests (reads every byte)")

	cmd.AddCommand(&cobra.Command{
		Use:   "ls [VM]",
		Short: "List snapshots, of one VM or of all",
		Args: func(cmd *cobra.Command, args []string) error {
			if len(args) > 1 {
				return usageError{fmt.Errorf("ls takes at most one VM id, got %d arguments", len(args))}
			}
			return nil
		},
		RunE: func(cmd *cobra.Command, args []string) error {
			return a.withStore(func(s *snapshot.Store) error {
				vmID := ""
				if len(args) == 1 {
					vmID = args[0]
				}
				list, err := s.List(vmID)
				if err != nil {
					return err
				}
				if a.jsonOutput() {
					return a.writeJSON(list)
				}
				return printSnapshots(a, list)
			})
		},
	}, &cobra.Command{
		Use:   "inspect VM/SNAPSHOT",
		Short: "Print a snapshot's manifest",
		Args:  exactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			return a.withSnapshotRef(args[0], func(s *snapshot.Store, vmID, id string) error {
				m, err := s.Get(vmID, id)
				if err != nil {
					return err
				}
				return a.writeJSON(m)
			})
		},
	}, verify, &cobra.Command{
		Use:   "rm VM/SNAPSHOT...",
		Short: "Delete snapshots and their files (rejected while a diff snapshot depends on one)",
		Long: `Delete snapshots: the store's manifest, the files it lists and the
backend's own copy. The snapshots go in the order given, so name a diff
before its parent. A snapshot that another depends on is rejected, and
the ones after it are still deleted.`,
		Args: func(cmd *cobra.Command, args []string) error {
			if len(args) == 0 {
				return usageError{errors.New("missing snapshot: pass one or more as VM/SNAPSHOT")}
			}
			return nil
		},
		RunE: func(cmd *cobra.Command, args []string) error {
			l, err := a.config()
			if err != nil {
				return err
			}
			// One open store, and one provider per backend, serve all
			// the snapshots named.
			backends := &backendDeleters{cfg: l.Config, log: a.logger()}
			var errs []error
			deleted := []string{}
			err = a.withStore(func(s *snapshot.Store) error {
				for _, ref := range args {
					if err := a.deleteSnapshot(cmd.Context(), s, backends, ref); err != nil {
						errs = append(errs, err)
						continue
					}
					deleted = append(deleted, ref)
					if !a.jsonOutput() {
						fmt.Fprintf(a.stdout, "deleted %s\n", ref)
					}
				}
				return nil
			})
			errs = append(errs, err, backends.Close())
			if a.jsonOutput() {
				errs = append(errs, a.writeJSON(map[string]any{"deleted": deleted}))
			}
			return errors.Join(errs...)
		},
	}, &cobra.Command{
		Use:   "flatten VM/SNAPSHOT NEW-ID",
		Short: "Merge a diff snapshot and its ancestors into a new full snapshot",
		Args:  exactArgs(2),
		RunE: func(cmd *cobra.Command, args []string) error {
			return a.withSnapshotRef(args[0], func(s *snapshot.Store, vmID, id string) error {
				m, err := s.Get(vmID, id)
				if err != nil {
					return err
				}
				dir := filepath.Join(s.Root(), vmID, "files")
				flat, err := s.Flatten(cmd.Context(), vmID, id, args[1], dir, memoryMerger(m.Backend))
				if err != nil {
					return err
				}
				if a.jsonOutput() {
					return a.writeJSON(flat)
				}
				fmt.Fprintf(a.stdout, "flattened %s into %s/%s\n", args[0], vmID, flat.ID)
				return nil
			})
		},
	})
	return cmd
}

// deleteSnapshot deletes snapshot ref ("vm/snapshot") from the store s
// and then the backend's copy of it.
func (a *app) deleteSnapshot(ctx context.Context, s *snapshot.Store, backends *backendDeleters, ref string) error {
	vmID, id, err := parseSnapshotRef(ref)
	if err != nil {
		return err
	}
	m, err := s.Get(vmID, id)
	if err != nil {
		return err
	}
	if err := s.Delete(vmID, id); err != nil {
		return err
	}
	if err := backends.delete(ctx, m.Backend, vmID, id); err != nil {
		return fmt.Errorf("deleted the manifest of %s/%s, but not the %s backend's copy: %w", vmID, id, m.Backend, err)
	}
	return nil
}

// withStore opens the snapshot store under the configured state directory
// for the duration of fn.
func (a *app) withStore(fn func(*snapshot.Store) error) error {
	l, err := a.config()
	if err != nil {
		return err
	}
	s, err := snapshot.Open(filepath.Join(l.Config.StateDir, "snapshots"))
	if err != nil {
		return err
	}
	defer s.Close()
	return fn(s)
}

// withSnapshotRef parses ref ("vm/snapshot") and runs fn with the opened
// store and the reference's parts.
func (a *app) withSnapshotRef(ref string, fn func(s *snapshot.Store, vmID, id string) error) error {
	vmID, id, err := parseSnapshotRef(ref)
	if err != nil {
		return err
	}
	return a.withStore(func(s *snapshot.Store) error { return fn(s, vmID, id) })
}

// parseSnapshotRef splits "vm/snapshot".
func parseSnapshotRef(ref string) (vmID, id string, err error) {
	vmID, id, ok := strings.Cut(ref, "/")
	if !ok {
		return "", "", usageError{fmt.Errorf("snapshot reference %q is invalid, use VM/SNAPSHOT", ref)}
	}
	if err := vm.ValidateID(vmID); err != nil {
		return "", "", usageError{fmt.Errorf("snapshot reference %q: %w", ref, err)}
	}
	if err := vm.ValidateSnapshotID(id); err != nil {
		return "", "", usageError{fmt.Errorf("snapshot reference %q: %w", ref, err)}
	}
	return vmID, id, nil
}

// memoryMerger returns the diff-memory merger of a backend, or nil when the
// backend has none, which makes flattening a chain fail as unsupported.
func memoryMerger(backend string) snapshot.MemoryMerger {
	switch backend {
	case firecracker.BackendName:
		return memfile.Merger{}
	}
	return nil
}

func printSnapshots(a *app, list []snapshot.Manifest) error {
	tw := tabwriter.NewWriter(a.stdout, 0, 4, 2, ' ', 0)
	fmt.Fprintln(tw, "VM\tSNAPSHOT\tTYPE\tPARENT\tBACKEND\tVERSION\tSHAPE\tSIZE\tCREATED")
	for _, m := range list {
		var size int64
		for _, f := range m.Files {
			size += f.Size
		}
		parent := m.Parent
		if parent == "" {
			parent = "-"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%s\t%dc/%dMiB\t%s\t%s\n", m.VMID, m.ID, m.Type, parent, m.Backend,
			m.VMMVersion, m.VCPUCount, m.MemSizeMiB, humanBytes(size), m.CreatedAt.Local().Format(time.DateTime))
	}
	return tw.Flush()
}

func humanBytes(n int64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%d B", n)
	}
	div, exp := int64(unit), 0
	for m := n / unit; m >= unit; m /= unit {
		div *= unit
		exp++
	}
	return fmt.Sprintf("%.1f %ciB", float64(n)/float64(div), "KMGTPE"[exp])
}
