"""Every request the Firecracker driver sends, checked against Firecracker's own API document.

``tests/nex/data/firecracker-api.yaml`` is Firecracker's ``src/firecracker/swagger/firecracker.yaml``
as published at firecracker-microvm/firecracker@81b38b9 (2026-08-21; ``info.version`` 1.17.0-dev),
copied unchanged. This host cannot run Firecracker (see test_firecracker_e2e.py), so this is how the
driver's requests are shown right: the driver's real sequences (:func:`boot`, :func:`restore`, the
snapshot calls, the stop) run through the real client to a recorder at the other end of a unix socket
(a small h11 server in this file, which answers 204 to everything and is not Firecracker), and each
recorded request must name a path and method of the spec, and its body must validate against that
operation's body schema. The schemas are made strict first: Swagger lets an object have properties it
does not list, which would let a misspelt field through, so every object definition that lists its
properties (all but the MMDS contents, free-form by design) gets ``additionalProperties: false``.

Each check is shown able to fail: the same validator rejects a missing required field, a wrong enum
value, a misspelt field, a number out of range, a path or a method the spec does not have.

The tests named ``test_client_*`` test our HTTP client on the wire (method, path, headers, body,
errors, keep-alive), against the same recorder: they test the client, not Firecracker.
"""

from __future__ import annotations

import copy
import json
import os
import re
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import h11
import jsonschema
import msgspec
import pytest
import trio
import trio.testing
import yaml

from nex.api import agent as agent_api
from nex.config import MachineTemplate, load
from nex.net.netns import MachineNetwork
from nex.net.network import Networks
from nex.sandbox.policy import HostSupport, Sandbox
from nex.vm.drivers import firecracker as fc
from nex.vm.drivers import firecracker_template as fct
from nex.vm.drivers.base import DriverUnavailable
from nex.vm.drivers.firecracker_template import FirecrackerTemplate
from nex.vm.firecracker import api

SPEC_PATH = Path(__file__).parent / "data" / "firecracker-api.yaml"
SPEC: dict[str, Any] = yaml.safe_load(SPEC_PATH.read_text())
VMID = "cu8s1a2b3c4d5e6f7g8h"
SEED = "SUAGIEYODKBBTUMOB666Z5KA4FCWAZV7HWSGRHOD7MK6UM5IBJ5AHQ7EAA"  # a syntactically plausible nkey seed


# -- the spec, strict ---------------------------------------------------------------------------------


def _strict(definitions: dict[str, Any]) -> dict[str, Any]:
    strict = copy.deepcopy(definitions)

    def walk(schema: Any) -> None:
        if isinstance(schema, dict):
            if schema.get("type") == "object" and "properties" in schema and "additionalProperties" not in schema:
                schema["additionalProperties"] = False
            for value in schema.values():
                walk(value)
        elif isinstance(schema, list):
            for value in schema:
                walk(value)

    walk(strict)
    return strict


DEFINITIONS = _strict(SPEC["definitions"])


def validator(schema: dict[str, Any]) -> jsonschema.Draft4Validator:
    """A validator of ``schema`` (Swagger 2.0's schemas are JSON Schema draft 4), ``#/definitions/…``
    resolved against the spec's (strict) definitions."""
    return jsonschema.Draft4Validator({**schema, "definitions": DEFINITIONS})


def definition(name: str) -> jsonschema.Draft4Validator:
    assert name in SPEC["definitions"], f"the spec has no definition {name}"
    return validator({"$ref": f"#/definitions/{name}"})


def operation(method: str, path: str) -> dict[str, Any]:
    """The spec's operation for ``method`` on a concrete ``path`` (``/drives/rootfs`` matches
    ``/drives/{drive_id}``); AssertionError if the spec has none."""
    for template, operations in SPEC["paths"].items():
        pattern = "^" + re.sub(r"\\\{[^}]+\\\}", "[^/]+", re.escape(template)) + "$"
        if re.match(pattern, path):
            assert method.lower() in operations, f"the spec has no {method} on {template}"
            op: dict[str, Any] = operations[method.lower()]
            return op
    raise AssertionError(f"the spec has no path {path}")


def body_schema(method: str, path: str) -> dict[str, Any] | None:
    for parameter in operation(method, path).get("parameters", []):
        if parameter["in"] == "body":
            schema: dict[str, Any] = parameter["schema"]
            return schema
    return None


