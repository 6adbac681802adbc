"""The workload name rule (nex v0.2.4+, ``^[a-zA-Z0-9_-]+$``), shared by the node and the CLI."""

from __future__ import annotations

import re

NAME_RULE = re.compile(r"^[a-zA-Z0-9_-]+$")
