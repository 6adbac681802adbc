"""What the node checks about an artifact before it runs it: where it is, its hash, its ELF headers."""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path

import pytest

from nex.api import gojson
from nex.workload.artifact import ArtifactError, Location, check_hash
from nex.workload.elf import NotRunnable, check_static_executable

from .workloads import Binaries

VECTOR_ELF = Path(__file__).parent.parent / "vectors" / "interop.elf"


def test_locations_are_nats_bucket_and_key() -> None:
    assert Location.parse("nats://NEXCLIFILES/echo") == Location("NEXCLIFILES", "echo")
    assert Location.parse("nats://B/dir/key/") == Location("B", "dir/key")
    for bad in ("http://B/k", "nats://B", "nats:///k", "echo"):
        with pytest.raises(ArtifactError, match="location must be nats://BUCKET/key"):
            Location.parse(bad)


def test_the_hash_claim_must_be_the_artifacts_sha256() -> None:
    data = b"\x7fELF pretend"
    digest = hashlib.sha256(data).hexdigest()
    assert check_hash(data, digest.upper()) == digest
    with pytest.raises(ArtifactError, match=f"sha256 is {digest}, but the workload JWT claims 00"):
        check_hash(data, "00")


def test_a_static_elf_for_this_machine_passes() -> None:
    check_static_executable(VECTOR_ELF.read_bytes(), "x86_64")


def test_what_cannot_run_here_is_refused_with_the_reason(binaries: Binaries) -> None:
    check_static_executable(binaries.echo)
    with pytest.raises(
        NotRunnable,
        match=r"dynamically linked \(it needs /lib.*\); only static executables run here: build with -static",
    ):
        check_static_executable(binaries.echo_dynamic)
    with pytest.raises(NotRunnable, match=r"not an ELF executable \(a script"):
        check_static_executable(binaries.script)
    with pytest.raises(NotRunnable, match="not an ELF executable; it starts with ''"):
        check_static_executable(b"")
    with pytest.raises(NotRunnable, match="built for x86_64, but this node runs aarch64"):
        check_static_executable(VECTOR_ELF.read_bytes(), "aarch64")
    with pytest.raises(NotRunnable, match="a damaged ELF file"):
        check_static_executable(VECTOR_ELF.read_bytes()[:80], "x86_64")
    relocatable = bytearray(VECTOR_ELF.read_bytes())
    struct.pack_into("<H", relocatable, 16, 1)  # e_type = ET_REL: an object file, not a program
    with pytest.raises(NotRunnable, match="not an executable"):
        check_static_executable(bytes(relocatable), "x86_64")


def test_go_json_escapes_and_orders_as_encoding_json() -> None:
    value = {"b": "<&>\u2028é", "a": [1, None, True]}
    assert gojson.dumps(value) == '{"b":"\\u003c\\u0026\\u003e\\u2028é","a":[1,null,true]}'.encode()
    assert list(gojson.go_map({"b": 1, "B": 2, "a": 3})) == ["B", "a", "b"]
    assert gojson.url("nats://BUCKET/key")["Path"] == "/key"
