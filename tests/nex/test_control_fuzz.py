"""Fuzzing the control API of one real node: every ``$NEX.*`` subject gets malformed, truncated,
oversized, non-UTF-8 and type-confused bodies, and must answer each with exactly one clear reply.

One ``nex up`` process on a real nats-server (with JetStream) serves the module. It keeps one warm
machine; the requester has uploaded a shell script, so a deploy that passes every check of the
request still ends at the artifact ("not an ELF executable"): no body can take a machine. For every
body tried:

* there is exactly one reply (none for ``WPING``, which answers only when a workload matches). This
  is shown without sleeping: after the first reply the test flushes (a round trip to the server),
  sends a barrier request down the same path of the node (the same actor, the same connection) and
  waits for its answer, then flushes again. Whatever the node sent before the barrier's answer has
  arrived by then, and replies are counted from the subscription's queue, which nats-py fills in the
  order the messages were read;
* a bad body gets a failure envelope of the verb's own type whose reason names the offending field,
  or says the body is not a request at all (``Unable to deserialize …``); a body that happens to be
  acceptable gets the answer the untouched request gets (for a deploy: refused at the artifact);
* the node stays healthy: a ``PING`` after each example is answered;
* nothing is consumed: the pool holds the same machine after every example and no workload appears.

A valid ``LAMEDUCK`` stops the node, so the fuzzed ones are bodies a strict JSON reader refuses; the
module ends by sending a valid one, waits for the node to exit, and checks that nothing of the node
or its server is left (processes, stores, machine directories, nx* kernel objects).

What the fuzzing found is pinned by explicit examples and by the ``test_pinned_*`` tests below (on a
node of their own where the finding brought the node down).
"""

from __future__ import annotations

import base64
import copy
import json
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import nats.errors
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from nex import crypto
from nex.api import control, subjects
from nex.workload import checks

from .support import Bus, LeakCheck, NatsServerProc, NodeProcess, kill_leftovers, processes_mentioning, wait_gone
from .workloads import Requester

pytestmark = pytest.mark.integration

Json = Any

NAMESPACE = "default"
REPLY_DEADLINE = 15.0  # a deploy that reaches the artifact looks it up and downloads it first
PIN_DEADLINE = 2.0  # a pinned finding, once fixed, is refused before any I/O
SCRIPT = b"#!/bin/sh\necho not a machine's worth\n"  # in the object store: never runnable, so never deployed
NOT_JSON = "Unable to deserialize"  # how a deploy or stop refusal starts when the body is no request at all
FUZZ = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
LIGHT = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# -- the node under fuzz --------------------------------------------------------------------------------


@dataclass(repr=False)
class Fuzzed:
    """A node, and what every example is compared with."""

    bus: Bus
    node: NodeProcess
    target: control.PingResponse
    requester: Requester
    pool: frozenset[str]  # the warm machines' ids once the node was up
    max_payload: int
    deploy: dict[str, Json]  # a deploy request that passes every check but the artifact's
    deploy_refusal: str  # what the node answers it
    stop: dict[str, Json]  # a well-formed stop of a workload that does not exist
    stop_refusal: str
    claims: dict[str, Json]  # the deploy JWT's claims

    @property
    def node_id(self) -> str:
        return self.node.node_id

    def __repr__(self) -> str:
        return f"Fuzzed(node={self.node_id})"

    def _repr_pretty_(self, printer: Any, cycle: bool) -> None:  # how hypothesis prints an example's arguments
        printer.text(repr(self))

    def subject(self, verb: str, namespace: str = NAMESPACE) -> str:
        return {
            "PING": subjects.ping(self.node_id),
            "INFO": subjects.info(namespace, self.node_id),
            "DEPLOY": subjects.deploy(namespace, self.node_id),
            "STOP": subjects.stop(namespace, self.node_id),
            "LAMEDUCK": subjects.lameduck(self.node_id),
            "WPING": subjects.wping(namespace),
        }[verb]


def bring_up(node: NodeProcess, bus: Bus) -> Fuzzed:
    """``node`` started with one warm machine, a script in the object store, and the answers to the
    untouched requests."""
    node.start(bus)
    target = node.ping(bus)
    requester = Requester(bus, NAMESPACE)
    artifact = requester.upload(SCRIPT, "fuzz")
    deploy = json.loads(requester.deploy_body(target, artifact, "fuzz", {"GREETING": "hello"}))
    token = deploy["workload_jwt"].split(".")[1]
    stop_jwt = crypto.encode_generic_jwt(requester.keys.issuer, "fuzz", {})
    fuzzed = Fuzzed(
        bus=bus,
        node=node,
        target=target,
        requester=requester,
        pool=frozenset(m.id for m in wait_ready(node, bus)),
        max_payload=int(bus.nc.max_payload),
        deploy=deploy,
        deploy_refusal="",
        stop={"workload_id": "cnrul21t6e8i4vc1sf6g", "workload_jwt": stop_jwt, "target_node": target.node_id},
        stop_refusal="",
        claims=json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))),
    )
    fuzzed.deploy_refusal = refusal(exchange(fuzzed, "DEPLOY", encode(fuzzed.deploy)), control.RUN_RESPONSE)
    assert "not an ELF executable" in fuzzed.deploy_refusal, fuzzed.deploy_refusal
    fuzzed.stop_refusal = refusal(exchange(fuzzed, "STOP", encode(fuzzed.stop)), control.STOP_RESPONSE)
    assert "No such workload" in fuzzed.stop_refusal, fuzzed.stop_refusal
    return fuzzed


