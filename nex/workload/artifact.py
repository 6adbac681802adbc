"""Where artifacts come from (``nats://BUCKET/key`` in a JetStream object store) and how they are checked."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from urllib.parse import urlsplit


class ArtifactError(ValueError):
    """The artifact cannot be had, or is not what its JWT says."""


@dataclass(frozen=True)
class Location:
    bucket: str
    key: str

    @classmethod
    def parse(cls, url: str) -> Location:
        """``nats://BUCKET/key``, as nex requires."""
        parts = urlsplit(url)
        key = parts.path.strip("/")
        if parts.scheme != "nats" or not parts.netloc or not key:
            raise ArtifactError(f"location must be nats://BUCKET/key, not {url!r}")
        return cls(bucket=parts.netloc, key=key)

    def __str__(self) -> str:
        return f"nats://{self.bucket}/{self.key}"


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def check_hash(data: bytes, claimed: str) -> str:
    """The artifact's sha256; raise :class:`ArtifactError` if it is not the JWT's hash claim."""
    actual = sha256_hex(data)
    if actual != claimed.lower():
        raise ArtifactError(f"the artifact's sha256 is {actual}, but the workload JWT claims {claimed}")
    return actual