def check_request(method: str, path: str, body: bytes) -> None:
    """The request is in the spec and its body validates (AssertionError or ValidationError if not)."""
    schema = body_schema(method, path)
    if schema is None:
        assert body == b"", f"{method} {path} takes no body"
        return
    validator(schema).validate(json.loads(body))


def errors(name: str, instance: object) -> list[str]:
    return [e.message for e in definition(name).iter_errors(instance)]


def as_json(value: object) -> Any:
    return json.loads(api.body(value))


# -- a recorder at the other end of a unix socket ------------------------------------------------------


@dataclass
class Seen:
    method: str
    target: str
    headers: dict[str, str]
    body: bytes
    connection: int


@dataclass
class Recorder:
    """An HTTP/1.1 server on a unix socket (h11 on trio) that records each request and answers with
    ``answer(request)`` (default 204, no body). Not Firecracker: the other end of our client."""

    path: Path
    answer: Callable[[Seen], tuple[int, bytes]] = lambda seen: (204, b"")
    close_each: bool = False  # answer with "Connection: close" and hang up
    seen: list[Seen] = field(default_factory=list)
    raw: list[bytes] = field(default_factory=list)
    connections: int = 0

    async def serve(
        self, *, task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED
    ) -> None:
        sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
        await sock.bind(str(self.path))
        sock.listen(8)
        await trio.serve_listeners(self._handle, [trio.SocketListener(sock)], task_status=task_status)

    async def _handle(self, stream: trio.SocketStream) -> None:
        conn, index = h11.Connection(h11.SERVER), self.connections
        self.connections += 1
        raw = bytearray()
        self.raw.append(b"")
        async with stream:
            while True:
                method = target = ""
                headers: dict[str, str] = {}
                body = bytearray()
                while True:
                    event = conn.next_event()
                    if event is h11.NEED_DATA:
                        chunk = await stream.receive_some(65536)
                        raw += chunk
                        self.raw[index] = bytes(raw)
                        conn.receive_data(chunk)
                    elif isinstance(event, h11.Request):
                        method, target = event.method.decode(), event.target.decode()
                        headers = {k.decode().lower(): v.decode() for k, v in event.headers}
                    elif isinstance(event, h11.Data):
                        body += event.data
                    elif isinstance(event, h11.EndOfMessage):
                        break
                    elif isinstance(event, h11.ConnectionClosed):
                        return
                seen = Seen(method, target, headers, bytes(body), index)
                self.seen.append(seen)
                status, payload = self.answer(seen)
                reply_headers = [("Content-Type", "application/json")] if payload else []
                if status != 204:
                    reply_headers.append(("Content-Length", str(len(payload))))
                if self.close_each:
                    reply_headers.append(("Connection", "close"))
                out = conn.send(h11.Response(status_code=status, headers=reply_headers)) or b""
                if payload:
                    out += conn.send(h11.Data(data=payload)) or b""
                out += conn.send(h11.EndOfMessage()) or b""
                await stream.send_all(out)
                if conn.our_state is not h11.DONE or self.close_each:
                    return
                conn.start_next_cycle()


@pytest.fixture
async def recorder(tmp_path: Path) -> AsyncIterator[Recorder]:
    rec = Recorder(tmp_path / "api.sock")
    async with trio.open_nursery() as nursery:
        await nursery.start(rec.serve)
        yield rec
        nursery.cancel_scope.cancel()


# -- a realistic machine --------------------------------------------------------------------------------


def driver(tmp_path: Path, vcpus: int = 1, initrd: bool = False) -> fc.FirecrackerDriver:
    config = load(None, {"cni.subnet": "10.213.9.0/24", "cni.network_name": "nexfctest"}).config
    config.machine_template = MachineTemplate(vcpu_count=vcpus, memsize_mib=256 * vcpus)
    host = HostSupport(privileged=True, namespaced=True, user_namespaces=None, seccomp=None, cgroups="none here")
    images = tmp_path / "images"
    return fc.FirecrackerDriver(
        Networks(config, namespaced=True, lease_root=tmp_path / "leases"),
        Sandbox(config, host),
        kernel=images / "vmlinux",
        rootfs=images / "rootfs.ext4",
        initrd=images / "initrd.img" if initrd else None,
        template=config.machine_template,
    )


