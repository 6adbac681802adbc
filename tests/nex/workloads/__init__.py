"""Workloads for the tests: real static ELF binaries built with gcc, and a requester that deploys them.

The binaries are built once per test session from the C sources beside this file. A host without gcc
or a static libc skips the tests that need them, saying so.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec

from nex import crypto
from nex.api import control
from nex.client import Artifact, NexClient, RequesterKeys, deploy_body

from ..support import Bus

SOURCES = Path(__file__).parent


class BuildUnavailable(Exception):
    """This host cannot build the test binaries; the message says why."""


@dataclass(frozen=True)
class Binaries:
    echo: bytes  # static: the NATS echo service (ECHO_EXIT=N makes it exit N at once)
    echo_dynamic: bytes  # the same, dynamically linked
    script: bytes  # a shell script
    hostile: bytes  # static: a tenant that attacks its sandbox (see hostile.c); never run it on the host


def build(directory: Path) -> Binaries:
    """Compile the test workloads into ``directory``."""
    gcc = shutil.which("gcc")
    if gcc is None:
        raise BuildUnavailable("gcc is not installed (apt-get install gcc libc6-dev)")
    outputs = {
        "echo": ("echo.c", ["-static"]),
        "echo_dynamic": ("echo.c", []),
        "hostile": ("hostile.c", ["-static", "-pthread"]),
    }
    for name, (source, flags) in outputs.items():
        result = subprocess.run(
            [gcc, *flags, "-O2", "-o", str(directory / name), str(SOURCES / source)],
            capture_output=True,
            text=True,
            check=False,
        )
        if result.returncode != 0:
            raise BuildUnavailable(f"gcc {' '.join(flags)} failed (a static libc is needed): {result.stderr.strip()}")
    return Binaries(
        echo=(directory / "echo").read_bytes(),
        echo_dynamic=(directory / "echo_dynamic").read_bytes(),
        script=b"#!/bin/sh\necho hello from a script\n",
        hostile=(directory / "hostile").read_bytes(),
    )


def attacks(lines: list[str]) -> dict[str, tuple[str, str]]:
    """hostile.c's ``ATTACK name status detail`` lines as name -> (status, detail)."""
    found = {}
    for line in lines:
        if line.startswith("ATTACK "):
            _, name, status, *detail = line.split(" ", 3)
            found[name] = (status, detail[0] if detail else "")
    return found


class Requester:
    """Someone deploying workloads: an issuer account key, an xkey, and a client on the test's bus."""

    def __init__(self, bus: Bus, namespace: str = "default") -> None:
        self.bus = bus
        self.keys = RequesterKeys(crypto.create_signing_key(crypto.PREFIX_ACCOUNT), crypto.XKey.generate())
        self.client = NexClient(bus.nc, timeout=5, namespace=namespace)
        self.namespace = namespace

    @property
    def issuer(self) -> str:
        return str(self.keys.issuer.public_key.decode())

    def upload(self, data: bytes, key: str) -> Artifact:
        return self.bus.run(self.client.upload(data, key))

    def deploy_body(
        self,
        node: control.PingResponse,
        artifact: Artifact,
        name: str,
        environment: dict[str, str] | None = None,
        **options: Any,
    ) -> bytes:
        return deploy_body(artifact, node, name, self.keys, environment=environment, **options)

    def deploy(self, node_id: str, body: bytes) -> control.ReceivedEnvelope:
        """The node's one answer to a DEPLOY (a failure envelope is returned, not raised)."""
        subject = f"$NEX.DEPLOY.{self.namespace}.{node_id}"
        return msgspec.json.decode(self.bus.request(subject, body, timeout=30), type=control.ReceivedEnvelope)

    def stop(self, node_id: str, body: bytes) -> control.ReceivedEnvelope:
        subject = f"$NEX.STOP.{self.namespace}.{node_id}"
        return msgspec.json.decode(self.bus.request(subject, body, timeout=30), type=control.ReceivedEnvelope)


def started(envelope: control.ReceivedEnvelope) -> control.RunResponse:
    """The run response of a deploy that must have succeeded."""
    assert envelope.error is None, envelope.error
    return msgspec.json.decode(envelope.data, type=control.RunResponse)
