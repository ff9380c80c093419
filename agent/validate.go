package agent

import (
	"errors"
	"fmt"
	"net"
	"net/netip"
	"strings"
)

// ValidateEnvKey returns an error unless key is a portable environment
// variable name: a letter or underscore, then letters, digits or
// underscores, at most 255 bytes.
func ValidateEnvKey(key string) error {
	if key == "" {
		return errors.New("empty environment variable name")
	}
	if len(key) > 255 {
		return fmt.Errorf("environment variable name of %d bytes exceeds 255", len(key))
	}
	for i := 0; i < len(key); i++ {
		c := key[i]
		letter := c == '_' || (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z')
		if letter || (i > 0 && c >= '0' && c <= '9') {
			continue
		}
		return fmt.Errorf("invalid environment variable name %q: use letters, digits and underscores, not starting with a digit", key)
	}
	return nil
}

// ValidateEnvEntry checks one KEY=value string of an exec request.
func ValidateEnvEntry(entry string) error {
	key, value, ok := strings.Cut(entry, "=")
	if !ok {
		return fmt.Errorf("environment entry %q has no '='", key)
	}
	if strings.IndexByte(value, 0) >= 0 {
		return fmt.Errorf("environment variable %q contains a NUL byte", key)
	}
	return ValidateEnvKey(key)
}

// ValidateGuestPath returns an error unless p is an absolute, clean path
// without ".." elements or NUL bytes, as the file operations require. The
// agent also resolves paths inside its root without following symbolic links
// out of it.
func ValidateGuestPath(p string) error {
	if p == "" {
		return errors.New("empty path")
	}
	if !strings.HasPrefix(p, "/") {
		return fmt.Errorf("path %q is not absolute", p)
	}
	if strings.IndexByte(p, 0) >= 0 {
		return fmt.Errorf("path %q contains a NUL byte", p)
	}
	for elem := range strings.SplitSeq(p[1:], "/") {
		if elem == ".." {
			return fmt.Errorf("path %q contains a '..' element", p)
		}
	}
	if len(p) > 4095 {
		return fmt.Errorf("path of %d bytes exceeds 4095", len(p))
	}
	return nil
}

// ValidateSecretName returns an error unless name is a usable secret file
// name: 1 to 255 bytes of letters, digits, '.', '_' or '-', and not "." or
// "..".
func ValidateSecretName(name string) error {
	if name == "" || name == "." || name == ".." || len(name) > 255 {
		return fmt.Errorf("invalid secret name %q: use 1 to 255 letters, digits, '.', '_' or '-'", name)
	}
	for i := 0; i < len(name); i++ {
		c := name[i]
		if c == '.' || c == '_' || c == '-' || (c >= '0' && c <= '9') || (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') {
			continue
		}
		return fmt.Errorf("invalid secret name %q: use 1 to 255 letters, digits, '.', '_' or '-'", name)
	}
	return nil
}

// ValidateHostname returns an error unless name is a valid host name: dot
// separated labels of letters, digits and inner hyphens, at most 64 bytes as
// Linux allows.
func ValidateHostname(name string) error {
	if name == "" || len(name) > 64 {
		return fmt.Errorf("invalid hostname %q: must be 1 to 64 bytes", name)
	}
	for label := range strings.SplitSeq(name, ".") {
		if label == "" || len(label) > 63 || label[0] == '-' || label[len(label)-1] == '-' {
			return fmt.Errorf("invalid hostname %q: bad label %q", name, label)
		}
		for i := 0; i < len(label); i++ {
			c := label[i]
			if c == '-' || (c >= '0' && c <= '9') || (c >= 'A' && c <= 'Z') || (c >= 'a' && c <= 'z') {
				continue
			}
			return fmt.Errorf("invalid hostname %q: character %q not allowed", name, c)
		}
	}
	return nil
}

// Validate returns every problem of the network configuration, joined, or nil.
func (c NetworkConfig) Validate() error {
	var errs []error
	seen := map[string]bool{}
	for i, iface := range c.Interfaces {
		mac, err := net.ParseMAC(iface.MAC)
		if err != nil || len(mac) != 6 {
			errs = append(errs, fmt.Errorf("interfaces[%d]: invalid mac %q", i, iface.MAC))
		} else if seen[mac.String()] {
			errs = append(errs, fmt.Errorf("interfaces[%d]: duplicate mac %s", i, mac))
		} else {
			seen[mac.String()] = true
		}
		for j, a := range iface.Addresses {
			if _, err := netip.ParsePrefix(a); err != nil {
				errs = append(errs, fmt.Errorf("interfaces[%d].addresses[%d]: %w", i, j, err))
			}
		}
		for j, r := range iface.Routes {
			if _, err := r.Prefix(); err != nil {
				errs = append(errs, fmt.Errorf("interfaces[%d].routes[%d]: %w", i, j, err))
			}
		}
		if iface.MTU < 0 || iface.MTU > 65535 {
			errs = append(errs, fmt.Errorf("interfaces[%d]: mtu %d out of range 0-65535", i, iface.MTU))
		}
	}
	if c.DNS != nil {
		for i, ns := range c.DNS.Nameservers {
			if _, err := netip.ParseAddr(ns); err != nil {
				errs = append(errs, fmt.Errorf("dns.nameservers[%d]: %w", i, err))
			}
		}
		for i, s := range c.DNS.Search {
			if ValidateHostname(s) != nil || strings.ContainsAny(s, " \t\n") {
				errs = append(errs, fmt.Errorf("dns.search[%d]: invalid domain %q", i, s))
			}
		}
	}
	return errors.Join(errs...)
}

// Prefix returns the route's destination prefix, resolving "default" by the
// gateway's family (IPv4 when there is no gateway). It also checks that the
// gateway, if any, is of the destination's family.
func (r Route) Prefix() (netip.Prefix, error) {
	var gw netip.Addr
	if r.Gateway != "" {
		var err error
		if gw, err = netip.ParseAddr(r.Gateway); err != nil {
			return netip.Prefix{}, fmt.Errorf("invalid gateway: %w", err)
		}
	}
	var dst netip.Prefix
	if r.Destination == "default" {
		dst = netip.MustParsePrefix("0.0.0.0/0")
		if gw.Is6() {
			dst = netip.MustParsePrefix("::/0")
		}
	} else {
		var err error
		if dst, err = netip.ParsePrefix(r.Destination); err != nil {
			return netip.Prefix{}, fmt.Errorf("invalid destination: %w", err)
		}
	}
	if gw.IsValid() && gw.Is4() != dst.Addr().Is4() {
		return netip.Prefix{}, fmt.Errorf("gateway %s and destination %s differ in address family", gw, dst)
	}
	return dst.Masked(), nil
}