def machine_vm(tmp_path: Path, jailed: bool = False) -> fc._Vm:
    network = MachineNetwork(
        netns="nx0123456789", host_link="nx0123456789h", guest_link="veth0", address="10.213.9.2", prefixlen=32,
        gateway="10.213.9.1",
    )  # fmt: skip
    jailer = fc.Jailer("jailer") if jailed else None
    return fc._Vm(tmp_path / "vm" / VMID, VMID, network, fc.tap_name(VMID), "02:00:0a:d5:09:02", 0x7000_0002, jailer)


def template_of(tmp_path: Path, *, initrd: bool = False, vcpus: int = 1, digest: str = "d1") -> FirecrackerTemplate:
    images = tmp_path / "images"
    return FirecrackerTemplate(
        firecracker="firecracker",
        kernel=images / "vmlinux",
        rootfs=images / "rootfs.ext4",
        initrd=images / "initrd.img" if initrd else None,
        template=MachineTemplate(vcpu_count=vcpus, memsize_mib=256 * vcpus),
        image_digest=digest,
    )


def identity() -> agent_api.GuestIdentity:
    metadata = agent_api.MachineMetadata(
        vmid=VMID, node_nats_host="10.213.9.1", node_nats_port=9222, node_nats_nkey=SEED
    )
    return agent_api.GuestIdentity(
        metadata=metadata,
        network=agent_api.GuestNetwork(address="10.213.9.2", prefixlen=32, gateway="10.213.9.1"),
        time_ns=1_760_000_000_000_000_000,
        entropy="AAAA",
    )


def recorded(rec: Recorder) -> list[tuple[str, str]]:
    return [(s.method, s.target) for s in rec.seen]


# -- the driver's requests against the spec ------------------------------------------------------------


@pytest.mark.parametrize(("vcpus", "initrd"), [(1, False), (2, True), (2, False), (1, True)])
async def test_a_cold_boot_sends_only_requests_the_spec_accepts(
    recorder: Recorder, tmp_path: Path, vcpus: int, initrd: bool
) -> None:
    fcd, vm = driver(tmp_path, vcpus, initrd), machine_vm(tmp_path)
    config = fcd.config(vm)

    async with api.Client(recorder.path) as client:
        await fc.boot(client, config, identity())

    assert recorded(recorder) == [
        ("PUT", "/logger"),
        ("PUT", "/metrics"),
        ("PUT", "/machine-config"),
        ("PUT", "/boot-source"),
        ("PUT", "/drives/rootfs"),
        ("PUT", "/network-interfaces/eth0"),
        ("PUT", "/mmds/config"),
        ("PUT", "/mmds"),
        ("PUT", "/actions"),
    ]
    for seen in recorder.seen:
        check_request(seen.method, seen.target, seen.body)
    bodies = {s.target: json.loads(s.body) for s in recorder.seen}
    assert bodies["/machine-config"] == {"vcpu_count": vcpus, "mem_size_mib": 256 * vcpus}
    boot_source = bodies["/boot-source"]
    assert boot_source["kernel_image_path"] == str(tmp_path / "images" / "vmlinux")
    assert boot_source["boot_args"].startswith("console=ttyS0 reboot=k panic=1 pci=off quiet")
    assert ("initrd_path" in boot_source) == initrd
    assert bodies["/drives/rootfs"] == {
        "drive_id": "rootfs",
        "is_root_device": True,
        "path_on_host": str(tmp_path / "images" / "rootfs.ext4"),
        "is_read_only": True,
    }
    assert bodies["/network-interfaces/eth0"] == {
        "iface_id": "eth0",
        "host_dev_name": vm.tap,
        "guest_mac": "02:00:0a:d5:09:02",
    }
    assert re.fullmatch(r"nx[0-9a-f]{10}t", vm.tap)
    assert bodies["/mmds/config"] == {"network_interfaces": ["eth0"], "version": "V2"}
    assert bodies["/mmds"]["metadata"]["node_nats_nkey"] == SEED  # MMDS answers only this guest
    assert bodies["/actions"] == {"action_type": "InstanceStart"}
    assert bodies["/logger"]["log_path"].endswith(f"{VMID}/firecracker.log")
    assert bodies["/metrics"] == {"metrics_path": str(vm.dir / "firecracker.metrics")}