def wait_ready(node: NodeProcess, bus: Bus, timeout: float = 30) -> list[control.PoolMember]:
    """The pool once every machine in it is ready (each round a real INFO request)."""
    deadline = time.monotonic() + timeout
    while True:
        pool = node.info(bus).pool
        if pool and all(m.state == "ready" for m in pool):
            return pool
        if time.monotonic() > deadline:
            raise AssertionError(f"the pool was not ready within {timeout}s: {pool}\n{node.log()}")
        bus.run(bus.nc.flush())


def leftovers(home: Path, check: LeakCheck) -> list[str]:
    """What the module's node and server left behind (the per-test leak check looks at tmp_path only)."""
    problems = []
    marker = str(home)
    if wait_gone(list(processes_mentioning(marker)), timeout=20):
        leaked = kill_leftovers(marker)
        problems.append("processes left running: " + "; ".join(f"{pid}: {cmd}" for pid, cmd in leaked.items()))
    if stores := sorted(str(p) for p in home.glob("*/nats")):
        problems.append(f"nats-server work directories left behind: {stores}")
    if machines := sorted(str(p) for p in home.glob("*/vm/*/*/*")):
        problems.append(f"machine state directories left behind: {machines}")
    return problems + [f"{kind} left behind: {found}" for kind, found in check.leaks().items()]


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fuzzed]:
    """The module's node. It ends by a valid lame duck request: answered, and the node exits cleanly."""
    home = tmp_path_factory.mktemp("fuzz")
    check = LeakCheck(home)
    server = NatsServerProc(home).start()
    bus = Bus(server.url)
    node = NodeProcess(home, "--pool-size", "1", server=server.url)
    problems: list[str] = []
    try:
        fuzzed = bring_up(node, bus)
        yield fuzzed
        (answer,) = exchange(fuzzed, "LAMEDUCK", b'{"deadline_ms": 0}', barrier=False)
        envelope = msgspec.json.decode(answer, type=control.ReceivedEnvelope)
        if envelope.type != control.LAMEDUCK_RESPONSE or envelope.error is not None:
            problems.append(f"a valid lame duck request was answered {answer!r}")
        if (code := node.wait(30)) != 0:
            problems.append(f"the node exited with {code} after lame duck:\n{node.log()}")
    finally:
        node.stop()
        bus.close()
        server.stop()
        problems += leftovers(home, check)
    assert not problems, "\n".join(problems)


@pytest.fixture
def lone(home: Path, nats_server: NatsServerProc, bus: Bus) -> Iterator[Fuzzed]:
    """A node of the test's own, for a finding that may bring it down (the leak check covers it)."""
    node = NodeProcess(home, "--pool-size", "1", server=nats_server.url)
    try:
        yield bring_up(node, bus)
    finally:
        node.stop()


# -- asking, and counting the answers -------------------------------------------------------------------


def encode(value: Json) -> bytes:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode()


#: a request down the same path of the node as each verb's (same actor, same connection), with a
#: known answer: once that has come, so has any further reply the node sent to the request before it
BARRIERS = {
    "DEPLOY": ("DEPLOY", b"{"),
    "STOP": ("STOP", b"{"),
    "WPING": ("STOP", b"{"),  # the workload manager answers both
    "LAMEDUCK": ("LAMEDUCK", b"{"),  # the control API answers PING, INFO and LAMEDUCK
    "PING": ("LAMEDUCK", b"{"),
    "INFO": ("LAMEDUCK", b"{"),
}


def exchange(
    fuzzed: Fuzzed,
    verb: str,
    body: bytes,
    *,
    subject: str | None = None,
    barrier: bool = True,
    deadline: float = REPLY_DEADLINE,
) -> list[bytes]:
    """Every reply to one request: the first (none for WPING) within ``deadline``, then any that came
    before the barrier's answer."""
    nc = fuzzed.bus.nc
    subject = subject or fuzzed.subject(verb)

    async def run() -> list[bytes]:
        sub = await nc.subscribe(nc.new_inbox())  # no callback: replies queue up in the order they were read
        try:
            await nc.flush()
            await nc.publish(subject, body, reply=sub.subject)
            replies = []
            if verb != "WPING":
                try:
                    replies.append((await sub.next_msg(timeout=deadline)).data)
                except nats.errors.TimeoutError:
                    raise AssertionError(f"no reply to {verb} within {deadline}s; body {body[:200]!r}…") from None
            await nc.flush()
            if barrier:
                barrier_verb, barrier_body = BARRIERS[verb]
                await nc.request(fuzzed.subject(barrier_verb), barrier_body, timeout=deadline)
                await nc.flush()
            while sub.pending_msgs:
                replies.append((await sub.next_msg(timeout=1)).data)
            return replies
        finally:
            await sub.unsubscribe()

    return fuzzed.bus.run(run(), deadline * 3)


def one_envelope(replies: list[bytes], payload_type: str) -> control.ReceivedEnvelope:
    assert len(replies) == 1, f"expected exactly one reply, got {len(replies)}: {[r[:300] for r in replies]}"
    envelope = msgspec.json.decode(replies[0], type=control.ReceivedEnvelope)
    assert envelope.type == payload_type, f"reply of type {envelope.type!r}, not {payload_type!r}: {replies[0]!r}"
    return envelope


def refusal(replies: list[bytes], payload_type: str) -> str:
    """The reason of the one failure envelope in ``replies``."""
    envelope = one_envelope(replies, payload_type)
    assert envelope.error, f"expected a refusal, got {replies[0][:500]!r}"
    assert bytes(envelope.data) == b'""', "nex's failure envelope carries empty data"
    return envelope.error


