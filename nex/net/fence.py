"""The network fence of a node's machines: one nf_tables table, sent over netlink in one atomic batch.

Untrusted workloads run in the machines' network namespaces. By default a machine reaches only the
node's internal NATS server (the gateway address, one TCP port); everything else it sends to the host
or through it is refused, unless the operator opens it. The fence is one ``inet`` table per node
(named ``nx`` + 10 hex), so it covers IPv4 and IPv6 alike (machines get IPv6 link-local addresses
whether we want them or not)::

    table inet nxXXXXXXXXXX {
      chain input {    # type filter hook input priority 0; policy accept
        iifgroup G ct state established,related accept
        iifgroup G ip daddr <gateway> tcp dport <port> accept
        iifgroup G <opening> accept                      # one per opening
        iifgroup G reject with icmpx admin-prohibited
      }
      chain forward {  # type filter hook forward priority 0; policy accept
        oifgroup G ct state established,related accept   # replies to machines (first: see below)
        iifgroup G <opening> accept
        iifgroup G reject with icmpx admin-prohibited
        oifgroup G drop                                  # nobody else starts a connection to a machine
      }
      chain nat {      # type nat hook postrouting priority 100 (only with masquerade)
        ip saddr <subnet> oifgroup != G masquerade
      }
    }

Rules match the node's host links by **interface group** ``G``, set on each host veth end as it is
created, so the rules are written once per node rather than per machine, a machine's link is fenced
from the instant it exists, and two nodes on one host (each its own group) never match each other's
links. Rejecting (rather than dropping) gives a workload an immediate ``EHOSTUNREACH`` instead of a
connect that hangs until its timeout. Traffic of other links never matches, so the host's own
firewall and other tables are left to decide about it (base chains of all tables see every packet;
``accept`` in ours does not override a ``drop`` in theirs).

Messages are encoded with pyroute2's nf_tables classes and sent on a plain ``NETLINK_NETFILTER``
socket, as :mod:`nex.net.rtnl` does for rtnetlink (pyroute2's ``NFTables`` runs an asyncio loop per
call). The kernel processes a batch synchronously inside ``send``, so every answer is queued on the
socket when ``send`` returns, and is read without waiting (``nft`` itself does the same). ``nft`` is
never needed; it is only handy to look: ``nft list table inet nx…``.

Everything here blocks: call it from a worker thread (once per node: its cost is the node's start,
not a machine's). Replacing or removing a table waits for an RCU grace period in the kernel.
"""

from __future__ import annotations

import errno
import functools
import ipaddress
import itertools
import os
import re
import socket
import struct
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

from pyroute2.netlink import NLM_F_ACK, NLM_F_APPEND, NLM_F_CREATE, NLM_F_DUMP, NLM_F_EXCL, NLM_F_REQUEST
from pyroute2.netlink.nfnetlink import NFNL_SUBSYS_NFTABLES, nfgen_msg
from pyroute2.netlink.nfnetlink.nftsocket import (
    NFPROTO_INET,
    NFT_MSG_DELTABLE,
    NFT_MSG_GETTABLE,
    NFT_MSG_NEWCHAIN,
    NFT_MSG_NEWRULE,
    NFT_MSG_NEWTABLE,
    nft_chain_msg,
    nft_rule_msg,
    nft_table_msg,
)

Protocol = Literal["tcp", "udp", "any"]
Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Nest = tuple[tuple[str, Any], ...]  # nested netlink attributes, hashable: ((name, value or Nest), ...)
Expr = Nest  # one nf_tables expression: ((NFTA_EXPR_NAME, name), (NFTA_EXPR_DATA, Nest))
Rule = tuple[tuple[Expr, ...], str]  # its expressions, and what it is for (named in errors)

TABLE_NAME = re.compile(r"^nx[0-9a-f]{10}$")
MAX_GROUP = 2**31 - 1

NETLINK_NETFILTER = 12
SOL_NETLINK = 270
NETLINK_CAP_ACK = 10  # errors carry the failed message's header only, not all of it
SO_SNDBUFFORCE = 32  # root may exceed net.core.wmem_max
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLA_F_NESTED = 0x8000
NFTA_RULE_EXPRESSIONS = 4
NFTA_LIST_ELEM = 1
NFNL_MSG_BATCH_BEGIN = 0x10
NFNL_MSG_BATCH_END = 0x11