async def test_a_jailed_machine_names_paths_inside_its_jail(recorder: Recorder, tmp_path: Path) -> None:
    fcd, vm = driver(tmp_path, initrd=True), machine_vm(tmp_path, jailed=True)

    async with api.Client(recorder.path) as client:
        await fc.boot(client, fcd.config(vm), identity())

    for seen in recorder.seen:
        check_request(seen.method, seen.target, seen.body)
    bodies = {s.target: json.loads(s.body) for s in recorder.seen}
    assert bodies["/boot-source"]["kernel_image_path"] == "/vmlinux"
    assert bodies["/boot-source"]["initrd_path"] == "/initrd"
    # the host's path, inside the jail: a snapshot names its drive's path, and clones reopen it
    assert bodies["/drives/rootfs"]["path_on_host"] == str(tmp_path / "images" / "rootfs.ext4")
    assert ("images/rootfs.ext4", "rootfs.ext4") in [
        (str(source.relative_to(tmp_path)), Path(inside).name) for source, inside in fcd._images(vm)
    ]
    assert all(not Path(inside).is_absolute() for _, inside in fcd._images(vm))  # all of them inside
    assert bodies["/logger"]["log_path"] == "/firecracker.log"
    assert vm.chroot == vm.dir / "jail" / "firecracker" / VMID / "root"


async def test_a_clone_loads_the_snapshot_on_its_own_tap_then_gets_its_identity(
    recorder: Recorder, tmp_path: Path
) -> None:
    fcd, vm = driver(tmp_path), machine_vm(tmp_path)
    snapshot = fc.Snapshot(tmp_path / "images" / "template.state", tmp_path / "images" / "template.mem")

    async with api.Client(recorder.path) as client:
        await fc.restore(client, fcd.config(vm), snapshot, vm.tap, identity())

    assert recorded(recorder) == [("PUT", "/logger"), ("PUT", "/metrics"), ("PUT", "/snapshot/load"), ("PUT", "/mmds")]
    for seen in recorder.seen:
        check_request(seen.method, seen.target, seen.body)
    assert json.loads(recorder.seen[2].body) == {
        "snapshot_path": str(tmp_path / "images" / "template.state"),
        "mem_backend": {"backend_type": "File", "backend_path": str(tmp_path / "images" / "template.mem")},
        "resume_vm": True,
        "network_overrides": [{"iface_id": "eth0", "host_dev_name": vm.tap}],
    }


async def test_a_template_boots_as_a_machine_would_but_without_an_identity(recorder: Recorder, tmp_path: Path) -> None:
    fcd, vm = driver(tmp_path, initrd=True), machine_vm(tmp_path)
    template = template_of(tmp_path, initrd=True)
    directory = tmp_path / "snapshots" / "k.fcsnap.partial"

    async with api.Client(recorder.path) as client:
        await fc.boot(client, template.config(directory), None)

    for seen in recorder.seen:
        check_request(seen.method, seen.target, seen.body)
    assert ("PUT", "/mmds") not in recorded(recorder)  # nothing in MMDS: no identity to clone
    bodies = {s.target: json.loads(s.body) for s in recorder.seen}
    clone = msgspec.to_builtins(fcd.config(vm))
    assert bodies["/boot-source"]["boot_args"].split() == [*fc.BOOT_ARGS.split(), "nex.template=1"]
    # what a clone keeps from its template must be what the clone's own config says
    assert bodies["/drives/rootfs"] == clone["drives"][0]
    assert bodies["/machine-config"] == clone["machine-config"]
    assert bodies["/mmds/config"] == clone["mmds-config"]
    assert bodies["/network-interfaces/eth0"]["iface_id"] == "eth0"
    assert bodies["/logger"]["log_path"] == str(directory / "firecracker.log")


