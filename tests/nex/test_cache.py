"""The node's cache of verified artifacts: least recently used go first, nothing above the budget."""

from __future__ import annotations

from nex.workload.cache import ArtifactCache


def test_the_least_recently_used_artifact_goes_first() -> None:
    cache = ArtifactCache(budget=10)
    cache.put("a", b"aaaa")
    cache.put("b", b"bbbb")
    assert cache.get("a") == b"aaaa"  # a is now the most recent
    cache.put("c", b"cccc")  # 12 > 10: b goes
    assert cache.get("b") is None
    assert cache.get("a") == b"aaaa"
    assert cache.get("c") == b"cccc"
    assert cache.size == 8
    assert cache.hits == 3


def test_nothing_larger_than_the_budget_is_kept_and_zero_keeps_nothing() -> None:
    cache = ArtifactCache(budget=3)
    cache.put("big", b"xxxx")
    assert cache.get("big") is None
    off = ArtifactCache(budget=0)
    off.put("a", b"a")
    assert off.get("a") is None
    assert off.size == 0