NF_DROP, NF_ACCEPT = 0, 1
NF_INET_LOCAL_IN, NF_INET_FORWARD, NF_INET_POST_ROUTING = 1, 2, 4
NFPROTO_IPV4, NFPROTO_IPV6 = 2, 10
REG_VERDICT, REG_1 = 0, 1
CMP_EQ, CMP_NEQ = 0, 1
META_NFPROTO, META_L4PROTO, META_IIFGROUP, META_OIFGROUP = 15, 16, 21, 22
PAYLOAD_NETWORK, PAYLOAD_TRANSPORT = 1, 2
CT_STATE = 0
CT_ESTABLISHED_RELATED = 0x2 | 0x4  # NF_CT_STATE_BIT(IP_CT_ESTABLISHED) | NF_CT_STATE_BIT(IP_CT_RELATED)
REJECT_ICMPX_UNREACH, ICMPX_ADMIN_PROHIBITED = 2, 3
L4PROTO = {"tcp": socket.IPPROTO_TCP, "udp": socket.IPPROTO_UDP}


class FenceError(OSError):
    """nf_tables refused a request; ``errno`` is the kernel's, the message names the part that failed."""


@dataclass(frozen=True)
class Opening:
    """Traffic a machine may start beyond the internal NATS server: to ``cidr``, on ``port`` (0: any).

    ``protocol="any"`` with port 0 opens every protocol to ``cidr``; with a port, it opens that port
    for both TCP and UDP. An opening applies to the host's own addresses (input) as well as to anything
    the host forwards to (other machines, or beyond with ``masquerade``). Invalid values raise
    ``ValueError`` here, so that a bad configuration is refused before anything reaches the kernel.
    """

    cidr: str
    port: int = 0
    protocol: Protocol = "tcp"

    def __post_init__(self) -> None:
        try:
            ipaddress.ip_network(self.cidr)
        except ValueError as exc:
            raise ValueError(f"opening {self.cidr!r}: {exc}") from None
        if not 0 <= self.port <= 65535:
            raise ValueError(f"opening {self.cidr}: port {self.port} is not in 0..65535")
        if self.protocol not in ("tcp", "udp", "any"):
            raise ValueError(f"opening {self.cidr}: protocol {self.protocol!r} is not tcp, udp or any")

    @property
    def network(self) -> Network:
        return ipaddress.ip_network(self.cidr)

    def __str__(self) -> str:
        return f"{self.cidr} {self.protocol}/{self.port or 'any'}"


@dataclass(frozen=True)
class FencePlan:
    """Everything one node's fence needs; validated on construction (``ValueError``)."""

    table: str  # "nx" + 10 lowercase hex
    group: int  # interface group of the node's host links (1..2**31-1)
    gateway: str  # IPv4 address of the host side
    port: int  # the internal NATS server's TCP port
    subnet: str  # e.g. "192.168.127.0/24"
    openings: tuple[Opening, ...] = ()
    masquerade: bool = False

    def __post_init__(self) -> None:
        check_table(self.table)
        if not 1 <= self.group <= MAX_GROUP:
            raise ValueError(f"interface group {self.group} is not in 1..{MAX_GROUP}")
        if not 1 <= self.port <= 65535:
            raise ValueError(f"port {self.port} is not in 1..65535")
        ipaddress.IPv4Address(self.gateway)
        ipaddress.IPv4Network(self.subnet)


def check_table(name: str) -> None:
    """Refuse (``ValueError``) a table name that is not ours: only ``nx`` + 10 hex is ever touched."""
    if not TABLE_NAME.match(name):
        raise ValueError(f"{name!r} is not a fence table name (nx + 10 lowercase hex digits)")


# --- the public API ---------------------------------------------------------------------------------


def trial(plan: FencePlan) -> str | None:
    """Whether the kernel takes ``plan``'s table whole (for ``nex preflight``): one batch creates it
    exclusively, fills it and deletes it, so nothing of it outlives the call even if the caller is
    killed, and a table of that name that exists already is refused, never touched. None when every
    part was taken, else which part was refused and why."""
    table = [("NFTA_TABLE_NAME", plan.table)]
    try:
        refused = _commit(
            [
                _Op(NFT_MSG_NEWTABLE, NLM_F_CREATE | NLM_F_EXCL, table, f"create table {plan.table}"),
                *_contents(plan),
                _Op(NFT_MSG_DELTABLE, 0, table, f"delete table {plan.table}"),
            ]
        )
    except OSError as exc:
        return exc.strerror or str(exc)
    if refused:
        op, code = refused[0]
        return f"{op.what}: {os.strerror(code)}"
    return None