def test_a_template_snapshot_is_named_by_version_image_and_shape(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    version = ["Firecracker v1.12.0"]
    monkeypatch.setattr(fct, "program_version", lambda _: version[0])
    base = template_of(tmp_path)
    key = base.key()
    assert template_of(tmp_path).key() == key
    assert template_of(tmp_path, digest="other").key() != key
    version[0] = "Firecracker v1.13.0"
    assert base.key() != key
    version[0] = "Firecracker v1.12.0"
    assert template_of(tmp_path, vcpus=2).key() != base.key()


async def test_the_template_is_saved_at_its_ready_marker_and_not_before(tmp_path: Path) -> None:
    read, write = os.pipe()
    console = tmp_path / "template.log"
    try:
        async with trio.lowlevel.FdStream(read) as stream, trio.open_nursery() as nursery:
            done = trio.Event()

            async def wait() -> None:
                await fct._wait_for_marker(stream, console)
                done.set()

            nursery.start_soon(wait)
            os.write(write, b"[    0.1] Linux version 6.1\nnex-guest: ready for an iden")
            await trio.testing.wait_all_tasks_blocked()
            assert not done.is_set()  # half a marker is not one
            os.write(write, b"tity\n")
            with trio.fail_after(5):
                await done.wait()
        assert console.read_bytes().endswith(b"ready for an identity\n")

        read, write2 = os.pipe()
        os.write(write2, b"Kernel panic - not syncing: VFS: Unable to mount root fs\n")
        os.close(write2)
        async with trio.lowlevel.FdStream(read) as stream:
            with pytest.raises(fct.TemplateFailed, match=r"ended before its agent was ready.*Unable to mount root"):
                await fct._wait_for_marker(stream, console)
    finally:
        os.close(write)


async def test_a_snapshot_pauses_then_writes_a_full_snapshot(recorder: Recorder, tmp_path: Path) -> None:
    async with api.Client(recorder.path) as client:
        await fc.create_snapshot(client, tmp_path / "s.state", tmp_path / "s.mem")

    assert recorded(recorder) == [("PATCH", "/vm"), ("PUT", "/snapshot/create")]
    for seen in recorder.seen:
        check_request(seen.method, seen.target, seen.body)
    assert json.loads(recorder.seen[0].body) == {"state": "Paused"}
    assert json.loads(recorder.seen[1].body)["snapshot_type"] == "Full"


async def test_stop_asks_the_guest_with_ctrl_alt_del_first(recorder: Recorder, tmp_path: Path) -> None:
    from nex import proc

    child = proc.spawn(["sleep", "30"])
    handle = fc.FirecrackerVm(child, api.Client(recorder.path))

    code = await handle.stop(0.2)  # sleep ignores Ctrl-Alt-Del, as a hung guest would: killed after grace

    assert recorded(recorder) == [("PUT", "/actions")]
    check_request("PUT", "/actions", recorder.seen[0].body)
    assert json.loads(recorder.seen[0].body) == {"action_type": "SendCtrlAltDel"}
    assert code == -9


def test_the_configuration_file_is_a_full_vm_configuration(tmp_path: Path) -> None:
    for vcpus, initrd in ((1, False), (2, True)):
        config = as_json(driver(tmp_path, vcpus, initrd).config(machine_vm(tmp_path)))
        definition("FullVmConfiguration").validate(config)
        assert set(config) == {
            "boot-source", "machine-config", "drives", "network-interfaces", "mmds-config", "logger", "metrics",
        }  # fmt: skip


def test_every_body_struct_validates_against_its_definition() -> None:
    bodies: list[tuple[str, object]] = [
        ("Logger", api.Logger(log_path="/x/firecracker.log", level="Info", show_level=True)),
        ("Metrics", api.Metrics(metrics_path="/x/firecracker.metrics")),
        ("MachineConfiguration", api.MachineConfiguration(vcpu_count=2, mem_size_mib=512, smt=False)),
        ("BootSource", api.BootSource(kernel_image_path="/k", boot_args="console=ttyS0", initrd_path="/i")),
        ("Drive", api.Drive(drive_id="rootfs", is_root_device=True, path_on_host="/r", is_read_only=True)),
        (
            "NetworkInterface",
            api.NetworkInterface(iface_id="eth0", host_dev_name="nx0123456789t", guest_mac="02:00:00:00:00:01"),
        ),
        ("MmdsConfig", api.MmdsConfig(network_interfaces=["eth0"], version="V2")),
        ("MmdsContentsObject", identity()),
        ("Vm", api.Vm(state="Paused")),
        ("Vm", api.Vm(state="Resumed")),
        (
            "SnapshotCreateParams",
            api.SnapshotCreateParams(snapshot_path="/s", mem_file_path="/m", snapshot_type="Full"),
        ),
        (
            "SnapshotLoadParams",
            api.SnapshotLoadParams(
                snapshot_path="/s",
                mem_backend=api.MemoryBackend(backend_type="File", backend_path="/m"),
                resume_vm=True,
            ),
        ),
        ("InstanceActionInfo", api.InstanceActionInfo(action_type="InstanceStart")),
        ("InstanceActionInfo", api.InstanceActionInfo(action_type="SendCtrlAltDel")),
        ("InstanceActionInfo", api.InstanceActionInfo(action_type="FlushMetrics")),
    ]
    for name, body in bodies:
        assert errors(name, as_json(body)) == [], name


# -- the checks can fail ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "body", "expected"),
    [
        ("MachineConfiguration", {"mem_size_mib": 256}, "'vcpu_count' is a required property"),
        ("MachineConfiguration", {"vcpu_count": 0, "mem_size_mib": 256}, "0 is less than the minimum of 1"),
        ("MachineConfiguration", {"vcpus": 1, "vcpu_count": 1, "mem_size_mib": 256}, "'vcpus' was unexpected"),
        ("BootSource", {"boot_args": "console=ttyS0"}, "'kernel_image_path' is a required property"),
        ("Drive", {"drive_id": "rootfs", "path_on_host": "/r"}, "'is_root_device' is a required property"),
        ("Drive", {"drive_id": "rootfs", "is_root_device": "yes"}, "'yes' is not of type 'boolean'"),
        ("NetworkInterface", {"iface_id": "eth0"}, "'host_dev_name' is a required property"),
        ("MmdsConfig", {"network_interfaces": ["eth0"], "version": "V3"}, "'V3' is not one of ['V1', 'V2']"),
        ("InstanceActionInfo", {"action_type": "Reboot"}, "'Reboot' is not one of"),
        ("Vm", {"state": "Stopped"}, "'Stopped' is not one of ['Paused', 'Resumed']"),
        ("SnapshotCreateParams", {"snapshot_path": "/s"}, "'mem_file_path' is a required property"),
        ("SnapshotCreateParams", {"snapshot_path": "/s", "mem_file_path": "/m", "snapshot_type": "Half"}, "'Half'"),
        ("SnapshotLoadParams", {"mem_backend": {"backend_type": "File", "backend_path": "/m"}}, "'snapshot_path'"),
        ("SnapshotLoadParams", {"snapshot_path": "/s", "network_overrides": [{"iface_id": "eth0"}]}, "'host_dev_name'"),
        ("Logger", {"level": "Loud"}, "'Loud' is not one of"),
        ("Metrics", {}, "'metrics_path' is a required property"),
        ("MmdsContentsObject", ["not", "an", "object"], "is not of type 'object'"),
    ],
)
def test_the_validator_rejects_a_wrong_body(name: str, body: object, expected: str) -> None:
    found = errors(name, body)
    assert any(expected in message for message in found), found


