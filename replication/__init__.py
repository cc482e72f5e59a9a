"""Anti-entropy between nodes: sync protocol, peers, gossip, authentication."""
