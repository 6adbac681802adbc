"""Artifacts the node has verified, by sha256: a deploy of one it has seen skips the download.

A workload JWT names its artifact by hash. Bytes the node downloaded and found to have that hash
(and to be a static ELF for this machine) are that artifact, wherever they came from, so a later
deploy with the same hash claim can use them: essential restarts, redeploys, many copies of one
service. The object store is still asked, in one request, whether the object exists, how big it is,
and what digest its writer recorded; a digest that differs from the claim is refused as before
(the artifact there changed), an equal one is served from here. Least recently used go first once
the budget (``artifact_cache_bytes``) is full.
"""

from __future__ import annotations

import collections


class ArtifactCache:
    def __init__(self, budget: int) -> None:
        self.budget = budget
        self.hits = 0
        self._items: collections.OrderedDict[str, bytes] = collections.OrderedDict()
        self._bytes = 0

    def get(self, sha256: str) -> bytes | None:
        data = self._items.get(sha256)
        if data is not None:
            self._items.move_to_end(sha256)
            self.hits += 1
        return data

    def put(self, sha256: str, data: bytes) -> None:
        """Keep ``data``, verified by the caller to have this hash (not kept if larger than the budget)."""
        if sha256 in self._items or len(data) > self.budget:
            return
        self._items[sha256] = data
        self._bytes += len(data)
        while self._bytes > self.budget:
            _, evicted = self._items.popitem(last=False)
            self._bytes -= len(evicted)

    @property
    def size(self) -> int:
        return self._bytes