def test_the_validator_rejects_a_wrong_body_on_the_wire_too() -> None:
    with pytest.raises(jsonschema.ValidationError, match="'vcpu_count' is a required property"):
        check_request("PUT", "/machine-config", b'{"mem_size_mib": 256}')
    with pytest.raises(jsonschema.ValidationError, match="'InstanceBoot' is not one of"):
        check_request("PUT", "/actions", b'{"action_type": "InstanceBoot"}')


@pytest.mark.parametrize(
    ("method", "path", "message"),
    [
        ("PUT", "/drive/rootfs", "no path /drive/rootfs"),
        ("PUT", "/snapshot/restore", "no path /snapshot/restore"),
        ("PATCH", "/actions", "no PATCH on /actions"),
        ("PUT", "/vm", "no PUT on /vm"),
        ("POST", "/mmds", "no POST on /mmds"),
    ],
)
def test_a_path_or_method_outside_the_spec_is_refused(method: str, path: str, message: str) -> None:
    with pytest.raises(AssertionError, match=message):
        operation(method, path)


def test_the_driver_paths_and_methods_are_in_the_spec() -> None:
    used = [
        ("PUT", "/logger", "Logger"),
        ("PUT", "/metrics", "Metrics"),
        ("PUT", "/machine-config", "MachineConfiguration"),
        ("PUT", "/boot-source", "BootSource"),
        ("PUT", f"/drives/{fc.ROOT_DRIVE}", "Drive"),
        ("PUT", f"/network-interfaces/{fc.IFACE}", "NetworkInterface"),
        ("PUT", "/mmds/config", "MmdsConfig"),
        ("PUT", "/mmds", "MmdsContentsObject"),
        ("PUT", "/actions", "InstanceActionInfo"),
        ("PATCH", "/vm", "Vm"),
        ("PUT", "/snapshot/create", "SnapshotCreateParams"),
        ("PUT", "/snapshot/load", "SnapshotLoadParams"),
    ]
    for method, path, name in used:
        assert body_schema(method, path) == {"$ref": f"#/definitions/{name}"}, (method, path)
    assert "get" in SPEC["paths"]["/"]  # the client's get("/") (InstanceInfo)
    assert SPEC["info"]["version"] == "1.17.0-dev"


