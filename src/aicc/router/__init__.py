"""Routing: deployments and their variants (A/B, canary), replicas, health, remote upstreams."""
