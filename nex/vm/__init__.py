"""Machines: one sandbox running one agent, its drivers, the agent launcher and the warm pool."""
