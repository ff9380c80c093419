package pool

import (
	"context"
	"errors"
	"fmt"
	"net"
	"sync"
	"time"

	"github.com/embervm/ember/agent"
	"github.com/embervm/ember/vm"
)

// AgentGuest implements [Guest] with Ember's guest agent, reached through a
// provider's [vm.AgentDialer]. Each call opens its own connection, because
// a pool entry changes its VM id when it is handed out.
type AgentGuest struct {
	Dialer vm.AgentDialer
	// Options configures each connection; nil means DefaultAgentOptions.
	Options *agent.Options
}

var (
	_ CheckingGuest = AgentGuest{}
	_ Warmer        = AgentGuest{}
)

// DefaultAgentOptions retries sooner than the agent client's defaults (50
// ms between dials, 500 ms before a hello is sent again), because every
// acquire waits on these connections. The backoff still doubles, so a
// booting guest is not flooded with hellos.
var DefaultAgentOptions = agent.Options{
	RetryInterval: 10 * time.Millisecond,
	HelloInterval: 100 * time.Millisecond,
}

func (g AgentGuest) connect(ctx context.Context, id string) (*agent.Client, error) {
	if g.Dialer == nil {
		return nil, errors.New("agent guest: no dialer")
	}
	opts := g.Options
	if opts == nil {
		opts = &DefaultAgentOptions
	}
	dial := func(ctx context.Context) (net.Conn, error) { return g.Dialer.DialAgent(ctx, id) }
	return agent.Dial(ctx, dial, opts)
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

// Personalize sets the guest clock (a restored guest's clock is as old as
// its snapshot), the network, the hostname and the environment. None of
// these depends on another, and the agent serves the requests of one
// connection concurrently, so they are sent at once and cost one round
// trip instead of up to four.
func (g AgentGuest) Personalize(ctx context.Context, id string, p Personalization) error {
	called := time.Now()
	c, err := g.connect(ctx, id)
	if err != nil {
		return fmt.Errorf("agent of %s: %w", id, err)
	}
	defer c.Close()
	return personalize(ctx, c, id, p.sentAfter(called))
}

// PersonalizeAndCheck runs Personalize and then a health request on the
// same connection. A new connection costs more than a request: a dial and
// a handshake, about 3.5 ms on a running TCG guest over virtio-serial
// (BenchmarkAgentReconnect in provider/qemu).
func (g AgentGuest) PersonalizeAndCheck(ctx context.Context, id string, p Personalization) error {
	called := time.Now()
	c, err := g.connect(ctx, id)
	if err != nil {
		return fmt.Errorf("agent of %s: %w", id, err)
	}
	defer c.Close()
	if err := personalize(ctx, c, id, p.sentAfter(called)); err != nil {
		return err
	}
	if _, err := c.Health(ctx); err != nil {
		return fmt.Errorf("agent of %s: health after personalization: %w", id, err)
	}
	return nil
}

// warmEnvName is the variable that Warm unsets, which no one sets, so that
// the agent runs its environment code without changing the environment.
const warmEnvName = "EMBER_POOL_WARMUP"

// Warm runs a personalization in pool entry id that a tenant's hand-off
// overwrites: the clock, the entry's id as its hostname, and the unset of
// a variable that is not set. Then it checks the agent's health. The
// network is not configured, because an entry has no addresses of its own.
//
// NOTE: so a hand-off with NICs still runs the agent's network code for the
// first time under TCG; that cost was not measured.
func (g AgentGuest) Warm(ctx context.Context, id string) error {
	c, err := g.connect(ctx, id)
	if err != nil {
		return fmt.Errorf("agent of %s: %w", id, err)
	}
	defer c.Close()
	if err := personalize(ctx, c, id, Personalization{Clock: time.Now(), Hostname: id}); err != nil {
		return err
	}
	if err := c.SetEnv(ctx, nil, warmEnvName); err != nil {
		return fmt.Errorf("warm the environment of %s: %w", id, err)
	}
	if _, err := c.Health(ctx); err != nil {
		return fmt.Errorf("agent of %s: health after warming: %w", id, err)
	}
	return nil
}

// sentAfter returns p with its clock moved forward by the time since
// called, when a Personalize call began. Connecting to a guest that is
// still booting or resuming takes up to seconds, and the guest should get
// the time of the request, not that of the call.
func (p Personalization) sentAfter(called time.Time) Personalization {
	if !p.Clock.IsZero() {
		p.Clock = p.Clock.Add(time.Since(called))
	}
	return p
}

// personalize applies p through the open connection c to VM id's agent.
func personalize(ctx context.Context, c *agent.Client, id string, p Personalization) error {
	var steps []func() error
	if !p.Clock.IsZero() {
		steps = append(steps, func() error {
			if err := c.SyncClock(ctx, p.Clock); err != nil {
				return fmt.Errorf("sync clock of %s: %w", id, err)
			}
			return nil
		})
	}
	if len(p.Network.Interfaces) > 0 {
		steps = append(steps, func() error {
			if err := c.ConfigureNetwork(ctx, AgentNetworkConfig(p.Network)); err != nil {
				return fmt.Errorf("configure network of %s: %w", id, err)
			}
			return nil
		})
	}
	if p.Hostname != "" {
		steps = append(steps, func() error {
			if err := c.SetHostname(ctx, p.Hostname); err != nil {
				return fmt.Errorf("set hostname of %s: %w", id, err)
			}
			return nil
		})
	}
	if len(p.Env) > 0 {
		steps = append(steps, func() error {
			if err := c.SetEnv(ctx, p.Env); err != nil {
				return fmt.Errorf("set environment of %s: %w", id, err)
			}
			return nil
		})
	}
	errs := make([]error, len(steps))
	var wg sync.WaitGroup
	for i, step := range steps {
		wg.Go(func() { errs[i] = step() })
	}
	wg.Wait()
	return errors.Join(errs...)
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
