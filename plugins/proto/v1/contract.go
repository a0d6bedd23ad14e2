package pluginv1

import (
	"context"
	"errors"

	"github.com/hashicorp/go-plugin"
	"google.golang.org/grpc"
)

// The contract both sides of go-plugin must agree on, in one place (as
// go-plugin's own examples keep it): the handshake, the protocol version and
// the name the plugin is dispensed under.
const (
	// ProtocolVersion is this package's protocol, negotiated through
	// go-plugin's VersionedPlugins: a newer keywardd offers every version
	// it speaks, and a plugin built with the SDK of another picks one both
	// know.
	ProtocolVersion = 1
	// PluginName is what a keyward plugin is dispensed as.
	PluginName = "keyward"
)

// Handshake keeps a keyward plugin from being run by hand or by another
// program's go-plugin host (the cookie is not a secret: it is a UX check).
var Handshake = plugin.HandshakeConfig{
	ProtocolVersion:  ProtocolVersion,
	MagicCookieKey:   "KEYWARD_PLUGIN",
	MagicCookieValue: "7c9f0e2a-keyward-plugin-v1",
}

// Clients is keywardd's side of a plugin: a client for each service. A
// service the plugin does not declare answers UNIMPLEMENTED.
type Clients struct {
	Plugin  PluginServiceClient
	Rotator RotatorServiceClient
	Revoker RevokerServiceClient
}

// GRPCPlugin is the go-plugin shim. The plugin side sets Register (the SDK
// does); keywardd's side leaves it nil and gets Clients.
type GRPCPlugin struct {
	plugin.NetRPCUnsupportedPlugin
	Register func(*grpc.Server)
}

// GRPCServer registers the plugin's services.
func (p *GRPCPlugin) GRPCServer(_ *plugin.GRPCBroker, s *grpc.Server) error {
	if p.Register == nil {
		return errors.New("keyward plugin: nothing to serve")
	}
	p.Register(s)
	return nil
}

// GRPCClient returns the Clients over the connection go-plugin made.
func (p *GRPCPlugin) GRPCClient(_ context.Context, _ *plugin.GRPCBroker, c *grpc.ClientConn) (any, error) {
	return &Clients{Plugin: NewPluginServiceClient(c), Rotator: NewRotatorServiceClient(c), Revoker: NewRevokerServiceClient(c)}, nil
}

// PluginSets is the VersionedPlugins map for go-plugin, for either side.
func PluginSets(p *GRPCPlugin) map[int]plugin.PluginSet {
	return map[int]plugin.PluginSet{ProtocolVersion: {PluginName: p}}
}
