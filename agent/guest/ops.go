package guest

import (
	"encoding/json"
	"fmt"
	"os"
	"strconv"
	"strings"
	"time"

	"github.com/embervm/ember/agent"
)

// operation is one entry of the operation table: its handler and the
// streams it uses.
type operation struct {
	handle func(s *Server, r *request, args json.RawMessage) (any, error)
	stdin  bool
	stdout bool
	stderr bool
}

var operations = map[string]operation{
	agent.OpHealth:      {handle: (*Server).health},
	agent.OpExec:        {handle: (*Server).exec, stdin: true, stdout: true, stderr: true},
	agent.OpFilePut:     {handle: (*Server).filePut, stdin: true},
	agent.OpFileGet:     {handle: (*Server).fileGet, stdout: true},
	agent.OpSetEnv:      {handle: (*Server).setEnv},
	agent.OpSetSecrets:  {handle: (*Server).setSecrets},
	agent.OpNetwork:     {handle: (*Server).configureNetwork},
	agent.OpClockSync:   {handle: (*Server).syncClock},
	agent.OpSetHostname: {handle: (*Server).setHostname},
	agent.OpShutdown:    {handle: (*Server).shutdown},
}

func (s *Server) health(_ *request, args json.RawMessage) (any, error) {
	if err := decodeArgs(args, &struct{}{}); err != nil {
		return nil, err
	}
	res := agent.HealthResult{
		AgentVersion:    s.cfg.Version,
		ProtocolVersion: agent.ProtocolVersion,
		Uptime:          systemUptime(),
	}
	if res.Uptime == 0 {
		res.Uptime = time.Since(s.start)
	}
	if b, err := os.ReadFile("/proc/sys/kernel/random/boot_id"); err == nil {
		res.BootID = strings.TrimSpace(string(b))
	}
	res.Hostname, _ = os.Hostname()
	return res, nil
}

// systemUptime reads the kernel's uptime from /proc/uptime; it returns 0
// when /proc is not mounted.
func systemUptime() time.Duration {
	b, err := os.ReadFile("/proc/uptime")
	if err != nil {
		return 0
	}
	first, _, _ := strings.Cut(string(b), " ")
	secs, err := strconv.ParseFloat(first, 64)
	if err != nil {
		return 0
	}
	return time.Duration(secs * float64(time.Second))
}

func (s *Server) system(op string) (System, error) {
	if s.cfg.System == nil {
		return nil, agent.Errorf(agent.CodeUnsupported, "%s: this agent runs without system access", op)
	}
	return s.cfg.System, nil
}

func (s *Server) setHostname(_ *request, args json.RawMessage) (any, error) {
	var req agent.SetHostnameRequest
	if err := decodeArgs(args, &req); err != nil {
		return nil, err
	}
	if err := agent.ValidateHostname(req.Hostname); err != nil {
		return nil, agent.Errorf(agent.CodeInvalidArgument, "set hostname: %v", err)
	}
	sys, err := s.system("set hostname")
	if err != nil {
		return nil, err
	}
	if err := sys.SetHostname(req.Hostname); err != nil {
		return nil, fmt.Errorf("set hostname %s: %w", req.Hostname, err)
	}
	if err := s.writeEtcFile("/etc/hostname", req.Hostname+"\n"); err != nil {
		return nil, fmt.Errorf("set hostname %s: write /etc/hostname: %w", req.Hostname, err)
	}
	return nil, nil
}

func (s *Server) syncClock(_ *request, args json.RawMessage) (any, error) {
	var req agent.ClockSyncRequest
	if err := decodeArgs(args, &req); err != nil {
		return nil, err
	}
	if req.UnixNano <= 0 {
		return nil, agent.Errorf(agent.CodeInvalidArgument, "sync clock: time %d is not after 1970", req.UnixNano)
	}
	sys, err := s.system("sync clock")
	if err != nil {
		return nil, err
	}
	t := time.Unix(0, req.UnixNano)
	if err := sys.SetClock(t); err != nil {
		return nil, fmt.Errorf("sync clock to %s: %w", t.UTC().Format(time.RFC3339Nano), err)
	}
	s.logger.Info("guest clock set", "time", t.UTC().Format(time.RFC3339Nano))
	return nil, nil
}

func (s *Server) configureNetwork(r *request, args json.RawMessage) (any, error) {
	var cfg agent.NetworkConfig
	if err := decodeArgs(args, &cfg); err != nil {
		return nil, err
	}
	if err := cfg.Validate(); err != nil {
		return nil, agent.Errorf(agent.CodeInvalidArgument, "configure network: %v", err)
	}
	if len(cfg.Interfaces) > 0 {
		sys, err := s.system("configure network")
		if err != nil {
			return nil, err
		}
		if err := sys.ConfigureNetwork(r.ctx, cfg.Interfaces); err != nil {
			return nil, fmt.Errorf("configure network: %w", err)
		}
	}
	if cfg.DNS != nil {
		if err := s.writeEtcFile("/etc/resolv.conf", resolvConf(*cfg.DNS)); err != nil {
			return nil, fmt.Errorf("configure network: write /etc/resolv.conf: %w", err)
		}
	}
	return nil, nil
}

func resolvConf(dns agent.DNSConfig) string {
	var b strings.Builder
	b.WriteString("# Written by ember-agent.\n")
	for _, ns := range dns.Nameservers {
		b.WriteString("nameserver " + ns + "\n")
	}
	if len(dns.Search) > 0 {
		b.WriteString("search " + strings.Join(dns.Search, " ") + "\n")
	}
	return b.String()
}

func (s *Server) shutdown(r *request, args json.RawMessage) (any, error) {
	var req agent.ShutdownRequest
	if err := decodeArgs(args, &req); err != nil {
		return nil, err
	}
	if req.Action != agent.ActionPowerOff && req.Action != agent.ActionReboot {
		return nil, agent.Errorf(agent.CodeInvalidArgument, "shutdown: action %q is not %q or %q", req.Action, agent.ActionPowerOff, agent.ActionReboot)
	}
	sys, err := s.system("shutdown")
	if err != nil {
		return nil, err
	}
	// Reply first: after reboot(2) nothing more reaches the host.
	r.afterReply = func() {
		s.logger.Info("shutting down on host request", "action", req.Action)
		if err := sys.Shutdown(req.Action); err != nil {
			s.logger.Error("shutdown failed", "action", req.Action, "err", err)
		}
	}
	return nil, nil
}
