"""Partition simulations driving the real node and replication code."""
