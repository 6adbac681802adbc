"""Deploy and stop requests, built byte for byte as nex's Go client builds them.

``controlapi.NewDeployRequest`` (nex v0.2.7) signs a generic-claims JWT with the issuer's account key
(``sub`` = a fresh request id, ``nats`` = ``{hash, name, version: 2}``), seals the environment to the
node's xkey (xkv1, base64), and marshals ``DeployRequest`` with Go's field order, ``null`` for unset
pointers and ``location`` as Go's ``url.URL`` struct. ``NewStopRequest`` signs a new JWT whose
``sub`` is the workload name. Using the same bytes means this client works with Go nodes and the
Go client works with this node; ``tests/vectors/`` pins the format.
"""

from __future__ import annotations

import base64
import uuid
from dataclasses import dataclass, field

import nkeys

from nex import crypto
from nex.api import gojson


@dataclass(frozen=True)
class Deploy:
    """What a deploy says; :func:`deploy_request` turns it into the wire bytes."""

    location: str  # nats://BUCKET/key
    name: str
    hash: str  # sha256 hex of the artifact
    node_id: str
    node_xkey: str  # the recipient of the sealed environment
    environment: dict[str, str] = field(default_factory=dict)
    argv: list[str] = field(default_factory=list)
    description: str = ""
    essential: bool = False
    workload_type: str = "native"
    jsdomain: str = ""


def deploy_request(
    deploy: Deploy,
    issuer: nkeys.KeyPair,
    sender: crypto.XKey,
    *,
    request_id: str | None = None,
    issued_at: int | None = None,
    nonce: bytes | None = None,
) -> bytes:
    """The ``$NEX.DEPLOY.{ns}.{node}`` body. ``request_id``, ``issued_at`` and ``nonce`` pin test vectors."""
    rid = request_id or str(uuid.uuid4())
    token = crypto.encode_generic_jwt(issuer, rid, {"hash": deploy.hash, "name": deploy.name}, issued_at=issued_at)
    return _body(deploy, token, rid, sender, nonce)


def forwarded_request(deploy: Deploy, token: str, request_id: str, sender: crypto.XKey) -> bytes:
    """A deploy request that passes a workload on to ``deploy.node_id`` under its issuer's own JWT
    ``token`` (a node cannot sign for the issuer), its environment sealed anew, from ``sender`` (the
    node's xkey) to the new node's: what a node in lame duck sends to move a workload."""
    return _body(deploy, token, request_id, sender, None)


def _body(deploy: Deploy, token: str, rid: str, sender: crypto.XKey, nonce: bytes | None) -> bytes:
    sealed = sender.seal(gojson.dumps(gojson.go_map(deploy.environment)), deploy.node_xkey, nonce=nonce)
    body: dict[str, object] = {}
    if deploy.argv:
        body["argv"] = deploy.argv
    body["description"] = deploy.description
    body["hash"] = None  # NewDeployRequest never sets it: the hash travels in the JWT
    body["location"] = gojson.url(deploy.location)
    body["essential"] = deploy.essential
    body["environment"] = base64.b64encode(sealed).decode()
    body["id"] = rid
    if deploy.jsdomain:
        body["jsdomain"] = deploy.jsdomain
    body["sender_public_key"] = sender.public_key
    body["target_node"] = deploy.node_id
    body["workload_name"] = deploy.name
    body["workload_jwt"] = token
    body["type"] = deploy.workload_type
    return gojson.dumps(body)


def stop_request(
    workload_id: str, name: str, node_id: str, issuer: nkeys.KeyPair, *, issued_at: int | None = None
) -> bytes:
    """The ``$NEX.STOP.{ns}.{node}`` body: a fresh JWT from the deploying issuer, ``sub`` = the name."""
    token = crypto.encode_generic_jwt(issuer, name, {}, issued_at=issued_at)
    return gojson.dumps({"workload_id": workload_id, "workload_jwt": token, "target_node": node_id})
