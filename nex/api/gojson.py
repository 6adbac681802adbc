"""JSON exactly as Go's ``encoding/json`` writes it, for requests and JWTs that must match nex's bytes.

Go writes no spaces, sorts map keys, keeps non-ASCII as UTF-8, and escapes ``<``, ``>``, ``&``,
U+2028 and U+2029 inside strings. Struct fields keep their declaration order, so callers pass dicts
built in that order (Python dicts keep insertion order); maps are passed through :func:`go_map`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

_ESCAPES = str.maketrans({"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def dumps(value: object) -> bytes:
    """``json.Marshal(value)``. The escaped characters occur only inside strings, so translating is exact."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).translate(_ESCAPES).encode()


def go_map(mapping: Mapping[str, object]) -> dict[str, object]:
    """A Go map as encoding/json orders it: keys sorted (byte order)."""
    return dict(sorted(mapping.items(), key=lambda item: item[0].encode()))


def url(text: str) -> dict[str, object]:
    """A Go ``net/url.URL`` (no JSON marshaller of its own) as encoding/json writes the struct."""
    from urllib.parse import urlsplit

    parts = urlsplit(text)
    return {
        "Scheme": parts.scheme,
        "Opaque": "",
        "User": None,
        "Host": parts.netloc,
        "Path": parts.path,
        "RawPath": "",
        "OmitHost": False,
        "ForceQuery": False,
        "RawQuery": parts.query,
        "Fragment": parts.fragment,
        "RawFragment": "",
    }