def test_the_struct_field_names_are_the_spec_s() -> None:
    structs: dict[str, type[msgspec.Struct]] = {
        "Logger": api.Logger,
        "Metrics": api.Metrics,
        "MachineConfiguration": api.MachineConfiguration,
        "BootSource": api.BootSource,
        "Drive": api.Drive,
        "NetworkInterface": api.NetworkInterface,
        "MmdsConfig": api.MmdsConfig,
        "InstanceActionInfo": api.InstanceActionInfo,
        "Vm": api.Vm,
        "SnapshotCreateParams": api.SnapshotCreateParams,
        "SnapshotLoadParams": api.SnapshotLoadParams,
        "NetworkOverride": api.NetworkOverride,
        "MemoryBackend": api.MemoryBackend,
    }
    for name, struct in structs.items():
        spec = SPEC["definitions"][name]
        fields = {f.encode_name for f in msgspec.structs.fields(struct)}
        assert fields <= set(spec["properties"]), (name, fields - set(spec["properties"]))
        required = {f.encode_name for f in msgspec.structs.fields(struct) if f.required}
        assert set(spec.get("required", [])) <= required, (name, set(spec.get("required", [])) - required)


def test_firecracker_takes_one_or_an_even_number_of_vcpus(tmp_path: Path) -> None:
    for vcpus in (1, 2, 4, 32):
        driver(tmp_path, vcpus)
    for vcpus in (0, 3, 34):
        with pytest.raises(DriverUnavailable, match="1 or an even number"):
            driver(tmp_path, vcpus)


# -- the client on the wire (our client, not Firecracker) -----------------------------------------------


async def test_client_puts_json_with_its_headers_on_one_connection(recorder: Recorder) -> None:
    async with api.Client(recorder.path) as client:
        assert await client.put("/machine-config", api.MachineConfiguration(vcpu_count=2, mem_size_mib=512)) == b""
        await client.patch("/vm", api.Vm(state="Resumed"))
        await client.get("/")

    put, patch, get = recorder.seen
    assert (put.method, put.target) == ("PUT", "/machine-config")
    assert put.headers["content-type"] == "application/json"
    assert put.headers["accept"] == "application/json"
    assert put.headers["host"] == "localhost"
    assert put.headers["content-length"] == str(len(put.body))
    assert put.body == b'{"vcpu_count":2,"mem_size_mib":512}'
    assert (patch.method, patch.target, patch.body) == ("PATCH", "/vm", b'{"state":"Resumed"}')
    assert (get.method, get.target, get.body) == ("GET", "/", b"")
    assert "content-type" not in get.headers
    assert {put.connection, patch.connection, get.connection} == {0}  # kept alive: one connection per VM
    assert recorder.raw[0].startswith(b"PUT /machine-config HTTP/1.1\r\n")


async def test_client_raises_firecracker_s_fault_message(recorder: Recorder) -> None:
    fault = b'{"fault_message":"Invalid TAP device: Resource busy (os error 16)"}'
    recorder.answer = lambda seen: (400, fault) if seen.target.startswith("/network") else (204, b"")
    async with api.Client(recorder.path) as client:
        with pytest.raises(api.ApiError) as caught:
            await client.put("/network-interfaces/eth0", api.NetworkInterface(iface_id="eth0", host_dev_name="t"))
        await client.put("/actions", api.InstanceActionInfo(action_type="InstanceStart"))  # still usable

    assert caught.value.status == 400
    assert caught.value.fault_message == "Invalid TAP device: Resource busy (os error 16)"
    assert "PUT /network-interfaces/eth0: 400 Invalid TAP device" in str(caught.value)