def still_healthy(fuzzed: Fuzzed) -> None:
    """The node answers a PING; its pool holds the machines it began with; no workload appeared."""
    ping = fuzzed.node.ping(fuzzed.bus)
    assert ping.node_id == fuzzed.node_id
    assert ping.running_machines == 0, "a fuzzed request started a workload"
    assert ping.tags.get("nex.lameduck") == "false", "a fuzzed request put the node in lame duck"
    info = fuzzed.node.info(fuzzed.bus)
    assert info.machines == [], f"a fuzzed request started a workload: {info.machines}"
    assert frozenset(m.id for m in info.pool) == fuzzed.pool, f"a fuzzed request took a machine: {info.pool}"


def deploy_refused(fuzzed: Fuzzed, body: bytes, deadline: float = REPLY_DEADLINE) -> str:
    reason = refusal(exchange(fuzzed, "DEPLOY", body, deadline=deadline), control.RUN_RESPONSE)
    still_healthy(fuzzed)
    return reason


def stop_refused(fuzzed: Fuzzed, body: bytes, deadline: float = REPLY_DEADLINE) -> str:
    reason = refusal(exchange(fuzzed, "STOP", body, deadline=deadline), control.STOP_RESPONSE)
    still_healthy(fuzzed)
    return reason


def lameduck_refused(fuzzed: Fuzzed, body: bytes) -> str:
    assert not lameduck_acceptable(body), "this body would put the module's node in lame duck"
    reason = refusal(exchange(fuzzed, "LAMEDUCK", body), control.LAMEDUCK_RESPONSE)
    assert reason.startswith("Invalid lame duck request"), reason
    still_healthy(fuzzed)
    return reason


# -- oracles --------------------------------------------------------------------------------------------


def strict_json(body: bytes) -> tuple[bool, Json]:
    """(True, value) if ``body`` is JSON text (RFC 8259: UTF-8, no NaN or Infinity), else (False, None)."""

    def no_constants(name: str) -> None:
        raise ValueError(name)

    try:
        return True, json.loads(body.decode("utf-8"), parse_constant=no_constants)
    except (UnicodeDecodeError, ValueError, RecursionError):
        return False, None


def lameduck_acceptable(body: bytes) -> bool:
    """Whether ``body`` is a lame duck request (none at all, or an object whose deadline_ms is a
    non-negative integer or null): such a body stops the node."""
    if not body.strip(b" \t\r\n"):
        return True
    ok, value = strict_json(body)
    if not ok or not isinstance(value, dict):
        return False
    deadline = value.get("deadline_ms")
    return deadline is None or (type(deadline) is int and 0 <= deadline <= 2**63 - 1)


#: other words a reason may name a field by
ALIASES = {
    "location": ("object store", "no object"),  # a location that parses, naming a bucket or key that is not there
    "workload_jwt": ("JWT",),
    "jsdomain": ("domain",),
}


def names(reason: str, field: str) -> bool:
    """Whether ``reason`` names ``field`` (as a word: ``type`` in "workload type", not in "types")."""
    words = (field, field.replace("_", " "), *ALIASES.get(field, ()))
    return any(re.search(rf"(?<![A-Za-z_]){re.escape(word)}(?![A-Za-z_])", reason) for word in words)


# -- strategies -----------------------------------------------------------------------------------------

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=12)
)
BY_KIND: dict[str, st.SearchStrategy[Json]] = {
    "null": st.none(),
    "bool": st.booleans(),
    "int": st.integers(min_value=-(2**70), max_value=2**70),
    "float": st.floats(allow_nan=False, allow_infinity=False),
    "string": st.text(max_size=40),
    "list": st.lists(scalars, max_size=4),
    "object": st.dictionaries(st.text(max_size=10), scalars, max_size=4),
}
MISSING = object()


def kind_of(value: object) -> str:
    if value is MISSING:
        return "missing"
    if value is None:
        return "null"
    return {bool: "bool", int: "int", float: "float", str: "string", list: "list", dict: "object"}[type(value)]


def lookup(tree: Json, path: tuple[str, ...]) -> Json:
    for key in path:
        if not isinstance(tree, dict) or key not in tree:
            return MISSING
        tree = tree[key]
    return tree


def replaced(tree: dict[str, Json], path: tuple[str, ...], value: Json) -> dict[str, Json]:
    out = copy.deepcopy(tree)
    inner = out
    for key in path[:-1]:
        inner = inner[key]
    inner[path[-1]] = value
    return out


