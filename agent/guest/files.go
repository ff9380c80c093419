package guest

import (
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"math/rand/v2"
	"os"
	"path"
	"slices"
	"strings"

	"github.com/embervm/ember/agent"
)

// rootRel turns a validated absolute guest path into a path relative to the
// server's root.
func rootRel(p string) string {
	rel := strings.TrimPrefix(path.Clean(p), "/")
	if rel == "" {
		return "."
	}
	return rel
}

func checkPath(op, p string) (string, error) {
	if err := agent.ValidateGuestPath(p); err != nil {
		return "", agent.Errorf(agent.CodeInvalidArgument, "%s: %v", op, err)
	}
	rel := rootRel(p)
	if rel == "." {
		return "", agent.Errorf(agent.CodeInvalidArgument, "%s: path %q is the root directory", op, p)
	}
	return rel, nil
}

// fileError maps a file system error to a reply code.
func fileError(op, p string, err error) error {
	if errors.Is(err, fs.ErrNotExist) {
		return agent.Errorf(agent.CodeNotFound, "%s %s: %v", op, p, err)
	}
	return fmt.Errorf("%s %s: %w", op, p, err)
}

// writeAtomic writes the content of r to rel through a temporary file in the
// same directory, syncs it and renames it into place, so that readers see
// either the old or the new file. The temporary file is removed on failure.
func (s *Server) writeAtomic(rel string, mode fs.FileMode, r io.Reader) (int64, error) {
	dir := path.Dir(rel)
	tmp := path.Join(dir, ".ember-tmp-"+randomSuffix())
	f, err := s.root.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return 0, err
	}
	n, err := io.Copy(f, r)
	if err == nil {
		// Chmod after creation, because the umask would trim the mode of
		// OpenFile.
		err = f.Chmod(mode.Perm())
	}
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = s.root.Rename(tmp, rel)
	}
	if err != nil {
		s.root.Remove(tmp)
		return 0, err
	}
	if d, err := s.root.Open(dir); err == nil {
		// Best effort: make the rename durable.
		d.Sync()
		d.Close()
	}
	return n, nil
}

func randomSuffix() string {
	var b [8]byte
	for i := range b {
		b[i] = byte(rand.Uint32())
	}
	return hex.EncodeToString(b[:])
}

func (s *Server) filePut(r *request, args json.RawMessage) (any, error) {
	var req agent.FilePutRequest
	if err := decodeArgs(args, &req); err != nil {
		return nil, err
	}
	rel, err := checkPath("put file", req.Path)
	if err != nil {
		return nil, err
	}
	if req.Mode&^fs.ModePerm != 0 {
		return nil, agent.Errorf(agent.CodeInvalidArgument, "put file %s: mode %v has bits other than permissions", req.Path, req.Mode)
	}
	mode := req.Mode
	if mode == 0 {
		mode = 0o644
	}
	if req.MakeParents {
		if err := s.root.MkdirAll(path.Dir(rel), 0o755); err != nil {
			return nil, fileError("put file", req.Path, err)
		}
	}
	if fi, err := s.root.Stat(rel); err == nil && fi.IsDir() {
		return nil, agent.Errorf(agent.CodeInvalidArgument, "put file %s: is a directory", req.Path)
	}
	n, err := s.writeAtomic(rel, mode, r.stdin)
	if err != nil {
		return nil, fileError("put file", req.Path, err)
	}
	return agent.FilePutResult{Size: n}, nil
}

func (s *Server) fileGet(r *request, args json.RawMessage) (any, error) {
	var req agent.FileGetRequest
	if err := decodeArgs(args, &req); err != nil {
		return nil, err
	}
	rel, err := checkPath("get file", req.Path)
	if err != nil {
		return nil, err
	}
	f, err := s.root.Open(rel)
	if err != nil {
		return nil, fileError("get file", req.Path, err)
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return nil, fileError("get file", req.Path, err)
	}
	if !fi.Mode().IsRegular() {
		return nil, agent.Errorf(agent.CodeInvalidArgument, "get file %s: not a regular file (%v)", req.Path, fi.Mode().Type())
	}
	n, err := io.Copy(r.stdout, f)
	if err != nil {
		return nil, fileError("get file", req.Path, err)
	}
	return agent.FileInfo{Size: n, Mode: fi.Mode().Perm(), ModTime: fi.ModTime()}, nil
}

