"""nex: a NATS execution engine node built on the :mod:`actors` runtime.

Layers, bottom to top (nothing imports upward): wire types, crypto and config; the node (bus, machines,
workloads); the client and the CLI. See ``DESIGN.md`` beside the project.
"""

__version__ = "0.1.0"