async def test_client_returns_a_get_s_body(recorder: Recorder) -> None:
    info = b'{"app_name":"Firecracker","id":"x","state":"Running","vmm_version":"1.17.0"}'
    recorder.answer = lambda seen: (200, info)
    async with api.Client(recorder.path) as client:
        assert await client.get("/") == info


async def test_client_reconnects_after_the_server_closes(recorder: Recorder) -> None:
    recorder.close_each = True
    async with api.Client(recorder.path) as client:
        for _ in range(3):
            await client.put("/actions", api.InstanceActionInfo(action_type="FlushMetrics"))

    assert [s.connection for s in recorder.seen] == [0, 1, 2]


async def test_client_reaches_a_socket_whose_path_is_too_long_for_sun_path(tmp_path: Path) -> None:
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    long_path = deep / "firecracker.sock"
    assert len(os.fsencode(long_path)) > api.SUN_PATH_MAX
    folder = os.open(deep, os.O_PATH)
    try:
        # bound through its directory (as Firecracker binds the relative path it is given in its cwd)
        rec = Recorder(Path(f"/proc/self/fd/{folder}/firecracker.sock"))
        async with trio.open_nursery() as nursery:
            await nursery.start(rec.serve)
            async with api.Client(long_path) as client:
                await client.put("/actions", api.InstanceActionInfo(action_type="FlushMetrics"))
            nursery.cancel_scope.cancel()
    finally:
        os.close(folder)
    assert long_path.is_socket()
    assert recorded(rec) == [("PUT", "/actions")]


async def test_client_wait_for_socket_waits_and_gives_up(tmp_path: Path) -> None:
    path = tmp_path / "late.sock"
    with pytest.raises(trio.TooSlowError):
        await api.wait_for_socket(path, 0.05)
    with pytest.raises(api.ApiError, match="exited before its API socket appeared"):
        await api.wait_for_socket(path, 5, alive=lambda: False)

    async def make_it() -> None:
        await trio.sleep(0.05)
        sock = trio.socket.socket(trio.socket.AF_UNIX, trio.socket.SOCK_STREAM)
        await sock.bind(str(path))
        sock.close()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(make_it)
        with trio.fail_after(2):
            await api.wait_for_socket(path, 5)


# -- the guest's MMDS client (our code, against a stdlib server speaking MMDS V2's token flow) ----------


def test_guest_mmds_client_takes_a_token_then_the_contents(tmp_path: Path) -> None:
    import http.server
    import threading

    from nex.agent import mmds

    contents = api.body(identity())
    seen: list[tuple[str, str, dict[str, str]]] = []
    puts = 0

    class Mmds(http.server.BaseHTTPRequestHandler):
        def do_PUT(self) -> None:
            nonlocal puts
            puts += 1
            seen.append(("PUT", self.path, dict(self.headers)))
            self._answer(200, b"tok-1")

        def do_GET(self) -> None:
            seen.append(("GET", self.path, dict(self.headers)))
            if self.headers.get("X-metadata-token") != "tok-1":
                self._answer(401, b"")
            elif puts < 2:  # the host has not put the contents yet
                self._answer(404, b'{"fault_message":"not initialized"}')
            else:
                self._answer(200, contents)

        def _answer(self, status: int, payload: bytes) -> None:
            self.send_response(status)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Mmds)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        got = mmds.fetch_metadata(5.0, "127.0.0.1", server.server_address[1])
        puts = 0  # empty again: a template waits with no deadline until the contents are there
        forever = mmds.fetch_metadata(None, "127.0.0.1", server.server_address[1], attempt_timeout=0.1)
        with pytest.raises(mmds.MetadataUnavailable, match="no metadata from MMDS"):
            mmds.fetch_metadata(0.2, "127.0.0.1", 9)  # nothing listens on the discard port
    finally:
        server.shutdown()
        server.server_close()
    assert msgspec.json.decode(got, type=agent_api.GuestIdentity) == identity()
    assert forever == got
    assert [(method, path) for method, path, _ in seen] == [("PUT", "/latest/api/token"), ("GET", "/")] * 4
    assert seen[0][2]["X-metadata-token-ttl-seconds"] == "60"
    assert seen[1][2]["Accept"] == "application/json"