func (s *Server) setEnv(_ *request, args json.RawMessage) (any, error) {
	var req agent.SetEnvRequest
	if err := decodeArgs(args, &req); err != nil {
		return nil, err
	}
	for k, v := range req.Env {
		if err := agent.ValidateEnvKey(k); err != nil {
			return nil, agent.Errorf(agent.CodeInvalidArgument, "set env: %v", err)
		}
		if strings.IndexByte(v, 0) >= 0 {
			return nil, agent.Errorf(agent.CodeInvalidArgument, "set env: value of %s contains a NUL byte", k)
		}
	}
	for _, k := range req.Unset {
		if err := agent.ValidateEnvKey(k); err != nil {
			return nil, agent.Errorf(agent.CodeInvalidArgument, "set env: unset: %v", err)
		}
	}

	s.mu.Lock()
	defer s.mu.Unlock()
	next := make(map[string]string, len(s.env)+len(req.Env))
	for k, v := range s.env {
		next[k] = v
	}
	for k, v := range req.Env {
		next[k] = v
	}
	for _, k := range req.Unset {
		delete(next, k)
	}
	keys := make([]string, 0, len(next))
	for k := range next {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	var b strings.Builder
	for _, k := range keys {
		b.WriteString(k + "=" + next[k] + "\x00")
	}
	rel := rootRel(s.cfg.EnvFile)
	if err := s.root.MkdirAll(path.Dir(rel), 0o755); err != nil {
		return nil, fmt.Errorf("set env: %w", err)
	}
	// The file can hold credentials, so only root may read it.
	if _, err := s.writeAtomic(rel, 0o600, strings.NewReader(b.String())); err != nil {
		return nil, fmt.Errorf("set env: write %s: %w", s.cfg.EnvFile, err)
	}
	s.env = next
	return nil, nil
}

func (s *Server) setSecrets(_ *request, args json.RawMessage) (any, error) {
	var req agent.SetSecretsRequest
	if err := decodeArgs(args, &req); err != nil {
		return nil, err
	}
	names := make([]string, 0, len(req.Secrets))
	for name := range req.Secrets {
		if err := agent.ValidateSecretName(name); err != nil {
			return nil, agent.Errorf(agent.CodeInvalidArgument, "set secrets: %v", err)
		}
		names = append(names, name)
	}
	slices.Sort(names)

	dir := rootRel(s.cfg.SecretsDir)
	if err := s.root.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("set secrets: create %s: %w", s.cfg.SecretsDir, err)
	}
	// MkdirAll keeps the mode of a directory that exists, and the umask
	// trims a new one.
	if err := s.root.Chmod(dir, 0o700); err != nil {
		return nil, fmt.Errorf("set secrets: chmod %s: %w", s.cfg.SecretsDir, err)
	}
	for _, name := range names {
		// The error names the secret but never carries its value.
		if _, err := s.writeAtomic(path.Join(dir, name), 0o600, strings.NewReader(string(req.Secrets[name]))); err != nil {
			return nil, fmt.Errorf("set secrets: write %s: %w", name, err)
		}
	}
	return nil, nil
}

// writeEtcFile replaces a small file under /etc, such as /etc/hostname.
func (s *Server) writeEtcFile(p, content string) error {
	rel := rootRel(p)
	if err := s.root.MkdirAll(path.Dir(rel), 0o755); err != nil {
		return err
	}
	_, err := s.writeAtomic(rel, 0o644, strings.NewReader(content))
	return err
}