def install(plan: FencePlan) -> None:
    """Install ``plan``'s table, replacing a table of that name if there is one, in one atomic batch.

    If any part is refused nothing changes at all: no table if there was none, the previous one
    untouched if there was (the node keeps its old fence rather than none). Raises
    :class:`FenceError` naming the refused part.

    A table that exists already (a node restarted on the same state dir) is replaced by a batch that
    creates it (a no-op), deletes it with its chains and rules, and creates it again with the new
    ones: one transaction, so its machines are never unfenced. Otherwise the batch creates it
    exclusively. The two cases are told apart beforehand (a listing is cheap) rather than by
    trying, because the kernel waits for an RCU grace period to undo a refused batch,
    and a batch that deletes anything makes closing its socket wait for one too.
    """
    table = [("NFTA_TABLE_NAME", plan.table)]
    create = _Op(NFT_MSG_NEWTABLE, NLM_F_CREATE, table, f"create table {plan.table}")
    if plan.table in tables(plan.table):
        delete = _Op(NFT_MSG_DELTABLE, 0, table, f"delete the previous table {plan.table}")
        failures = _commit([create, delete, create, *_contents(plan)])
    else:
        exclusive = _Op(NFT_MSG_NEWTABLE, NLM_F_CREATE | NLM_F_EXCL, table, f"create table {plan.table}")
        failures = _commit([exclusive, *_contents(plan)])
    if failures:
        op, code = failures[0]
        raise FenceError(code, f"install fence {plan.table}: {op.what}: {os.strerror(code)}")


def remove(table: str) -> bool:
    """Delete ``table`` with its chains and rules; False if there was none (idempotent)."""
    check_table(table)
    op = _Op(NFT_MSG_DELTABLE, 0, [("NFTA_TABLE_NAME", table)], f"delete table {table}")
    failures = _commit([op])
    if not failures:
        return True
    code = failures[0][1]
    if code == errno.ENOENT:
        return False
    raise FenceError(code, f"remove fence {table}: {os.strerror(code)}")


def tables(prefix: str = "nx") -> list[str]:
    """Names of the ``inet`` tables of this network namespace that start with ``prefix`` (sorted)."""
    with _Socket() as nl:
        names = (msg.get_attr("NFTA_TABLE_NAME") for msg in nl.dump(nft_table_msg, NFT_MSG_GETTABLE))
        return sorted(name for name in names if name.startswith(prefix))


# --- what the table holds ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Op:
    """One message of a batch: type, extra flags, attributes, a rule's expressions, what it does."""

    kind: int
    flags: int
    attrs: list[tuple[str, Any]]
    what: str
    exprs: tuple[Expr, ...] = ()


def _contents(plan: FencePlan) -> list[_Op]:
    """The chains of ``plan``'s table, each followed by its rules (the table itself is not included)."""
    chains = [
        ("input", "filter", NF_INET_LOCAL_IN, 0, _input_rules(plan)),
        ("forward", "filter", NF_INET_FORWARD, 0, _forward_rules(plan)),
    ]
    if plan.masquerade:
        chains.append(("nat", "nat", NF_INET_POST_ROUTING, 100, _nat_rules(plan)))
    ops: list[_Op] = []
    for chain, kind, hook, priority, rules in chains:
        ops.append(_chain_op(plan.table, chain, kind, hook, priority))
        attrs = [("NFTA_RULE_TABLE", plan.table), ("NFTA_RULE_CHAIN", chain)]
        for number, (exprs, what) in enumerate(rules, 1):
            ops.append(
                _Op(NFT_MSG_NEWRULE, NLM_F_CREATE | NLM_F_APPEND, attrs, f"{chain} rule {number} ({what})", exprs)
            )
    return ops


def _chain_op(table: str, chain: str, kind: str, hook: int, priority: int) -> _Op:
    attrs = [
        ("NFTA_CHAIN_TABLE", table),
        ("NFTA_CHAIN_NAME", chain),
        ("NFTA_CHAIN_HOOK", {"attrs": [("NFTA_HOOK_HOOKNUM", hook), ("NFTA_HOOK_PRIORITY", priority)]}),
        ("NFTA_CHAIN_POLICY", NF_ACCEPT),
        ("NFTA_CHAIN_TYPE", kind),
    ]
    return _Op(NFT_MSG_NEWCHAIN, NLM_F_CREATE, attrs, f"create {kind} chain {chain}")


