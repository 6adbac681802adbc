"""The agent program against a real nats-server, with the test playing the node."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import msgspec
import nats
import pytest

from nex.api import agent as api

from .support import NatsServerProc

pytestmark = pytest.mark.integration


def start_agent(server: NatsServerProc, vmid: str, home: Path) -> subprocess.Popen[bytes]:
    """An agent as the spawn launcher starts one: its metadata through an inherited pipe, no environment."""
    meta = api.MachineMetadata(vmid=vmid, node_nats_host="127.0.0.1", node_nats_port=server.port)
    meta_r, meta_w = os.pipe()
    os.write(meta_w, msgspec.json.encode(meta))
    os.close(meta_w)
    try:
        with (home / f"{vmid}.log").open("ab") as log:
            return subprocess.Popen(
                [sys.executable, "-m", "nex.agent", "--metadata-fd", str(meta_r), "--machine", str(home)],
                env={"PATH": os.environ.get("PATH", "")},
                stdout=log,
                stderr=log,
                pass_fds=[meta_r],
            )
    finally:
        os.close(meta_r)


async def play_node(url: str, vmid: str, *, undeploy: bool) -> dict[str, object]:
    nc = await nats.connect(url)
    hello: asyncio.Queue[bytes] = asyncio.Queue()

    async def on_handshake(msg: nats.aio.msg.Msg) -> None:
        await msg.respond(b"{}")
        await hello.put(msg.data)

    await nc.subscribe(api.handshake(vmid), cb=on_handshake)
    await nc.flush()
    seen: dict[str, object] = {}
    seen["handshake"] = msgspec.json.decode(await asyncio.wait_for(hello.get(), 20), type=api.HandshakeRequest)
    seen["ping"] = (await nc.request(api.ping(vmid), b"", timeout=5)).data
    deploy = await nc.request(api.deploy(vmid), b"{}", timeout=5)
    seen["deploy"] = msgspec.json.decode(deploy.data, type=api.DeployResponse)
    if undeploy:
        seen["undeploy"] = (await nc.request(api.undeploy(vmid), b"", timeout=5)).data
    await nc.close()
    return seen


def test_the_agent_handshakes_answers_and_exits_on_undeploy(home: Path, nats_server: NatsServerProc) -> None:
    agent = start_agent(nats_server, "dc16testagent0000001", home)
    seen = asyncio.run(play_node(nats_server.url, "dc16testagent0000001", undeploy=True))
    hello = seen["handshake"]
    assert isinstance(hello, api.HandshakeRequest)
    assert hello.id == "dc16testagent0000001"
    assert hello.start_time.endswith("Z")
    assert seen["ping"] == b"OK"
    deploy = seen["deploy"]
    assert isinstance(deploy, api.DeployResponse)
    assert deploy.accepted is False
    assert deploy.message
    assert seen["undeploy"] == b""
    assert agent.wait(20) == 0
    assert "undeployed" in (home / "dc16testagent0000001.log").read_text()


def test_the_agent_exits_when_its_node_is_gone(home: Path, nats_server: NatsServerProc) -> None:
    agent = start_agent(nats_server, "dc16testagent0000002", home)
    asyncio.run(play_node(nats_server.url, "dc16testagent0000002", undeploy=False))
    nats_server.stop()  # the node's internal server goes away and does not come back
    assert agent.wait(30) == 0
    assert "lost the node" in (home / "dc16testagent0000002.log").read_text()


def test_the_agent_refuses_to_run_without_metadata(home: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "nex.agent"], env={"PATH": ""}, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2
    assert "missing --metadata-fd" in result.stderr
    meta_r, meta_w = os.pipe()
    os.write(meta_w, b'{"vmid": 1}')
    os.close(meta_w)
    bad = subprocess.run(
        [sys.executable, "-m", "nex.agent", "--metadata-fd", str(meta_r)],
        env={"PATH": ""},
        capture_output=True,
        text=True,
        timeout=60,
        pass_fds=[meta_r],
    )
    os.close(meta_r)
    assert bad.returncode == 2
    assert "malformed machine metadata: Expected `str`, got `int` - at `$.vmid`" in bad.stderr
