"""Routing and placement: partitions, singletons, claims and rate limits."""