def _input_rules(plan: FencePlan) -> list[Rule]:
    """Machines to the host: replies, the internal NATS server, the openings; the rest rejected."""
    from_us = _group(META_IIFGROUP, plan.group)
    nats = (*_address(ipaddress.ip_network(plan.gateway), source=False), *_transport("tcp", plan.port))
    return [
        ((*from_us, *_established(), _verdict(NF_ACCEPT)), "replies"),
        ((*from_us, *nats, _verdict(NF_ACCEPT)), f"internal NATS at {plan.gateway}:{plan.port}"),
        *_openings(from_us, plan.openings),
        ((*from_us, _reject()), "reject the rest"),
    ]


def _forward_rules(plan: FencePlan) -> list[Rule]:
    """Machines to anywhere but the host, and anything to machines: openings and their replies only.

    Replies to machines are accepted first: a reply from machine B to machine A (to a connection an
    opening let A make) enters from one of our links too, and would otherwise meet the reject.
    """
    from_us = _group(META_IIFGROUP, plan.group)
    to_us = _group(META_OIFGROUP, plan.group)
    return [
        ((*to_us, *_established(), _verdict(NF_ACCEPT)), "replies to machines"),
        *_openings(from_us, plan.openings),
        ((*from_us, _reject()), "reject the rest from machines"),
        ((*to_us, _verdict(NF_DROP)), "drop the rest to machines"),
    ]


def _nat_rules(plan: FencePlan) -> list[Rule]:
    """Machines' traffic leaving by any other link takes that link's address (to reach beyond the host)."""
    source = _address(ipaddress.IPv4Network(plan.subnet), source=True)
    return [((*source, *_group(META_OIFGROUP, plan.group, CMP_NEQ), _expr("masq")), f"masquerade {plan.subnet}")]


def _openings(prefix: tuple[Expr, ...], openings: Iterable[Opening]) -> Iterator[Rule]:
    for opening in openings:
        both = opening.protocol == "any" and opening.port
        protocols: tuple[Protocol, ...] = ("tcp", "udp") if both else (opening.protocol,)
        for protocol in protocols:
            exprs = (*prefix, *_address(opening.network, source=False), *_transport(protocol, opening.port))
            yield (*exprs, _verdict(NF_ACCEPT)), f"opening {opening}"


# --- expressions ------------------------------------------------------------------------------------


def _expr(name: str, **data: Any) -> Expr:
    """An expression: ``NFTA_EXPR_NAME`` and ``NFTA_EXPR_DATA`` holding ``NFTA_<NAME>_<KEY>`` attributes."""
    attrs = tuple((f"NFTA_{name.upper()}_{key.upper()}", value) for key, value in data.items())
    return (("NFTA_EXPR_NAME", name), ("NFTA_EXPR_DATA", attrs))


def _value(data: bytes) -> Nest:
    return (("NFTA_DATA_VALUE", data),)


def _cmp(data: bytes, op: int = CMP_EQ) -> Expr:
    return _expr("cmp", sreg=REG_1, op=op, data=_value(data))


def _meta(key: int) -> Expr:
    return _expr("meta", dreg=REG_1, key=key)


def _group(key: int, group: int, op: int = CMP_EQ) -> tuple[Expr, ...]:
    """``meta iifgroup``/``oifgroup``: the link's group, a host-order u32."""
    return _meta(key), _cmp(struct.pack("=I", group), op)


def _established() -> tuple[Expr, ...]:
    """``ct state established,related``: the state's bit, masked, is not zero."""
    mask = struct.pack("=I", CT_ESTABLISHED_RELATED)
    bitwise = _expr("bitwise", sreg=REG_1, dreg=REG_1, len=4, mask=_value(mask), xor=_value(bytes(4)))
    return _expr("ct", dreg=REG_1, key=CT_STATE), bitwise, _cmp(bytes(4), CMP_NEQ)