def paths(tree: dict[str, Json], extra: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every field of ``tree`` (and of the objects in it), and fields ``extra`` it does not carry."""
    found: list[tuple[str, ...]] = [(key,) for key in extra if key not in tree]
    for key, value in tree.items():
        found.append((key,))
        if isinstance(value, dict):
            found += [(key, *rest) for rest in paths(value)]
    return found


@st.composite
def confused(draw: st.DrawFn, tree: dict[str, Json], extra: tuple[str, ...] = ()) -> tuple[tuple[str, ...], Json]:
    """``tree`` with one field (perhaps nested, perhaps absent before) holding a value of another JSON kind."""
    path = draw(st.sampled_from(paths(tree, extra)))
    kinds = [k for k in BY_KIND if k != kind_of(lookup(tree, path))]
    value = draw(st.sampled_from(kinds).flatmap(lambda kind: BY_KIND[kind]))
    return path, replaced(tree, path, value)


def truncations(body: bytes) -> st.SearchStrategy[bytes]:
    return st.integers(min_value=0, max_value=len(body) - 1).map(lambda cut: body[:cut])


INVALID_UTF8 = st.sampled_from([b"\xff", b"\x80", b"\xc0\xaf", b"\xed\xa0\x80", b"\xe2\x82", b"\xf5\x80\x80\x80"])


@st.composite
def non_utf8(draw: st.DrawFn, tree: dict[str, Json]) -> tuple[str, bytes]:
    """``tree`` with bytes that are not UTF-8 in one string field (or in one it does not know), or all
    of it in another encoding."""
    if draw(st.booleans()):
        encoding = draw(st.sampled_from(["utf-16", "utf-16-be", "utf-32", "latin-1", "cp1252"]))
        text = json.dumps({**tree, "description": "é€ß"}, ensure_ascii=False)
        return encoding, text.encode(encoding, errors="replace")
    field = draw(st.sampled_from([*(k for k, v in tree.items() if isinstance(v, str)), "unknown_field"]))
    marker = "\x00MARK\x00"
    inside = draw(st.text(max_size=3)).encode() + draw(INVALID_UTF8) + draw(st.text(max_size=3)).encode()
    return field, encode(replaced(tree, (field,), marker)).replace(encode(marker), b'"' + inside + b'"')


def padded(tree: dict[str, Json], path: tuple[str, ...], size: int, fill: Callable[[int], Json]) -> bytes:
    """``tree`` with ``fill(n)`` at ``path``, ``n`` as large as keeps the body within ``size`` bytes."""
    n = size - len(encode(replaced(tree, path, fill(0))))
    body = encode(replaced(tree, path, fill(n)))
    while len(body) > size:  # a fill that grows faster than a byte a unit: shrink to fit
        n -= max(1, len(body) - size)
        body = encode(replaced(tree, path, fill(n)))
    return body


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner))
any_body = st.one_of(st.binary(max_size=300), st.text(max_size=100).map(str.encode), st.builds(encode, json_values))
tokens = st.from_regex(r"[A-Za-z0-9_-]{1,20}", fullmatch=True)


# -- PING, INFO and WPING: the body is not read ------------------------------------------------------------


@LIGHT
@given(body=any_body)
@example(body=b"")
@example(body=b"\xff\xfe\x00")
@example(body=nested(100_000))
def test_ping_answers_whatever_its_body(fuzzed: Fuzzed, body: bytes) -> None:
    envelope = one_envelope(exchange(fuzzed, "PING", body), control.PING_RESPONSE)
    assert envelope.error is None
    assert msgspec.json.decode(envelope.data, type=control.PingResponse).node_id == fuzzed.node_id
    still_healthy(fuzzed)


@LIGHT
@given(body=any_body, namespace=tokens)
@example(body=b"{", namespace="default")
def test_info_answers_whatever_its_body(fuzzed: Fuzzed, body: bytes, namespace: str) -> None:
    replies = exchange(fuzzed, "INFO", body, subject=fuzzed.subject("INFO", namespace))
    envelope = one_envelope(replies, control.INFO_RESPONSE)
    assert envelope.error is None
    assert msgspec.json.decode(envelope.data, type=control.InfoResponse).public_xkey == fuzzed.target.target_xkey
    still_healthy(fuzzed)


@LIGHT
@given(body=any_body, workload=st.none() | tokens)
@example(body=b"{", workload=None)
@example(body=b"", workload="fuzz")
def test_wping_stays_silent_when_no_workload_matches(fuzzed: Fuzzed, body: bytes, workload: str | None) -> None:
    assert exchange(fuzzed, "WPING", body, subject=subjects.wping(NAMESPACE, workload)) == []
    still_healthy(fuzzed)


def test_ping_info_and_wping_take_a_body_just_under_max_payload(fuzzed: Fuzzed) -> None:
    big = b"\xff" * (fuzzed.max_payload - 1)
    assert one_envelope(exchange(fuzzed, "PING", big), control.PING_RESPONSE).error is None
    assert one_envelope(exchange(fuzzed, "INFO", big), control.INFO_RESPONSE).error is None
    assert exchange(fuzzed, "WPING", big) == []
    still_healthy(fuzzed)


# -- DEPLOY ---------------------------------------------------------------------------------------------

DEPLOY_EXTRA = ("argv", "trigger_subjects", "retry_count", "jsdomain")  # DeployRequest fields the template lacks


@FUZZ
@given(data=st.data())
def test_deploy_with_one_field_of_the_wrong_kind_is_refused_naming_it(fuzzed: Fuzzed, data: st.DataObject) -> None:
    path, tree = data.draw(confused(fuzzed.deploy, DEPLOY_EXTRA))
    reason = deploy_refused(fuzzed, encode(tree))
    assert reason == fuzzed.deploy_refusal or names(reason, path[0]), f"{path}: {reason}"


@FUZZ
@given(
    field=st.sampled_from(
        ["sender_public_key", "environment", "workload_jwt", "workload_name", "hash", "type", "description"]
    ),
    value=st.text(max_size=80),
)
@example(field="sender_public_key", value="0").via("found: 'cannot open … sealed to another key', naming no field")
@example(field="sender_public_key", value="N" * 56)
def test_deploy_with_a_string_field_holding_another_string_is_refused_naming_it(
    fuzzed: Fuzzed, field: str, value: str
) -> None:
    reason = deploy_refused(fuzzed, encode({**fuzzed.deploy, field: value}))
    assert reason == fuzzed.deploy_refusal or names(reason, field), f"{field}: {reason}"


@FUZZ
@given(data=st.data())
def test_a_truncated_deploy_is_refused_as_not_json(fuzzed: Fuzzed, data: st.DataObject) -> None:
    body = data.draw(truncations(encode(fuzzed.deploy)))
    assert deploy_refused(fuzzed, body).startswith(f"{NOT_JSON} deploy request")


@FUZZ
@given(body=st.binary(max_size=400))
@example(body=b"")
@example(body=b"null")
@example(body=b"{}")
@example(body=b"[]")
@example(body=b'"\\ud800"')
@example(body=b"\xef\xbb\xbf{}")
@example(body=b"{" * 5000)
def test_random_bytes_are_refused_as_a_deploy(fuzzed: Fuzzed, body: bytes) -> None:
    reason = deploy_refused(fuzzed, body)
    ok, value = strict_json(body)
    if not ok or not isinstance(value, dict):
        assert reason.startswith(f"{NOT_JSON} deploy request"), reason


@FUZZ
@given(data=st.data())
def test_a_deploy_that_is_not_utf8_is_refused(fuzzed: Fuzzed, data: st.DataObject) -> None:
    where, body = data.draw(non_utf8(fuzzed.deploy))
    reason = deploy_refused(fuzzed, body)
    assert reason.startswith(f"{NOT_JSON} deploy request") or reason == fuzzed.deploy_refusal, f"{where}: {reason}"


def signed(fuzzed: Fuzzed, claims: Json, header: Json = crypto.JWT_HEADER) -> str:
    """A JWT of ``claims``, whatever they hold (JSON, or bytes as they are), signed by the requester's
    issuer key."""

    def part(value: Json) -> str:
        return base64.urlsafe_b64encode(value if isinstance(value, bytes) else encode(value)).decode().rstrip("=")

    signing_input = f"{part(header)}.{part(claims)}"
    signature = fuzzed.requester.keys.issuer.sign(signing_input.encode())
    return f"{signing_input}.{base64.urlsafe_b64encode(signature).decode().rstrip('=')}"


@FUZZ
@given(data=st.data())
def test_a_deploy_jwt_with_a_claim_of_the_wrong_kind_is_refused_naming_the_jwt(
    fuzzed: Fuzzed, data: st.DataObject
) -> None:
    path, claims = data.draw(confused(fuzzed.claims, ("exp", "nbf", "name", "aud")))
    reason = deploy_refused(fuzzed, encode({**fuzzed.deploy, "workload_jwt": signed(fuzzed, claims)}))
    assert reason == fuzzed.deploy_refusal or names(reason, "workload_jwt"), f"{path}: {reason}"


@pytest.mark.parametrize("part", ["header", "claims"])
def test_a_deploy_jwt_nested_too_deeply_is_refused_naming_it(fuzzed: Fuzzed, part: str) -> None:
    """Found: the header and the ``nats`` claims decode as ``dict[str, Any]``: msgspec's RecursionError
    escaped the JWT check ("Failed to deploy workload: internal error: maximum recursion depth …")."""
    header, claims = encode(crypto.JWT_HEADER), encode(fuzzed.claims)
    if part == "header":
        header = header.replace(b"{", b'{"x":' + nested(2_000) + b",", 1)
    else:
        claims = claims.replace(b'"nats":{', b'"nats":{"x":' + nested(2_000) + b",", 1)
    token = signed(fuzzed, claims, header)
    reason = deploy_refused(fuzzed, encode({**fuzzed.deploy, "workload_jwt": token}))
    assert names(reason, "workload_jwt"), reason
    assert "internal error" not in reason, reason


@FUZZ
@given(how=st.sampled_from(["header", "part", "cut"]), data=st.data())
def test_a_deploy_jwt_with_a_bad_header_signature_or_shape_is_refused_naming_it(
    fuzzed: Fuzzed, how: str, data: st.DataObject
) -> None:
    token: str = fuzzed.deploy["workload_jwt"]
    if how == "header":
        _, bad_header = data.draw(confused(dict(crypto.JWT_HEADER)))
        token = signed(fuzzed, fuzzed.claims, bad_header)
    elif how == "part":
        parts = token.split(".")
        parts[data.draw(st.integers(0, 2))] = data.draw(st.text(max_size=60))
        token = ".".join(parts)
    else:
        token = token[: data.draw(st.integers(0, len(token) - 1))]
    assert names(deploy_refused(fuzzed, encode({**fuzzed.deploy, "workload_jwt": token})), "workload_jwt")


def acceptable_environment(value: Json) -> bool:
    """A string map a program can be given (no empty name, no = in a name, no NUL)."""
    return isinstance(value, dict) and all(
        isinstance(v, str) and k and "=" not in k and "\0" not in k + v for k, v in value.items()
    )


environments = st.one_of(
    st.binary(max_size=100).filter(lambda b: not strict_json(b)[0]).map(lambda b: (False, b)),
    json_values.map(lambda v: (acceptable_environment(v), encode(v))),
    st.dictionaries(st.text(max_size=10), st.text(max_size=10), max_size=4).map(
        lambda m: (acceptable_environment(m), encode(m))
    ),
)


@FUZZ
@given(environment=environments)
@example(environment=(False, b'{"A=B":"c"}'))
@example(environment=(False, b'{"A":"\\u0000"}'))
@example(environment=(False, b'{"A":1}'))
@example(environment=(False, b'{"A":"\xff"}'))
@example(environment=(False, b"[]"))
@example(environment=(True, b"{}"))
def test_a_sealed_environment_that_is_not_a_string_map_is_refused_naming_it(
    fuzzed: Fuzzed, environment: tuple[bool, bytes]
) -> None:
    acceptable, plain = environment
    sealed = fuzzed.requester.keys.xkey.seal(plain, fuzzed.target.target_xkey)
    reason = deploy_refused(fuzzed, encode({**fuzzed.deploy, "environment": base64.b64encode(sealed).decode()}))
    assert reason == fuzzed.deploy_refusal if acceptable else names(reason, "environment"), reason


def sealed_environment(fuzzed: Fuzzed, n: int, *, bad_key: bool = False) -> str:
    """An environment of about ``n`` bytes once sealed; ``bad_key``: one whose name no program can get
    (an = in it), made of U+0085 (2 bytes in UTF-8, 4 characters in a repr)."""
    plain = encode({"\x85" * max(n * 3 // 8 - 32, 0) + "=": "x"} if bad_key else {"BIG": "a" * max(n * 3 // 4 - 32, 0)})
    return base64.b64encode(fuzzed.requester.keys.xkey.seal(plain, fuzzed.target.target_xkey)).decode()


def jwt_named(fuzzed: Fuzzed, n: int) -> str:
    """The deploy's JWT, signed again, naming the workload with about ``n`` bytes' worth of U+0085."""
    return signed(fuzzed, {**fuzzed.claims, "nats": {**fuzzed.claims["nats"], "name": "\x85" * max(n * 3 // 8, 0)}})


#: deploys of a given size: the field that carries the bulk, how to fill it with n units, and the field
#: the refusal must name (None: the answer to the untouched request)
BIG_DEPLOYS: dict[str, tuple[tuple[str, ...], Callable[[Fuzzed, int], Json], str | None]] = {
    "description": (("description",), lambda f, n: "a" * n, None),
    "unknown field": (("unknown_field",), lambda f, n: "a" * n, None),
    "argv": (("argv",), lambda f, n: ["a"] * max(n // 4, 0), None),
    "environment": (("environment",), sealed_environment, None),
    "workload_name": (("workload_name",), lambda f, n: "a" * n, "workload_name"),
    "workload_name, unprintable": (("workload_name",), lambda f, n: "\x85" * (n // 2), "workload_name"),
    "the JWT's name, unprintable": (("workload_jwt",), jwt_named, "workload_name"),
    "environment, a bad name": (("environment",), lambda f, n: sealed_environment(f, n, bad_key=True), "environment"),
    "workload_jwt": (("workload_jwt",), lambda f, n: "a" * n, "workload_jwt"),
    "sender_public_key": (("sender_public_key",), lambda f, n: "X" * n, "sender_public_key"),
    "hash": (("hash",), lambda f, n: "a" * n, "hash"),
}


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(shape=st.sampled_from(sorted(BIG_DEPLOYS)), margin=st.integers(min_value=1, max_value=512))
@example(shape="workload_name, unprintable", margin=1).via("repr() of U+0085 takes 4 bytes to its 2 in UTF-8")
@example(shape="the JWT's name, unprintable", margin=1).via("the same, in 'workload name … must match'")
@example(shape="environment, a bad name", margin=1).via("the same, in 'environment variable … cannot be passed'")
def test_a_deploy_just_under_max_payload_gets_one_clear_answer(fuzzed: Fuzzed, shape: str, margin: int) -> None:
    path, fill, field = BIG_DEPLOYS[shape]
    body = padded(fuzzed.deploy, path, fuzzed.max_payload - margin, lambda n: fill(fuzzed, n))
    reason = deploy_refused(fuzzed, body)
    if field is None:
        assert reason == fuzzed.deploy_refusal, f"{shape}: {reason[:300]}"
    else:
        assert names(reason, field), f"{shape}: {reason[:300]}"
    assert len(reason) < 1024, f"{shape}: a reason of {len(reason)} characters echoes the body"


@pytest.mark.parametrize("start", [b"x", b"{", b'{"a":"'], ids=["garbage", "open brace", "open string"])
def test_a_deploy_of_garbage_just_under_max_payload_is_refused_as_not_json(fuzzed: Fuzzed, start: bytes) -> None:
    body = start + b"x" * (fuzzed.max_payload - 1 - len(start))
    assert deploy_refused(fuzzed, body).startswith(f"{NOT_JSON} deploy request")


# -- STOP -----------------------------------------------------------------------------------------------


@FUZZ
@given(data=st.data())
def test_stop_with_one_field_of_the_wrong_kind_is_refused_naming_it(fuzzed: Fuzzed, data: st.DataObject) -> None:
    path, tree = data.draw(confused(fuzzed.stop))
    reason = stop_refused(fuzzed, encode(tree))
    # nothing runs: a stop that decodes is refused for its workload_id, whatever else it holds
    assert reason == fuzzed.stop_refusal or names(reason, path[0]) or "No such workload" in reason, f"{path}: {reason}"


@FUZZ
@given(data=st.data())
def test_a_truncated_stop_is_refused_as_not_json(fuzzed: Fuzzed, data: st.DataObject) -> None:
    assert stop_refused(fuzzed, data.draw(truncations(encode(fuzzed.stop)))).startswith(f"{NOT_JSON} stop request")


@FUZZ
@given(body=st.binary(max_size=300))
@example(body=b"")
@example(body=b"{}")
@example(body=b"null")
def test_random_bytes_are_refused_as_a_stop(fuzzed: Fuzzed, body: bytes) -> None:
    reason = stop_refused(fuzzed, body)
    ok, value = strict_json(body)
    if not ok or not isinstance(value, dict):
        assert reason.startswith(f"{NOT_JSON} stop request"), reason


@FUZZ
@given(data=st.data())
def test_a_stop_that_is_not_utf8_is_refused(fuzzed: Fuzzed, data: st.DataObject) -> None:
    where, body = data.draw(non_utf8(fuzzed.stop))
    reason = stop_refused(fuzzed, body)
    assert reason.startswith(f"{NOT_JSON} stop request") or reason == fuzzed.stop_refusal, f"{where}: {reason}"


@pytest.mark.parametrize("field", ["workload_jwt", "target_node", "unknown_field"])
def test_a_stop_just_under_max_payload_gets_one_clear_answer(fuzzed: Fuzzed, field: str) -> None:
    assert stop_refused(fuzzed, padded(fuzzed.stop, (field,), fuzzed.max_payload - 1, "a".__mul__)) == (
        fuzzed.stop_refusal
    )


# -- LAMEDUCK: bodies that are no lame duck request (a valid one ends the module) -------------------------


@st.composite
def bad_deadlines(draw: st.DrawFn) -> bytes:
    others = draw(st.dictionaries(st.text(max_size=8).filter(lambda k: k != "deadline_ms"), scalars, max_size=3))
    kinds = [k for k in BY_KIND if k not in ("int", "null")]
    deadline = draw(
        st.sampled_from(kinds).flatmap(lambda kind: BY_KIND[kind])
        | st.integers(max_value=-1)
        | st.integers(min_value=2**63, max_value=10**500)
    )
    return encode({**others, "deadline_ms": deadline})


@FUZZ
@given(body=bad_deadlines())
@example(body=b'{"deadline_ms":-1}')
@example(body=b'{"deadline_ms":1.5}')
@example(body=b'{"deadline_ms":"10s"}')
@example(body=b'{"deadline_ms":true}')
@example(body=b'{"deadline_ms":9223372036854775808}')
@example(body=b'{"deadline_ms":' + b"9" * 400 + b"}").via("found: OverflowError, an internal-error envelope")
def test_lameduck_with_a_deadline_that_is_no_count_of_ms_is_refused_naming_it(fuzzed: Fuzzed, body: bytes) -> None:
    assert "deadline_ms" in lameduck_refused(fuzzed, body)


@FUZZ
@given(body=any_body.filter(lambda b: not lameduck_acceptable(b)))
@example(body=b"\x0b").via("bytes.strip() took a vertical tab for an empty body: lame duck")
@example(body=b"\x0c").via("bytes.strip() took a form feed for an empty body: lame duck")
@example(body=b'{"unknown_field":"\xff"}').via("msgspec skips a field it ignores without checking its UTF-8")
@example(body=b'{"deadline_ms":5,"unknown_field":"\xed\xa0\x80"}').via("the same, with a deadline")
@example(body=b'{"unknown_field":' + nested(2_000) + b"}").via("RecursionError: an internal-error envelope")
@example(body=b"null")
@example(body=b"[]")
@example(body=b'"x"')
def test_lameduck_with_a_body_that_is_no_request_is_refused(fuzzed: Fuzzed, body: bytes) -> None:
    lameduck_refused(fuzzed, body)


@FUZZ
@given(data=st.data())
def test_a_truncated_lameduck_is_refused(fuzzed: Fuzzed, data: st.DataObject) -> None:
    whole = b'{"deadline_ms":12345,"unknown_field":"x"}'
    lameduck_refused(fuzzed, data.draw(truncations(whole).filter(bool)))


@pytest.mark.parametrize("shape", ["garbage", "negative deadline", "nested"])
def test_lameduck_with_a_bad_body_just_under_max_payload_is_refused(fuzzed: Fuzzed, shape: str) -> None:
    size = fuzzed.max_payload - 1
    if shape == "garbage":
        body = b"x" * size
    elif shape == "negative deadline":
        body = padded({"deadline_ms": -1}, ("unknown_field",), size, "a".__mul__)
    else:
        depth = (size - 40) // 2
        body = b'{"unknown_field":' + nested(depth) + b',"deadline_ms":0}'
    lameduck_refused(fuzzed, body)


# -- findings in the workload manager, its artifact lookup and the JWT decoder: pinned -------------------


@pytest.mark.parametrize("depth", [2_000, 500_000])
def test_pinned_a_deploy_nested_too_deeply_is_refused_as_not_json(fuzzed: Fuzzed, depth: int) -> None:
    """Found: 'Failed to deploy workload: internal error: maximum recursion depth exceeded …'."""
    body = b'{"unknown_field":' + nested(depth) + b"}"
    assert deploy_refused(fuzzed, body, PIN_DEADLINE).startswith(f"{NOT_JSON} deploy request")


def test_pinned_a_stop_nested_too_deeply_is_refused_as_not_json(lone: Fuzzed) -> None:
    """Found: no reply; the RecursionError crashes the workload manager (six such stops in 30 s, and
    the node's supervisor gives up: the node exits)."""
    body = b'{"unknown_field":' + nested(2_000) + b"}"
    assert stop_refused(lone, body, PIN_DEADLINE).startswith(f"{NOT_JSON} stop request")


@pytest.mark.parametrize(
    ("path", "value", "field"),
    [
        (("location", "Host"), "a b", "location"),
        (("location", "Host"), "a.b", "location"),
        (("location", "Host"), "*", "location"),
        (("location",), "nats://NEXCLI\r\nFILES/fuzz", "location"),  # urlsplit drops the CR LF: another bucket
        (("jsdomain",), "a b", "jsdomain"),
        (("jsdomain",), ">", "jsdomain"),
    ],
)
def test_pinned_a_location_that_is_no_subject_token_is_refused_naming_it(
    fuzzed: Fuzzed, path: tuple[str, ...], value: str, field: str
) -> None:
    """Found: 'internal error: nats: invalid stream name …' or '… invalid subject', or (CR LF) the
    object of a bucket the request did not name."""
    reason = deploy_refused(fuzzed, encode(replaced(fuzzed.deploy, path, value)), PIN_DEADLINE)
    assert names(reason, field), reason
    assert "internal error" not in reason, reason


@pytest.mark.parametrize("typ", [None, 1, "JWS", ""])
def test_pinned_a_jwt_whose_header_is_no_jwt_header_is_refused(fuzzed: Fuzzed, typ: Json) -> None:
    """Found: only ``alg`` is checked; Go's ``Header.Valid`` refuses a ``typ`` other than "JWT"."""
    token = signed(fuzzed, fuzzed.claims, {**crypto.JWT_HEADER, "typ": typ})
    reason = deploy_refused(fuzzed, encode({**fuzzed.deploy, "workload_jwt": token}), PIN_DEADLINE)
    assert names(reason, "workload_jwt"), reason


def test_pinned_an_unknown_jsdomain_is_refused_naming_it(fuzzed: Fuzzed) -> None:
    reason = deploy_refused(fuzzed, encode({**fuzzed.deploy, "jsdomain": "nosuch"}), PIN_DEADLINE)
    assert names(reason, "jsdomain"), reason
    assert "internal error" not in reason, reason


@pytest.mark.parametrize("path", [("location", "Host"), ("jsdomain",)], ids=["bucket", "jsdomain"])
def test_pinned_a_bucket_or_domain_longer_than_a_protocol_line_is_refused(lone: Fuzzed, path: tuple[str, ...]) -> None:
    """Found: the JetStream request's subject is longer than the server's max_control_line (4 KiB): the
    server closes the node's control connection; the deploy gets no reply, its reply on the closed
    connection crashes the workload manager, whose restarts fail while it is closed: the node exits."""
    reason = deploy_refused(lone, encode(replaced(lone.deploy, path, "B" * 5000)), PIN_DEADLINE)
    assert names(reason, path[0]), reason


@pytest.mark.parametrize(
    ("path", "fill"),
    [
        (("type",), "a".__mul__),
        (("location",), lambda n: "nats:" + "/" * n),  # artifact.Location.parse: "… not {url!r}"
        (("location", "Path"), lambda n: "/" + "k" * n),  # store.describe: "no object {key!r} in …"
    ],
    ids=["type", "location", "location key"],
)
def test_pinned_a_reason_quotes_a_big_field_cut_short(
    fuzzed: Fuzzed, path: tuple[str, ...], fill: Callable[[int], str]
) -> None:
    """Found: the reason quotes the field whole (here the reply still fits: the rest of the request is
    larger than the envelope)."""
    reason = deploy_refused(fuzzed, padded(fuzzed.deploy, path, fuzzed.max_payload - 1, fill), PIN_DEADLINE)
    assert names(reason, path[0]), reason[:300]
    assert len(reason) < 1024, f"a reason of {len(reason)} characters echoes the body"


@pytest.mark.parametrize("verb", ["DEPLOY", "STOP"])
def test_pinned_a_reason_that_echoes_a_big_field_still_fits_in_a_reply(lone: Fuzzed, verb: str) -> None:
    """Found: ``{"type": "aaa…"}`` (a deploy) or ``{"workload_id": "aaa…"}`` (a stop) of max_payload bytes
    is refused with a reason that quotes the field whole; the envelope around it exceeds max_payload,
    nats-py raises MaxPayloadError in the workload manager's _respond, which lets it through: no reply,
    and the manager crashes (the node exits after six)."""
    field, template = ("type", {}) if verb == "DEPLOY" else ("workload_id", {"workload_jwt": "x"})
    body = padded(template, (field,), lone.max_payload - 1, "a".__mul__)
    reason = (deploy_refused if verb == "DEPLOY" else stop_refused)(lone, body, PIN_DEADLINE)
    assert names(reason, field) or "No such workload" in reason, reason
    assert len(reason) < 1024, f"a reason of {len(reason)} characters echoes the body"


# -- the checks the workload manager is to use, on their own ------------------------------------------


@given(value=st.text(max_size=5000))
@example(value="\x85" * 5000)
def test_a_quoted_value_is_short_whatever_it_holds(value: str) -> None:
    text = checks.shown(value)
    assert len(text) <= 10 * checks.SHOWN + 40, "a repr takes at most 10 characters a character"
    assert text.startswith(repr(value[: checks.SHOWN])[:-1])


@pytest.mark.parametrize(
    ("location", "jsdomain", "reason"),
    [
        ("nats://NEXCLIFILES/fuzz", None, ""),
        ({"Scheme": "nats", "Host": "B", "Path": "/k"}, "hub_1", ""),
        ("nats://a b/k", None, "location's bucket 'a b'"),
        ("nats://a.b/k", None, "location's bucket 'a.b'"),
        ("nats://NEXCLI\r\nFILES/k", None, "holds a control character"),
        ("nats://" + "B" * 256 + "/k", None, "location's bucket"),
        ("nats://B/" + "k" * 2049, None, "longer than 2048 bytes"),
        ("http://B/k", None, "location must be nats://BUCKET/key"),
        ("nats://B/k", "a.b", "jsdomain 'a.b'"),
        ("nats://B/k", "d" * 5000, "jsdomain 'ddd"),
    ],
)
def test_an_artifact_location_must_fit_in_a_subject(location: Json, jsdomain: str | None, reason: str) -> None:
    request = msgspec.convert({"location": location, "jsdomain": jsdomain}, control.DeployRequest)
    if not reason:
        assert str(checks.artifact_location(request)).startswith("nats://")
        return
    with pytest.raises(checks.Refused, match=re.escape(reason)) as refused:
        checks.artifact_location(request)
    assert len(str(refused.value)) < 1024


@pytest.mark.parametrize("body", [b"{", b"[" * 5000, b'{"x":' + nested(2_000) + b"}", b"\xff"])
def test_a_body_that_is_no_request_is_refused_as_such(body: bytes) -> None:
    with pytest.raises(checks.Refused, match=r"^Unable to deserialize stop request: "):
        checks.decode(body, control.StopRequest, "stop")
