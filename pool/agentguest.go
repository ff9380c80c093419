package pool

import (
	"context"
	"errors"
	"fmt"
	"net"

	"github.com/embervm/ember/agent"
	"github.com/embervm/ember/vm"
)

// AgentGuest implements [Guest] with Ember's guest agent, reached through a
// provider's [vm.AgentDialer]. Each call opens its own connection, because
// a pool entry changes its VM id when it is handed out.
type AgentGuest struct {
	Dialer vm.AgentDialer
}

var _ Guest = AgentGuest{}

func (g AgentGuest) connect(ctx context.Context, id string) (*agent.Client, error) {
	if g.Dialer == nil {
		return nil, errors.New("agent guest: no dialer")
	}
	dial := func(ctx context.Context) (net.Conn, error) { return g.Dialer.DialAgent(ctx, id) }
	return agent.Dial(ctx, dial, nil)
}

// Health connects to the agent in VM id, retrying while the guest boots,
// and requests its health.
func (g AgentGuest) Health(ctx context.Context, id string) error {
	c, err := g.connect(ctx, id)
	if err != nil {
		return fmt.Errorf("agent of %s: %w", id, err)
	}
	defer c.Close()
	if _, err := c.Health(ctx); err != nil {
		return fmt.Errorf("agent of %s: %w", id, err)
	}
	return nil
}

// Personalize sets the guest clock first (a restored guest's clock is as
// old as its snapshot), then the network, hostname and environment.
func (g AgentGuest) Personalize(ctx context.Context, id string, p Personalization) error {
	c, err := g.connect(ctx, id)
	if err != nil {
		return fmt.Errorf("agent of %s: %w", id, err)
	}
	defer c.Close()
	if !p.Clock.IsZero() {
		if err := c.SyncClock(ctx, p.Clock); err != nil {
			return fmt.Errorf("sync clock of %s: %w", id, err)
		}
	}
	if len(p.Network.Interfaces) > 0 {
		if err := c.ConfigureNetwork(ctx, AgentNetworkConfig(p.Network)); err != nil {
			return fmt.Errorf("configure network of %s: %w", id, err)
		}
	}
	if p.Hostname != "" {
		if err := c.SetHostname(ctx, p.Hostname); err != nil {
			return fmt.Errorf("set hostname of %s: %w", id, err)
		}
	}
	if len(p.Env) > 0 {
		if err := c.SetEnv(ctx, p.Env); err != nil {
			return fmt.Errorf("set environment of %s: %w", id, err)
		}
	}
	return nil
}

// AgentNetworkConfig converts guest addressing into the agent's network
// configure request: each interface's address and a default route through
// its gateway.
func AgentNetworkConfig(n GuestNetwork) agent.NetworkConfig {
	var cfg agent.NetworkConfig
	for _, iface := range n.Interfaces {
		ic := agent.InterfaceConfig{MAC: iface.MAC}
		if iface.Address.IsValid() {
			ic.Addresses = []string{iface.Address.String()}
		}
		if iface.Gateway.IsValid() {
			ic.Routes = []agent.Route{{Destination: "default", Gateway: iface.Gateway.String()}}
		}
		cfg.Interfaces = append(cfg.Interfaces, ic)
	}
	if len(n.DNS) > 0 {
		cfg.DNS = &agent.DNSConfig{}
		for _, a := range n.DNS {
			cfg.DNS.Nameservers = append(cfg.DNS.Nameservers, a.String())
		}
	}
	return cfg
}
