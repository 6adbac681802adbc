"""Workloads: checking and moving artifacts, and the node's record of what runs where."""