def _address(network: Network, *, source: bool) -> tuple[Expr, ...]:
    """``ip[6] saddr/daddr <network>``, after ``meta nfproto``: the ``inet`` family sees both IPv4 and IPv6."""
    v4 = network.version == 4
    exprs = [_meta(META_NFPROTO), _cmp(bytes([NFPROTO_IPV4 if v4 else NFPROTO_IPV6]))]
    if network.prefixlen == 0:
        return tuple(exprs)
    size = 4 if v4 else 16
    offset = (12 if source else 16) if v4 else (8 if source else 24)
    exprs.append(_expr("payload", dreg=REG_1, base=PAYLOAD_NETWORK, offset=offset, len=size))
    if network.prefixlen < network.max_prefixlen:
        mask = network.netmask.packed
        exprs.append(_expr("bitwise", sreg=REG_1, dreg=REG_1, len=size, mask=_value(mask), xor=_value(bytes(size))))
    exprs.append(_cmp(network.network_address.packed))
    return tuple(exprs)


def _transport(protocol: Protocol, port: int) -> tuple[Expr, ...]:
    """``meta l4proto <protocol>`` and ``th dport <port>``; nothing for "any" (whose port is then 0)."""
    if protocol == "any":
        return ()
    exprs = (_meta(META_L4PROTO), _cmp(bytes([L4PROTO[protocol]])))
    if not port:
        return exprs
    return *exprs, _expr("payload", dreg=REG_1, base=PAYLOAD_TRANSPORT, offset=2, len=2), _cmp(struct.pack(">H", port))


def _verdict(code: int) -> Expr:
    return _expr("immediate", dreg=REG_VERDICT, data=(("NFTA_DATA_VERDICT", (("NFTA_VERDICT_CODE", code),)),))


def _reject() -> Expr:
    """``reject with icmpx admin-prohibited``: ICMP type 3 code 13 for IPv4, its ICMPv6 twin for IPv6."""
    return _expr("reject", type=REJECT_ICMPX_UNREACH, icmp_code=ICMPX_ADMIN_PROHIBITED)


def _nested(nest: Nest) -> dict[str, Any]:
    """``nest`` as pyroute2 takes nested attributes: ``{"attrs": [(name, value), ...]}``."""
    return {"attrs": [(name, _nested(value) if isinstance(value, tuple) else value) for name, value in nest]}


@functools.lru_cache(maxsize=4096)
def _encoded(expr: Expr) -> bytes:
    """One expression as the ``NFTA_LIST_ELEM`` attribute of a rule's expression list.

    Encoded by pyroute2's ``nft_expr`` class once and remembered: pyroute2's encoding is slow, and a
    fence repeats the same few expressions in every rule (the group match, the verdicts), so most of a
    rule's encoding is a lookup (what makes hundreds of openings practical).
    """
    nla = nft_rule_msg.nft_expr()
    nla.setvalue(_nested(expr))
    nla["header"]["type"] = NFTA_LIST_ELEM
    nla.encode()
    data = bytes(nla.data)
    return data + bytes(-len(data) % 4)


def _with_expressions(message: bytes, exprs: tuple[Expr, ...]) -> bytes:
    """``message`` (a rule, encoded without expressions) with ``NFTA_RULE_EXPRESSIONS`` appended."""
    body = b"".join(_encoded(expr) for expr in exprs)
    attr = struct.pack("=HH", 4 + len(body), NFTA_RULE_EXPRESSIONS | NLA_F_NESTED) + body
    data = bytearray(message + bytes(-len(message) % 4) + attr)
    struct.pack_into("=I", data, 0, len(data))
    return bytes(data)


# --- the netlink socket -----------------------------------------------------------------------------


MESSAGE_CLASSES: dict[int, type[nfgen_msg]] = {
    NFT_MSG_NEWTABLE: nft_table_msg,
    NFT_MSG_DELTABLE: nft_table_msg,
    NFT_MSG_NEWCHAIN: nft_chain_msg,
    NFT_MSG_NEWRULE: nft_rule_msg,
}


def _commit(ops: list[_Op]) -> list[tuple[_Op, int]]:
    """Send ``ops`` as one batch; the ops the kernel refused, with its errno, in order (empty: committed)."""
    try:
        with _Socket() as nl:
            return nl.batch(ops)
    except FenceError:
        raise
    except OSError as exc:  # no nfnetlink, a full socket buffer...
        raise FenceError(exc.errno, f"nf_tables netlink: {exc.strerror}") from exc


