"""nex: a NATS execution engine node built on the :mod:`actors` runtime.

Layers, bottom to top; a module imports from its own layer and those below, never from above
(``tests/test_layout.py`` enforces it):

1. wire types (``api``), ``config``, ``crypto``, ``ids``, the node's ``state``, small host helpers;
2. ``bus`` (NATS links, servers, event publishing, artifact staging), ``net``, ``sandbox``, ``agent``;
3. ``vm``: machines, their drivers and the warm pool;
4. ``workload``: deploys, stops and what agents report;
5. ``node``: the supervision tree and its life;
6. ``client`` and ``cli``.
"""

__version__ = "0.1.0"
