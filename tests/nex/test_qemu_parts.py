"""The QEMU driver's parts that need no VM: which driver a config gets, the command line's shape, the
snapshot's key, the identity a guest takes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest

from nex.api import agent as agent_api
from nex.config import ConfigError, load
from nex.vm.qemu.boot import ImageError, configured_image
from nex.vm.qemu.command import VmSpec, argv

from .support import SEED_SAMPLE


def spec(**changes: object) -> VmSpec:
    base: dict[str, object] = {
        "qemu": "qemu-system-x86_64",
        "kernel": Path("/img/vmlinuz"),
        "initrd": Path("/img/initrd.img"),
        "rootfs": Path("/img/rootfs.ext4"),
        "memory_mib": 256,
        "vcpus": 1,
        "accel": "tcg",
        "tsc_khz": 2_000_000,
    }
    return VmSpec(**{**base, **changes})  # type: ignore[arg-type]


def test_a_config_naming_a_kernel_and_rootfs_gets_vms_unless_it_says_otherwise(tmp_path: Path) -> None:
    sample = tmp_path / "machineconfig.json"
    sample.write_bytes(msgspec.json.encode(SEED_SAMPLE))
    assert load(sample).config.machine_driver() == "qemu"
    assert load(sample, {"driver": "process"}).config.machine_driver() == "process"
    assert load(sample, {"no_sandbox": True}).config.machine_driver() == "process"  # nex's meaning
    assert load(None).config.machine_driver() == "process"
    assert load(None, {"driver": "firecracker"}).config.machine_driver() == "firecracker"
    with pytest.raises(ConfigError, match=r"driver qemu cannot be combined with no_sandbox .* at \$.driver"):
        load(None, {"driver": "qemu", "no_sandbox": True})
    with pytest.raises(ConfigError, match=r"driver"):
        load(None, {"driver": "docker"})


def test_the_configured_image_must_name_both_files_and_readable_ones(tmp_path: Path) -> None:
    kernel, rootfs = tmp_path / "vmlinuz", tmp_path / "rootfs.ext4"
    kernel.write_bytes(b"k")
    with pytest.raises(ImageError, match="rootfs_path is not set"):
        configured_image(load(None, {"kernel_filepath": str(kernel)}).config)
    with pytest.raises(ImageError, match=rf"rootfs_path {rootfs} cannot be read"):
        configured_image(load(None, {"kernel_filepath": str(kernel), "rootfs_filepath": str(rootfs)}).config)
    rootfs.write_bytes(b"r")
    config = load(None, {"kernel_filepath": str(kernel), "rootfs_filepath": str(rootfs)}).config
    first = configured_image(config)
    assert first is not None
    assert first.initrd is None
    (tmp_path / "initrd.img").write_bytes(b"i")  # nex image build puts it beside the kernel
    second = configured_image(config)
    assert second is not None
    assert second.initrd == tmp_path / "initrd.img"
    assert second.digest != first.digest, "another set of files names another snapshot"
    assert configured_image(load(None).config) is None


def test_a_snapshot_fits_only_the_same_qemu_image_and_machine_shape() -> None:
    key = spec().snapshot_key("QEMU 7.2.22", "abc")
    assert spec().snapshot_key("QEMU 7.2.22", "abc") == key
    for other in (
        spec().snapshot_key("QEMU 8.2.0", "abc"),
        spec().snapshot_key("QEMU 7.2.22", "abd"),
        spec(memory_mib=512).snapshot_key("QEMU 7.2.22", "abc"),
        spec(vcpus=2).snapshot_key("QEMU 7.2.22", "abc"),
        spec(accel="kvm").snapshot_key("QEMU 7.2.22", "abc"),
        spec(rootfs=Path("/other/rootfs.ext4")).snapshot_key("QEMU 7.2.22", "abc"),
    ):
        assert other != key


def test_a_clone_has_its_templates_devices_in_the_same_order_and_no_identity_on_its_command_line() -> None:
    template = argv(spec(), qmp_fd=5, agent_fd=6, console=Path("/t/template.log"), tap=None, incoming=False)
    clone = argv(spec(), qmp_fd=7, agent_fd=9, console=Path("/vm/x/stdout"), tap="nx0123456789t", incoming=True)
    devices = [clone[i + 1] for i, word in enumerate(clone) if word == "-device"]
    assert devices == [template[i + 1] for i, word in enumerate(template) if word == "-device"]
    assert clone[-2:] == ["-incoming", "defer"]
    assert "tap,id=n0,ifname=nx0123456789t,script=no,downscript=no" in clone
    assert "socket,id=agent,fd=9,server=off" in clone  # an inherited socket: no path anyone could open
    assert "tsc_early_khz=2000000" in clone[clone.index("-append") + 1]
    assert "tsc_early_khz" not in " ".join(
        argv(spec(accel="kvm"), qmp_fd=1, agent_fd=2, console=Path("c"), tap=None, incoming=False)
    )


def test_a_guests_identity_carries_what_a_clone_must_not_keep_from_its_template() -> None:
    identity = agent_api.GuestIdentity(
        metadata=agent_api.MachineMetadata(vmid="v", node_nats_host="192.168.127.1", node_nats_port=9222),
        network=agent_api.GuestNetwork(address="192.168.127.2", prefixlen=32, gateway="192.168.127.1"),
        time_ns=1,
        entropy="AAAA",
    )
    wire = msgspec.json.encode(identity)
    assert b"\n" not in wire, "one line on the channel"
    assert msgspec.json.decode(wire, type=agent_api.GuestIdentity) == identity
    ready = msgspec.json.decode(msgspec.json.encode(agent_api.GuestReady(pid=2)), type=agent_api.GuestReady)
    assert ready.pid == 2


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None, reason="needs root and unshare")
def test_a_guest_configures_its_link_as_cni_ptp_does_without_any_ip_command() -> None:
    """``configure_network`` in a network namespace of its own (a veth stands for the VM's eth0)."""
    script = (
        "ip link add eth0 type veth peer name p0 && "
        f"{sys.executable} -c 'from nex.agent.guest import configure_network; "
        'configure_network("192.168.127.9", 32, "192.168.127.1")\' && '
        f"{sys.executable} -c 'from nex.agent.guest import unreachable; unreachable(\"169.254.169.254\")' && "
        "ip -o -4 addr show dev eth0 && ip -o link show lo && ip route"
    )
    shown = subprocess.run(["unshare", "-n", "sh", "-c", script], capture_output=True, text=True, check=False)
    assert shown.returncode == 0, shown.stderr
    assert "inet 192.168.127.9/32" in shown.stdout
    assert "<LOOPBACK,UP" in shown.stdout
    routes = [line.replace(" linkdown", "").strip() for line in shown.stdout.splitlines()[-3:]]
    assert routes == [
        "default via 192.168.127.1 dev eth0",
        "unreachable 169.254.169.254 scope host",  # MMDS, which holds a Firecracker agent's seed
        "192.168.127.1 dev eth0 scope link",
    ]