class _Socket:
    """A ``NETLINK_NETFILTER`` socket in the calling thread's network namespace; a context manager."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        try:
            self.sock.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)
            self.sock.bind((0, 0))
        except OSError:
            self.sock.close()
            raise
        self._seq = itertools.count(1)

    def __enter__(self) -> _Socket:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    def _encode(self, msg: nfgen_msg, kind: int, flags: int, res_id: int = 0) -> tuple[int, bytes]:
        msg["header"]["type"] = kind
        msg["header"]["flags"] = NLM_F_REQUEST | flags
        msg["header"]["sequence_number"] = seq = next(self._seq)
        msg["nfgen_family"] = NFPROTO_INET
        msg["res_id"] = res_id
        msg.encode()
        return seq, bytes(msg.data)

    def batch(self, ops: list[_Op]) -> list[tuple[_Op, int]]:
        """Send ``ops`` between BATCH_BEGIN and BATCH_END; the ops refused, with their errno, in order.

        The kernel processes the whole batch (reporting every refused op, not just the first) and
        commits or aborts it inside ``send``, so its answers are all queued when ``send`` returns. Only
        the last op asks for an acknowledgement: it proves the batch was read to its end while keeping
        the answers few whatever the number of rules. A failed commit is reported against BATCH_BEGIN.
        """
        seq, data = self._encode(nfgen_msg(), NFNL_MSG_BATCH_BEGIN, 0, NFNL_SUBSYS_NFTABLES)
        by_seq = {seq: _Op(NFNL_MSG_BATCH_BEGIN, 0, [], "the batch as a whole")}
        parts = [data]
        for index, op in enumerate(ops, 1):
            msg = MESSAGE_CLASSES[op.kind]()
            msg["attrs"] = op.attrs
            ack = NLM_F_ACK if index == len(ops) else 0
            seq, data = self._encode(msg, (NFNL_SUBSYS_NFTABLES << 8) | op.kind, op.flags | ack)
            by_seq[seq] = op
            parts.append(_with_expressions(data, op.exprs) if op.exprs else data)
        parts.append(self._encode(nfgen_msg(), NFNL_MSG_BATCH_END, 0, NFNL_SUBSYS_NFTABLES)[1])
        self._send(b"".join(parts))
        answers = dict(self._answers())
        refused = [(by_seq[seq], code) for seq, code in sorted(answers.items()) if code and seq in by_seq]
        if not refused and answers.get(seq) != 0:
            raise FenceError(errno.EIO, f"nf_tables did not acknowledge the batch ({ops[-1].what})")
        return refused

    def _send(self, data: bytes) -> None:
        """Send one datagram, raising the send buffer first for one larger than it (some 300 openings)."""
        if len(data) > self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF) - 32:
            self.sock.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, len(data))  # the kernel doubles it
        self.sock.send(data)

    def _answers(self) -> Iterator[tuple[int, int]]:
        """(sequence number, errno) of each error or acknowledgement queued on the socket, without waiting.

        An error that did not fit in the receive buffer makes ``recv`` fail with ENOBUFS: raised, and
        harmless to the kernel's state, since only refusals can be that many and a refused batch is
        never committed.
        """
        while True:
            try:
                data = self.sock.recv(65536, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return
            for kind, seq, message in _messages(data):
                if kind == NLMSG_ERROR:
                    yield seq, -struct.unpack_from("i", message, 16)[0]

    def dump(self, cls: type[nfgen_msg], kind: int) -> Iterator[nfgen_msg]:
        """Every object a GET request with NLM_F_DUMP returns, decoded by ``cls``."""
        seq, data = self._encode(cls(), (NFNL_SUBSYS_NFTABLES << 8) | kind, NLM_F_DUMP)
        self.sock.send(data)
        while True:
            for msg_kind, msg_seq, message in _messages(self.sock.recv(65536)):
                if msg_seq != seq:
                    continue
                if msg_kind == NLMSG_DONE:
                    return
                if msg_kind == NLMSG_ERROR:
                    code = -struct.unpack_from("i", message, 16)[0]
                    raise FenceError(code, f"list nf_tables objects: {os.strerror(code)}")
                msg = cls(message)
                msg.decode()
                yield msg


def _messages(data: bytes) -> Iterator[tuple[int, int, bytes]]:
    """(type, sequence number, the whole message) of each netlink message in one datagram."""
    offset = 0
    while offset + 16 <= len(data):
        length, kind, _, seq, _ = struct.unpack_from("IHHII", data, offset)
        yield kind, seq, data[offset : offset + max(length, 16)]
        offset += max((length + 3) & ~3, 16)
