"""Inside a Firecracker guest: the agent's identity from MMDS V2, as nex v0.2's agent fetched its metadata.

The host puts a :class:`~nex.api.agent.GuestIdentity` (JSON) in the VM's MMDS before it starts or
resumes the guest (:mod:`nex.vm.drivers.firecracker`). Firecracker answers MMDS requests to
169.254.169.254 itself, on ``eth0`` only, for this guest only: ARP and TCP to that address never reach
the tap.

What the guest must do first (its kernel ignores ``ip=``): bring ``eth0`` up with an address, any
address, and a route to 169.254.169.254 through it, e.g. ``ip link set eth0 up; ip addr add
169.254.0.2/16 dev eth0`` (the /16 is the link-local route), or its real address and ``ip route add
169.254.169.254/32 dev eth0``. Afterwards: configure the real address from the identity, drop the
link-local one, flush the neighbour table (a clone's holds its template's gateway MAC), and add
``ip route add blackhole 169.254.169.254/32``: MMDS holds the agent's nkey seed, and a workload that
cannot change routes (no CAP_NET_ADMIN in the guest's network namespace) then cannot read it.

Standard library only (``http.client``): it runs before anything else in the guest.
"""

from __future__ import annotations

import http.client
import time

MMDS_ADDRESS = "169.254.169.254"
TOKEN_TTL_SECONDS = 60
ATTEMPT_TIMEOUT = 1.0  # per request, as nex v0.2's agent (its client's timeout)
RETRY_INTERVAL = 0.05  # between attempts (nex v0.2: 50 ms)


class MetadataUnavailable(Exception):
    """No identity from MMDS within the time allowed; the message says what the last attempt got."""


def fetch_metadata(
    timeout: float | None = 5.0,
    address: str = MMDS_ADDRESS,
    port: int = 80,
    attempt_timeout: float = ATTEMPT_TIMEOUT,
) -> bytes:
    """The MMDS contents (JSON), retried every 50 ms until ``timeout`` seconds have passed (None:
    until there are some), each attempt given ``attempt_timeout`` seconds.

    MMDS V2: ``PUT /latest/api/token`` with ``X-metadata-token-ttl-seconds`` gives a session token,
    then ``GET /`` with ``X-metadata-token`` and ``Accept: application/json`` gives the whole store as
    JSON. An empty store (404, or ``{}``: the host has not put it yet, or a clone's host is putting
    it) is retried like a network error.
    """
    deadline = time.monotonic() + timeout if timeout is not None else float("inf")
    last = "no attempt"
    while True:
        remaining = deadline - time.monotonic()
        conn = http.client.HTTPConnection(address, port, timeout=max(0.05, min(attempt_timeout, remaining)))
        try:
            conn.request("PUT", "/latest/api/token", headers={"X-metadata-token-ttl-seconds": str(TOKEN_TTL_SECONDS)})
            answer = conn.getresponse()
            token = answer.read()
            if answer.status != 200 or not token:
                last = f"token: HTTP {answer.status} {token[:200]!r}"
            else:
                conn.request(
                    "GET", "/", headers={"X-metadata-token": token.decode().strip(), "Accept": "application/json"}
                )
                answer = conn.getresponse()
                contents = answer.read()
                if answer.status == 200 and contents.strip() not in (b"", b"{}"):
                    return contents
                last = f"GET /: HTTP {answer.status} {contents[:200]!r}"
        except (OSError, http.client.HTTPException) as exc:
            last = repr(exc)
        finally:
            conn.close()
        if time.monotonic() + RETRY_INTERVAL >= deadline:
            waited = f"{(timeout or 0) * 1000:.0f} ms"
            raise MetadataUnavailable(f"no metadata from MMDS at {address} within {waited}: {last}")
        time.sleep(RETRY_INTERVAL)
