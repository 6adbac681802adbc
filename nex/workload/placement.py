"""Placing a workload among the nodes that bid for it in an auction (``$NEX.AUCTION``): the CLI's
``nex run`` without ``--node``, and a node in lame duck moving its essential workloads elsewhere."""

from __future__ import annotations

import secrets

from nex.api import control


def pick(bids: list[control.AuctionResponse]) -> control.AuctionResponse:
    """The least loaded bidder (fewest workloads, then most warm machines), ties at random, so that
    placers deciding at once spread their workloads rather than all choose the same node."""

    def load(bid: control.AuctionResponse) -> tuple[int, int]:
        return bid.running_machines, -bid.ready_machines

    least = min(load(bid) for bid in bids)
    return secrets.choice([bid for bid in bids if load(bid) == least])
