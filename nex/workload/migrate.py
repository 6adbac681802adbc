"""Moving a workload to another node: what a node in lame duck does with its essential workloads.

nex v0.2 entered lame duck "so workloads can be migrated" (nex #302) and never migrated anything.
Here the node places each essential workload as a client would (:mod:`.placement`): it auctions on
``$NEX.AUCTION`` for a node like itself (the same architecture and OS, sandboxed if it is, running
this type of workload; itself excluded, being in lame duck it does not bid anyway), then sends the
winner a deploy request. The request carries the issuer's own workload JWT, unchanged (a node cannot
sign for an issuer, and the new node checks the issuer's signature, the name and the hash claim as
for any deploy); the environment, which only this node could open, is sealed anew from this node's
xkey to the new node's. The new node's run response says the workload started there (it answers once
its agent has started it, and publishes ``workload_started``). Only then does this node stop its copy.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from dataclasses import dataclass

import msgspec
import nats.errors
from nats.aio.client import Client

from nex import crypto
from nex.api import control, subjects
from nex.bus.link import LinkError, NatsLink, RequestTimeout

from . import request as workload_request
from .placement import pick

AUCTION_WINDOW = 0.75  # seconds to gather bids at most (nex devrun's discovery window)
AUCTION_SETTLE = 0.05  # and no longer than this after the last bid (nodes bid within milliseconds)
DEPLOY_TIMEOUT = 120.0
"""For the new node to start the workload: longer than its own worst case (a machine to take, the
artifact to fetch, the agent's start, once more on a fresh machine), since a move that times out may
still start there: it is not tried elsewhere (see :class:`MoveFailed` ``maybe_moved``)."""


class MoveFailed(Exception):
    """The workload could not be moved (the message says why: no bid, or the new node refused).

    ``maybe_moved``: the node chosen did not answer in time, and may start it yet; another attempt
    could run it twice, so there is none."""

    def __init__(self, message: str, *, maybe_moved: bool = False) -> None:
        super().__init__(message)
        self.maybe_moved = maybe_moved


@dataclass(frozen=True)
class Movable:
    """What a node keeps of a workload to move it: its request as the issuer made it, opened."""

    namespace: str
    name: str
    hash: str
    jwt: str  # the issuer's workload JWT, as received
    location: str  # nats://BUCKET/key
    workload_type: str
    environment: dict[str, str]
    argv: list[str]
    description: str
    essential: bool
    jsdomain: str = ""  # the JetStream domain of the artifact's store, if not the default


@dataclass(frozen=True)
class Moved:
    node_id: str
    workload_id: str


async def move(
    link: NatsLink,
    workload: Movable,
    *,
    own_node: str,
    own_xkey: crypto.XKey,
    auction: control.AuctionRequest,
) -> Moved:
    """Place ``workload`` on another node and start it there; where it went.

    Raises:
        MoveFailed: no other node bid, or the one chosen refused or did not answer.
    """
    try:
        bids = [bid for bid in await gather_bids(link, auction) if bid.node_id != own_node]
    except (LinkError, nats.errors.Error) as exc:  # the control link's trouble: another attempt later
        raise MoveFailed(f"no auction: {exc}") from None
    if not bids:
        raise MoveFailed(f"no other node bid for it on {subjects.AUCTION} within {AUCTION_WINDOW:g}s")
    target = pick(bids)
    deploy = workload_request.Deploy(
        location=workload.location,
        name=workload.name,
        hash=workload.hash,
        node_id=target.node_id,
        node_xkey=target.target_xkey,
        environment=workload.environment,
        argv=workload.argv,
        description=workload.description,
        essential=workload.essential,
        workload_type=workload.workload_type,
        jsdomain=workload.jsdomain,
    )
    body = workload_request.forwarded_request(deploy, workload.jwt, str(uuid.uuid4()), own_xkey)
    subject = subjects.deploy(workload.namespace, target.node_id)
    try:
        reply = await link.request(subject, body, timeout=DEPLOY_TIMEOUT)
    except RequestTimeout:
        raise MoveFailed(f"node {target.node_id} did not answer in time; it may run it yet", maybe_moved=True) from None
    except LinkError as exc:
        raise MoveFailed(f"node {target.node_id} did not take it: {exc}") from None
    try:
        envelope = msgspec.json.decode(reply.data, type=control.ReceivedEnvelope)
        if envelope.error:
            raise MoveFailed(f"node {target.node_id} refused it: {envelope.error}")
        response = msgspec.json.decode(envelope.data, type=control.RunResponse)
    except msgspec.DecodeError as exc:
        raise MoveFailed(f"node {target.node_id} answered what this node cannot read: {exc}") from None
    if not response.started:
        raise MoveFailed(f"node {target.node_id} did not start it")
    return Moved(node_id=target.node_id, workload_id=response.id)


async def gather_bids(link: NatsLink, request: control.AuctionRequest) -> list[control.AuctionResponse]:
    """Every bid for ``request`` within :data:`AUCTION_WINDOW`, or until they stop coming (scatter/gather
    on the control link)."""
    payload = msgspec.json.encode(request)

    async def gather(nc: Client) -> list[bytes]:
        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox)
        replies: list[bytes] = []
        try:
            await nc.publish(subjects.AUCTION, payload, reply=inbox)
            deadline = time.monotonic() + AUCTION_WINDOW
            while (left := deadline - time.monotonic()) > 0:
                wait = min(left, AUCTION_SETTLE) if replies else left
                try:
                    replies.append((await sub.next_msg(timeout=wait)).data)
                except nats.errors.TimeoutError:
                    if replies:
                        break  # quiet since the last bid (see AUCTION_SETTLE)
        finally:
            with contextlib.suppress(nats.errors.Error):
                await sub.unsubscribe()
        return replies

    bids: dict[str, control.AuctionResponse] = {}
    for data in await link.call(gather):
        with contextlib.suppress(msgspec.DecodeError):
            envelope = msgspec.json.decode(data, type=control.ReceivedEnvelope)
            if not envelope.error:
                bid = msgspec.json.decode(envelope.data, type=control.AuctionResponse)
                bids[bid.node_id] = bid
    return list(bids.values())
