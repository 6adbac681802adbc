"""The microVM guest image: a kernel, a stage-1 initramfs and a read-only ext4 root filesystem.

Everything comes from the package registries, never from the host's own files: the host's kernel,
Python and site-packages are not what runs in the guest, and a CI host may differ from a node.

- **Kernel**: the Debian cloud kernel (``linux-image-cloud-amd64``'s dependency, a bzImage), taken
  from its ``.deb`` with ``dpkg-deb -x``.
- **Stage 1** (``initrd.img``, a gzipped newc cpio): static busybox, the virtio and overlay modules
  of that same ``.deb`` (the cloud kernel builds them as modules) in dependency order, and
  ``/init`` (``stage1_init.sh`` beside this module). ``/init`` mounts ``/dev/vda`` (ext4) read-only,
  puts a tmpfs overlay on it and hands over with::

      exec switch_root /newroot /usr/bin/python3.11 -I -m nex.agent.guest

  It expects from the kernel command line only what the driver gives anyway (``console=ttyS0``,
  ``panic=-1``, ``tsc_early_khz=`` under TCG, see :func:`nex.vm.kvm.tcg_tsc_khz`) and reads three words of its
  own: ``nex.probe=1`` (print ``nex-probe-ok`` and power off at once: does the accelerator run a
  guest at all?), ``nex.check=1`` (hand over to a python that imports ``nex.agent.main``, prints
  ``nex-python-ok`` and powers off: does this image work?) and ``nex.rw_mib=N`` (size of the
  writable tmpfs; the kernel's default, half the guest's memory, otherwise). The disk is found by
  microvm's ACPI tables (``CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES`` is off in this kernel). On any
  failure it prints one line starting ``nex-init:`` and powers off (a reboot if that fails, which
  ends a VM run with ``-no-reboot`` too): the console never offers a shell.
- **Root filesystem** (``rootfs.ext4``): Debian's python3.11 and the few libraries it loads,
  unpacked with ``dpkg-deb -x`` (no maintainer scripts, no chroot installs, about 7 s where
  mmdebstrap takes 27); the agent's dependencies as wheels pinned to the versions installed on the
  host, so that guest and node speak the same protocol; the running checkout's ``nex`` package; all
  byte-compiled by the guest's own python in a chroot, then checked by importing the agent there.
  ext4 rather than squashfs: squashfs is slow to read under TCG.

An image is named by the digest of its inputs (:class:`Inputs`), which costs two ``apt`` queries
and no download: the exact ``.deb`` files (name, version, SHA256) the registry offers now, the
wheels' versions, the nex sources and :data:`BUILDER_VERSION`. Images live in
``<state_dir>/images/<digest>/`` as ``vmlinuz``, ``initrd.img``, ``rootfs.ext4`` and
``manifest.json``: the driver finds the initrd beside the kernel. A build happens in a temporary
directory beside them (``.build-*``) renamed into place at the end, under a lock, so a build killed
half-way leaves no ``<digest>`` directory, and the next build removes what it left. The downloads are
kept in ``images/.debs`` and ``images/.wheels`` (named as the registry names them) so that a rebuild
downloads nothing: they are caches, to be removed with the images when no longer wanted.
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import hashlib
import importlib.metadata
import io
import json
import lzma
import math
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import unquote

from nex import logs

#: Bump when the build changes in a way the inputs do not show (a new file in the image, a new step).
BUILDER_VERSION = 1

#: The nex package whose sources go into the image: the running checkout's.
SOURCE = Path(__file__).resolve().parents[1]
#: Stage 1's /init, relative to :data:`SOURCE`.
STAGE1_INIT = Path("vm/stage1_init.sh")

#: The metapackage whose dependency is the current cloud kernel.
KERNEL_META = "linux-image-cloud-amd64"
#: What the root filesystem is made of: python3.11 can run the agent with these and nothing else
#: (found by trying). libc-bin brings ldconfig, which ctypes.util.find_library runs (pyseccomp finds
#: libseccomp.so.2 through it); libsqlite3 is imported by pyroute2; busybox gives /bin/sh and ip.
ROOT_PACKAGES = (
    "python3.11-minimal",
    "libpython3.11-minimal",
    "libpython3.11-stdlib",
    "libc6",
    "libc-bin",
    "libgcc-s1",
    "libssl3",
    "zlib1g",
    "libffi8",
    "libexpat1",
    "libbz2-1.0",
    "liblzma5",
    "libuuid1",
    "libsqlite3-0",
    "libseccomp2",
    "busybox-static",
)
#: The agent's Python dependencies (distribution names), at the host's installed versions.
WHEELS = (
    "msgspec",
    "nats-py",
    "nkeys",
    "pynacl",
    "cffi",
    "pycparser",
    "pyseccomp",
    "pyroute2",
    "typing_extensions",
)
#: Kernel modules stage 1 loads (their dependencies come along): the disk, the network, the
#: host↔agent channel (virtio-serial) and the overlay root.
MODULES = ("virtio_mmio", "virtio_blk", "virtio_net", "virtio_console", "overlay")
#: Loaded if this kernel has them: the guest's entropy from the host.
OPTIONAL_MODULES = ("virtio_rng",)
#: busybox applets stage 1 calls (links in its /bin).
STAGE1_APPLETS = ("sh", "mount", "insmod", "mkdir", "switch_root", "reboot", "poweroff", "usleep", "cat", "ls")

GUEST_PYTHON = "/usr/bin/python3.11"
SITE_PACKAGES = "usr/local/lib/python3.11/dist-packages"
#: What the build imports in the finished tree before calling it an image.
VERIFY_IMPORTS = (
    "nex.agent.main",
    "nex.agent.runner",
    "nex.sandbox.jail",
    "nex.sandbox.seccomp",
    "nex.net.rtnl",
    "nats",
    "msgspec",
    "nkeys",
    "nacl",
    "pyseccomp",
)

KERNEL_FILE = "vmlinuz"
INITRD_FILE = "initrd.img"
ROOTFS_FILE = "rootfs.ext4"
MANIFEST_FILE = "manifest.json"

#: TSC frequency to assume when /proc/cpuinfo does not say (kHz).

log = logs.get("nex.vm.image")


class ImageError(Exception):
    """The image cannot be built or found; the message says what failed, in one line."""


class RegistryError(ImageError):
    """apt or pip could not say what the registry offers, or could not download it."""


@dataclass(frozen=True)
class GuestImage:
    """A built image: the three files a VM boots from, all in one ``<digest>`` directory."""

    digest: str
    kernel: Path
    initrd: Path | None
    rootfs: Path

    @classmethod
    def at(cls, directory: Path) -> GuestImage | None:
        """The image in ``directory`` if it is complete (its manifest is written last), else None."""
        if not (directory / MANIFEST_FILE).is_file():
            return None
        initrd = directory / INITRD_FILE
        return cls(
            digest=directory.name,
            kernel=directory / KERNEL_FILE,
            initrd=initrd if initrd.is_file() else None,
            rootfs=directory / ROOTFS_FILE,
        )

    def manifest(self) -> dict[str, object]:
        """What went in (package and wheel versions, modules, sizes) and where the files are."""
        data: dict[str, object] = json.loads((self.kernel.parent / MANIFEST_FILE).read_text())
        data.update(
            digest=self.digest,
            kernel_path=str(self.kernel),
            initrd_path=str(self.initrd) if self.initrd else None,
            rootfs_path=str(self.rootfs),
        )
        return data


@dataclass(frozen=True)
class Deb:
    """One ``.deb`` as the registry offers it now."""

    package: str
    version: str
    filename: str  # as ``apt-get download`` names it
    sha256: str
    size: int


@dataclass(frozen=True)
class Inputs:
    """Everything an image is made of, known without downloading anything."""

    kernel: Deb
    packages: tuple[Deb, ...]
    wheels: tuple[tuple[str, str], ...]  # (distribution, version)
    source: Path
    source_digest: str

    @property
    def digest(self) -> str:
        """The image's name: a hash of all the inputs (24 hex digits)."""
        return hashlib.sha256(json.dumps(self.describe(), sort_keys=True).encode()).hexdigest()[:24]

    def describe(self) -> dict[str, object]:
        def deb(d: Deb) -> dict[str, object]:
            return {"package": d.package, "version": d.version, "sha256": d.sha256}

        return {
            "builder": BUILDER_VERSION,
            "kernel": deb(self.kernel),
            "packages": [deb(d) for d in self.packages],
            "wheels": dict(self.wheels),
            "stage1_modules": [*MODULES, *OPTIONAL_MODULES],
            "nex_sources": self.source_digest,
        }

    def deb(self, package: str) -> Deb:
        return next(d for d in (self.kernel, *self.packages) if d.package == package)


def image_root(state_dir: Path) -> Path:
    """Where a node's images (and the download caches) live."""
    return state_dir / "images"


# --- inputs: what the registry offers now ------------------------------------------------------------


def image_inputs(source: Path = SOURCE) -> Inputs:
    """The current inputs: two apt queries (about 2 s) and a hash of the nex sources, no download."""
    kernel_package = _kernel_package()
    debs = {d.package: d for d in _apt_offers([kernel_package, *ROOT_PACKAGES])}
    missing = [p for p in (kernel_package, *ROOT_PACKAGES) if p not in debs]
    if missing:
        raise RegistryError(f"apt offers no {', '.join(missing)}")
    return Inputs(
        kernel=debs[kernel_package],
        packages=tuple(debs[p] for p in ROOT_PACKAGES),
        wheels=tuple((name, _host_version(name)) for name in WHEELS),
        source=source,
        source_digest=source_digest(source),
    )


def _kernel_package() -> str:
    """The kernel package the cloud metapackage depends on now, e.g. linux-image-6.1.0-57-cloud-amd64."""
    shown = _run(
        ["apt-cache", "show", "--no-all-versions", KERNEL_META], f"apt-cache show {KERNEL_META}", RegistryError
    )
    for line in shown.splitlines():
        if line.startswith("Depends:"):
            for alternative in re.split(r"[,|]", line.removeprefix("Depends:")):
                name = alternative.split("(")[0].strip()
                if name.startswith("linux-image-"):
                    return name
    raise ImageError(f"{KERNEL_META} depends on no linux-image package (apt-cache show {KERNEL_META})")


_URI_LINE = re.compile(r"'(?P<uri>[^']+)' (?P<filename>\S+) (?P<size>\d+) SHA256:(?P<sha256>[0-9a-f]{64})")


def _apt_offers(packages: Sequence[str]) -> list[Deb]:
    """The candidate ``.deb`` of each package, from ``apt-get download --print-uris`` (no download)."""
    printed = _run(["apt-get", "download", "--print-uris", *packages], "apt-get download --print-uris", RegistryError)
    offers = []
    for line in printed.splitlines():
        match = _URI_LINE.match(line)
        if match:
            name, version, _ = match["filename"].split("_")
            offers.append(Deb(name, unquote(version), match["filename"], match["sha256"], int(match["size"])))
    return offers


def _host_version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        raise ImageError(f"{distribution} is not installed on this host (the guest gets the host's version)") from None


def _source_files(source: Path) -> list[Path]:
    """The nex package's Python files (what the guest gets), in a stable order."""
    return sorted(p for p in source.rglob("*.py") if "__pycache__" not in p.parts)


def source_digest(source: Path = SOURCE) -> str:
    """A hash of the nex sources that go into the image, and of stage 1's /init."""
    digest = hashlib.sha256()
    for path in [*_source_files(source), source / STAGE1_INIT]:
        digest.update(str(path.relative_to(source)).encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()


# --- the cache --------------------------------------------------------------------------------------


def cached_image(state_dir: Path, inputs: Inputs | None = None) -> GuestImage | None:
    """The image for the current inputs if it is already built (no download, no lock)."""
    inputs = inputs or image_inputs()
    return GuestImage.at(image_root(state_dir) / inputs.digest)


def list_images(state_dir: Path) -> list[GuestImage]:
    """Every complete image under ``state_dir``, newest first."""
    root = image_root(state_dir)
    if not root.is_dir():
        return []
    found = [image for d in root.iterdir() if not d.name.startswith(".") and (image := GuestImage.at(d))]
    return sorted(found, key=lambda image: image.rootfs.parent.stat().st_mtime, reverse=True)


def remove_images(state_dir: Path, *, keep: Collection[str]) -> list[str]:
    """Remove every image but those in ``keep`` (digests); returns the digests removed.

    A VM still running from a removed image is not disturbed (its files stay open), but a node
    configured with its paths would not start new ones: only for images nothing refers to.
    """
    root = image_root(state_dir)
    removed = []
    with _locked(root, lambda _: None):
        for image in list_images(state_dir):
            if image.digest not in keep:
                _remove_tree(image.rootfs.parent, root)
                removed.append(image.digest)
    return removed


def build_image(
    state_dir: Path,
    *,
    force: bool = False,
    say: Callable[[str], None] = log.info,
    inputs: Inputs | None = None,
) -> GuestImage:
    """The image for ``inputs`` (the current ones by default): the cached one unless ``force``, else
    built now (blocking, 10 to 20 s).

    ``say`` gets a line per step. Raises :class:`ImageError` with one line saying what failed.
    """
    if os.geteuid() != 0:
        raise ImageError("building the guest image needs root (it runs the guest's python in a chroot)")
    inputs = inputs or image_inputs()
    root = image_root(state_dir)
    final = root / inputs.digest
    with _locked(root, say):
        _remove_leftovers(root)
        image = GuestImage.at(final)
        if image is not None and not force:
            return image
        started = time.monotonic()
        temp = Path(tempfile.mkdtemp(prefix=".build-", dir=root))
        try:
            out = temp / "image"
            out.mkdir()
            _build(inputs, root, temp, out, say, started)
            if final.exists():
                final.rename(temp / "old")
            out.rename(final)
        finally:
            _remove_tree(temp, root)
    image = GuestImage.at(final)
    assert image is not None
    return image


@contextlib.contextmanager
def _locked(root: Path, say: Callable[[str], None]) -> Iterator[None]:
    """One build at a time per image directory (a lock the kernel drops if the holder dies)."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        lock = os.open(root / ".lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as exc:
        raise ImageError(f"cannot use {root} for images: {exc.strerror or exc}") from None
    try:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say(f"waiting for another build in {root}")
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield
    finally:
        os.close(lock)


def _remove_leftovers(root: Path) -> None:
    """What a killed build left: its build directory and partial downloads (we hold the lock)."""
    leftovers = [*root.glob(".build-*"), *root.glob(".debs/.partial-*"), *root.glob(".wheels/.partial-*")]
    for path in leftovers:
        _remove_tree(path, root)


def _remove_tree(path: Path, root: Path) -> None:
    """Remove a directory tree of ours (never anything outside ``root``), however deep or odd."""
    if root.resolve() not in path.resolve().parents:
        raise ImageError(f"refusing to remove {path}: not under {root}")
    shutil.rmtree(path, ignore_errors=True)


# --- the build --------------------------------------------------------------------------------------


def _build(inputs: Inputs, root: Path, temp: Path, out: Path, say: Callable[[str], None], started: float) -> None:
    say(f"building guest image {inputs.digest} in {root}")
    debs = _fetch_debs([inputs.kernel, *inputs.packages], root / ".debs", say)
    glibc = inputs.deb("libc6").version
    wheels = _fetch_wheels(inputs.wheels, root / ".wheels", glibc, say)
    kernel_tree = temp / "kernel"
    kernel_tree.mkdir()
    # the kernel .deb is the largest (about 2 s to unpack): unpack it while the root filesystem is made
    with _background(
        ["dpkg-deb", "-x", str(debs[inputs.kernel.package]), str(kernel_tree)], "unpack the kernel"
    ) as kernel_done:
        tree = temp / "root"
        tree.mkdir()
        python = _root_tree(tree, [debs[d.package] for d in inputs.packages], wheels, inputs.source, glibc, say)
        kernel_done()
    release, vmlinuz = _kernel_files(kernel_tree)
    shutil.copyfile(vmlinuz, out / KERNEL_FILE)
    busybox = tree / "bin" / "busybox"
    modules = _write_initramfs(kernel_tree, release, busybox, inputs.source / STAGE1_INIT, out / INITRD_FILE)
    say(f"stage 1: {_mib(out / INITRD_FILE)} with modules {' '.join(modules)}")
    used = _make_ext4(tree, out / ROOTFS_FILE)
    say(f"root filesystem: {_mib(out / ROOTFS_FILE)} ({used / 2**20:.0f} MiB of files)")
    manifest = _manifest(inputs, out, release=release, python=python, modules=modules, used=used)
    manifest["build_seconds"] = round(time.monotonic() - started, 1)
    (out / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n")  # last: it marks the image complete


def _manifest(
    inputs: Inputs, out: Path, *, release: str, python: str, modules: list[str], used: int
) -> dict[str, object]:
    """What ``nex image build --json`` shows: the inputs, and what the build found and made of them."""
    return {
        **inputs.describe(),
        "digest": inputs.digest,
        "kernel_release": release,
        "python": python,
        "modules": modules,
        "sizes": {name: (out / name).stat().st_size for name in (KERNEL_FILE, INITRD_FILE, ROOTFS_FILE)}
        | {"rootfs_files": used},
        "built_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


@contextlib.contextmanager
def _background(argv: list[str], what: str) -> Iterator[Callable[[], None]]:
    """Run ``argv`` while the body runs; the body calls the yielded function to wait for its success."""
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    except FileNotFoundError:
        raise ImageError(f"cannot {what}: {argv[0]} is not installed") from None

    def wait() -> None:
        _, err = proc.communicate()
        if proc.returncode != 0:
            raise ImageError(f"cannot {what}: {_last_line(err)}")

    try:
        yield wait
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        if proc.stderr:
            proc.stderr.close()


def _fetch_debs(debs: Sequence[Deb], cache: Path, say: Callable[[str], None]) -> dict[str, Path]:
    """The ``.deb`` files, downloaded into ``cache`` unless already there (checked by SHA256)."""
    cache.mkdir(parents=True, exist_ok=True)
    missing = [d for d in debs if not _has_sha256(cache / d.filename, d.sha256)]
    if missing:
        say(f"downloading {len(missing)} packages")
        partial = Path(tempfile.mkdtemp(prefix=".partial-", dir=cache))
        try:
            wanted = [f"{d.package}={d.version}" for d in missing]
            _run(["apt-get", "download", "-q", *wanted], "apt-get download", RegistryError, cwd=partial)
            for d in missing:
                got = partial / d.filename
                if not _has_sha256(got, d.sha256):
                    raise RegistryError(f"apt-get download gave no {d.filename} with the SHA256 apt announced")
                got.rename(cache / d.filename)
        finally:
            shutil.rmtree(partial, ignore_errors=True)
    return {d.package: cache / d.filename for d in debs}


def _has_sha256(path: Path, sha256: str) -> bool:
    try:
        with path.open("rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest() == sha256
    except FileNotFoundError:
        return False


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _cached_wheel(cache: Path, name: str, version: str) -> Path | None:
    for path in cache.glob("*.whl"):
        parts = path.name.split("-")
        if len(parts) >= 5 and _canonical(parts[0]) == _canonical(name) and parts[1] == version:
            return path
    return None


def _pip_target(glibc: str) -> list[str]:
    """pip's options for the guest's interpreter: CPython 3.11 on x86_64 glibc ``glibc`` (e.g. 2.36-9)."""
    minor = int(glibc.split(".")[1].split("-")[0])
    platforms = [f"manylinux_2_{m}_x86_64" for m in range(minor, 16, -1)] + ["manylinux2014_x86_64", "linux_x86_64"]
    options = ["--only-binary=:all:", "--python-version", "3.11", "--implementation", "cp"]
    options += ["--abi", "cp311", "--abi", "abi3", "--abi", "none"]
    for platform in platforms:
        options += ["--platform", platform]
    return options


def _fetch_wheels(wheels: Sequence[tuple[str, str]], cache: Path, glibc: str, say: Callable[[str], None]) -> list[Path]:
    """The wheels for the guest, downloaded into ``cache`` unless already there.

    Binary wheels for the guest's interpreter where PyPI has them; a project that ships only a
    source distribution (nkeys) is built into a wheel by ``pip wheel``, which the image accepts only
    for pure Python ones (checked when installing: ``--only-binary`` with the guest's tags).
    """
    cache.mkdir(parents=True, exist_ok=True)
    missing = [(n, v) for n, v in wheels if _cached_wheel(cache, n, v) is None]
    if missing:
        say(f"downloading {len(missing)} wheels")
        partial = Path(tempfile.mkdtemp(prefix=".partial-", dir=cache))
        try:
            _download_wheels(missing, partial, glibc)
            for path in partial.glob("*.whl"):
                path.rename(cache / path.name)
        finally:
            shutil.rmtree(partial, ignore_errors=True)
    found = [(n, v, _cached_wheel(cache, n, v)) for n, v in wheels]
    absent = [f"{n}=={v}" for n, v, path in found if path is None]
    if absent:
        raise RegistryError(f"pip gave no wheel for {', '.join(absent)}")
    return [path for _, _, path in found if path is not None]


def _download_wheels(wanted: Sequence[tuple[str, str]], into: Path, glibc: str) -> None:
    """All binary wheels in one ``pip download``; pip stops at the first requirement it finds none
    for, which is then left to ``pip wheel`` (a pure Python source distribution, like nkeys)."""
    pip = [sys.executable, "-m", "pip"]
    quiet = ["--no-deps", "--disable-pip-version-check", "--quiet"]
    binary = [f"{n}=={v}" for n, v in wanted]
    from_source: list[str] = []
    while binary:
        try:
            _run([*pip, "download", *quiet, "--dest", str(into), *_pip_target(glibc), *binary], "pip download")
            break
        except ImageError as exc:
            failed = [r for r in binary if str(exc).endswith(f"found for {r}")]
            if not failed:
                raise RegistryError(str(exc)) from None
            from_source += failed
            binary = [r for r in binary if r not in failed]
    for requirement in from_source:
        argv = [*pip, "wheel", *quiet, "--wheel-dir", str(into), requirement]
        _run(argv, f"pip wheel {requirement}", RegistryError)


def _root_tree(
    tree: Path, debs: Sequence[Path], wheels: Sequence[Path], source: Path, glibc: str, say: Callable[[str], None]
) -> str:
    """Make the root filesystem's tree; returns the guest's Python version, as the guest says it."""
    say(f"unpacking {len(debs)} packages and {len(wheels)} wheels")
    for deb in debs:
        _run(["dpkg-deb", "-x", str(deb), str(tree)], f"dpkg-deb -x {deb.name}")
    site = tree / SITE_PACKAGES
    argv = [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--no-compile", "--quiet"]
    argv += ["--disable-pip-version-check", "--target", str(site), *_pip_target(glibc)]
    _run([*argv, *map(str, wheels)], "pip install --target")
    shutil.rmtree(site / "bin", ignore_errors=True)  # console scripts with the host's python in their #!
    _copy_sources(source, site / "nex")
    _skeleton(tree)
    _trim(tree)
    _run(["chroot", str(tree), "/sbin/ldconfig"], "ldconfig in the guest's tree")
    say("byte-compiling with the guest's python and checking its imports")
    with _chroot_devices(tree):
        compile_argv = [GUEST_PYTHON, "-I", "-m", "compileall", "-q", "-j", "0"]
        compile_argv += ["--invalidation-mode", "unchecked-hash", "/usr/lib/python3.11", "/" + SITE_PACKAGES]
        _run(["chroot", str(tree), *compile_argv], "compileall in the guest's tree")
        return _verify(tree, source)


def _copy_sources(source: Path, dest: Path) -> None:
    """The checkout's nex package, Python files only (no caches, no host-compiled bytecode)."""
    for path in _source_files(source):
        target = dest / path.relative_to(source)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)


#: Small files of /etc the guest's libc and agent read; resolv.conf is filled in by the agent.
_ETC = {
    "passwd": "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n",
    "group": "root:x:0:\nnogroup:x:65534:\n",
    "hostname": "nex\n",
    "hosts": "127.0.0.1\tlocalhost\n::1\tlocalhost\n",
    "nsswitch.conf": "passwd: files\ngroup: files\nhosts: files dns\n",
    "resolv.conf": "",
}


def _skeleton(tree: Path) -> None:
    """The directories, /etc files and links a booted guest needs beyond the packages' files."""
    for name, mode in (("proc", 0o555), ("sys", 0o555), ("dev", 0o755), ("run", 0o755), ("tmp", 0o1777)):
        (tree / name).mkdir(exist_ok=True)
        (tree / name).chmod(mode)
    (tree / "root").mkdir(mode=0o700, exist_ok=True)
    (tree / "var/lib/nex").mkdir(parents=True, exist_ok=True)
    for name, text in _ETC.items():
        (tree / "etc" / name).write_text(text)
    (tree / "usr/bin/python3").symlink_to("python3.11")
    for applet in ("sh", "ip"):
        (tree / "bin" / applet).symlink_to("busybox")


def _trim(tree: Path) -> None:
    """Documentation and translations: nothing in the guest reads them."""
    for sub in ("doc", "man", "info", "locale", "lintian", "bug"):
        shutil.rmtree(tree / "usr/share" / sub, ignore_errors=True)


@contextlib.contextmanager
def _chroot_devices(tree: Path) -> Iterator[None]:
    """/dev/null and a /dev/shm directory, only while the guest's python runs in a chroot.

    subprocess (ctypes.util.find_library runs ldconfig) opens /dev/null, and compileall's worker
    pool takes a POSIX semaphore in /dev/shm. In a booted guest /dev is a devtmpfs mounted over
    this directory, which is left empty in the image.
    """
    dev = tree / "dev"
    try:
        os.mknod(dev / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
        (dev / "null").chmod(0o666)
        (dev / "shm").mkdir(mode=0o1777)
        yield
    finally:
        for path in dev.iterdir():
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink()


def _verify(tree: Path, source: Path) -> str:
    """Import the agent and its dependencies with the guest's python: a broken image fails here."""
    imports = list(VERIFY_IMPORTS)
    if (source / "agent" / "guest.py").exists() or (source / "agent" / "guest").is_dir():
        imports.append("nex.agent.guest")
    code = f"import sys, {', '.join(imports)}; print(sys.version.split()[0])"
    printed = _run(["chroot", str(tree), GUEST_PYTHON, "-I", "-c", code], "importing the agent with the guest's python")
    return printed.strip()


def _kernel_files(kernel_tree: Path) -> tuple[str, Path]:
    """The kernel release (6.1.0-57-cloud-amd64) and its bzImage, in the unpacked kernel .deb."""
    found = sorted((kernel_tree / "boot").glob("vmlinuz-*"))
    if len(found) != 1:
        raise ImageError(f"the kernel package holds {len(found)} boot/vmlinuz-* files, not one")
    release = found[0].name.removeprefix("vmlinuz-")
    if not (kernel_tree / "lib/modules" / release).is_dir():
        raise ImageError(f"the kernel package has no lib/modules/{release}")
    return release, found[0]


# --- stage 1 ----------------------------------------------------------------------------------------


def module_files(modules_dir: Path) -> dict[str, Path]:
    """Module name → its file (``.ko``, maybe compressed) under ``lib/modules/<release>``."""
    found = {}
    for path in modules_dir.rglob("*.ko*"):
        base = path.name.split(".ko")[0]
        found[base.replace("-", "_")] = path
    return found


def module_bytes(path: Path) -> bytes:
    """A module's ELF image, decompressed (busybox insmod takes only plain ones)."""
    data = path.read_bytes()
    if path.name.endswith(".ko.xz"):
        return lzma.decompress(data)
    if path.name.endswith(".ko.gz"):
        return gzip.decompress(data)
    if path.name.endswith(".ko.zst"):
        return _run_bytes(["zstd", "-dc", str(path)], f"zstd -d {path.name}")
    return data


def module_depends(image: bytes) -> list[str]:
    """The modules a module needs, from its ``.modinfo`` section (``depends=a,b``)."""
    from elftools.elf.elffile import ELFFile

    section = ELFFile(io.BytesIO(image)).get_section_by_name(".modinfo")
    if section is None:
        return []
    for entry in section.data().split(b"\0"):
        if entry.startswith(b"depends="):
            return [name.replace("-", "_") for name in entry.decode().removeprefix("depends=").split(",") if name]
    return []


def load_order(
    wanted: Iterable[str], depends: Callable[[str], list[str]], available: set[str], builtin: set[str]
) -> list[str]:
    """``wanted`` and what they need, each after its dependencies; built-in ones are left out."""
    order: list[str] = []

    def visit(name: str, chain: tuple[str, ...]) -> None:
        if name in builtin or name in order:
            return
        if name in chain:
            raise ImageError(f"kernel modules depend on each other in a cycle: {' -> '.join((*chain, name))}")
        if name not in available:
            raise ImageError(f"the kernel package has no module {name} (needed by {' -> '.join(chain) or 'stage 1'})")
        for dependency in depends(name):
            visit(dependency, (*chain, name))
        order.append(name)

    for name in wanted:
        visit(name, ())
    return order


def _write_initramfs(kernel_tree: Path, release: str, busybox: Path, init: Path, dest: Path) -> list[str]:
    """Write stage 1 (gzipped newc cpio) to ``dest``; returns the modules it loads, in order."""
    modules_dir = kernel_tree / "lib/modules" / release
    files = module_files(modules_dir)
    builtin = _builtin_modules(modules_dir)
    images: dict[str, bytes] = {}

    def depends(name: str) -> list[str]:
        images[name] = module_bytes(files[name])
        return module_depends(images[name])

    wanted = [*MODULES, *(m for m in OPTIONAL_MODULES if m in files)]
    order = load_order(wanted, depends, set(files), builtin)
    archive = Cpio()
    for directory in ("bin", "dev", "proc", "sys", "ro", "rw", "newroot", "lib", "lib/modules"):
        archive.directory(directory)
    archive.device("dev/console", 0o600, 5, 1)
    archive.file("bin/busybox", busybox.read_bytes(), 0o755)
    for applet in STAGE1_APPLETS:
        archive.symlink(f"bin/{applet}", "busybox")
    archive.file("init", init.read_bytes(), 0o755)
    for name in order:
        archive.file(f"lib/modules/{name}.ko", images[name], 0o644)
    archive.file("lib/modules/load", "".join(f"{name}\n" for name in order).encode(), 0o644)
    dest.write_bytes(gzip.compress(archive.finish(), compresslevel=6, mtime=0))
    return order


def _builtin_modules(modules_dir: Path) -> set[str]:
    try:
        lines = (modules_dir / "modules.builtin").read_text().split()
    except FileNotFoundError:
        return set()
    return {Path(line).name.split(".ko")[0].replace("-", "_") for line in lines}


class Cpio:
    """A newc ("070701") cpio archive, as the kernel unpacks an initramfs: no cpio tool, no mknod."""

    def __init__(self) -> None:
        self._out = io.BytesIO()
        self._inode = 0

    def directory(self, name: str, mode: int = 0o755) -> None:
        self._entry(name, stat.S_IFDIR | mode, b"", nlink=2)

    def file(self, name: str, data: bytes, mode: int) -> None:
        self._entry(name, stat.S_IFREG | mode, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def device(self, name: str, mode: int, major: int, minor: int) -> None:
        self._entry(name, stat.S_IFCHR | mode, b"", rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0, b"", nlink=1)
        return self._out.getvalue()

    def _entry(self, name: str, mode: int, data: bytes, *, nlink: int = 1, rdev: tuple[int, int] = (0, 0)) -> None:
        self._inode += 1
        encoded = name.encode() + b"\0"
        fields = (self._inode, mode, 0, 0, nlink, 0, len(data), 0, 0, rdev[0], rdev[1], len(encoded), 0)
        self._out.write(b"070701" + "".join(f"{value:08X}" for value in fields).encode() + encoded)
        self._pad()
        self._out.write(data)
        self._pad()

    def _pad(self) -> None:
        self._out.write(b"\0" * (-self._out.tell() % 4))


# --- the root filesystem ----------------------------------------------------------------------------


def _make_ext4(tree: Path, dest: Path) -> int:
    """``mkfs.ext4 -d``: the tree as an ext4 image, no mount; returns the bytes its files take.

    Sized to the files plus room for metadata; no journal (it is only ever mounted read-only) and
    explicit 4 KiB blocks and inode count (mke2fs's "small" defaults would give 1 KiB blocks).
    """
    used, entries = _tree_usage(tree)
    size_mib = math.ceil(used * 1.1 / 2**20) + 16
    inodes = entries + entries // 4 + 256
    argv = ["mkfs.ext4", "-q", "-F", "-b", "4096", "-N", str(inodes), "-m", "0", "-L", "nexroot"]
    argv += ["-O", "^has_journal", "-d", str(tree), str(dest), f"{size_mib}M"]
    _run(argv, "mkfs.ext4")
    return used


def _tree_usage(tree: Path) -> tuple[int, int]:
    """Bytes the tree's entries take in 4 KiB blocks, and how many entries it has."""
    used, entries = 0, 0
    for directory, dirs, files in os.walk(tree):
        for name in (*dirs, *files):
            entries += 1
            info = os.lstat(os.path.join(directory, name))
            if stat.S_ISREG(info.st_mode) or stat.S_ISDIR(info.st_mode):
                used += max(1, math.ceil(info.st_size / 4096)) * 4096
    return used, entries


# --- helpers ----------------------------------------------------------------------------------------


def _run(argv: list[str], what: str, error: type[ImageError] = ImageError, *, cwd: Path | None = None) -> str:
    return _run_bytes(argv, what, error, cwd=cwd).decode(errors="replace")


def _run_bytes(argv: list[str], what: str, error: type[ImageError] = ImageError, *, cwd: Path | None = None) -> bytes:
    """Run a tool to completion; its failure is an ``error`` naming the step and its last words."""
    try:
        done = subprocess.run(argv, cwd=cwd, stdin=subprocess.DEVNULL, capture_output=True, check=False)
    except FileNotFoundError:
        raise ImageError(f"{what}: {argv[0]} is not installed") from None
    if done.returncode != 0:
        raise error(f"{what} failed (exit {done.returncode}): {_last_line(done.stderr or done.stdout)}")
    return done.stdout


def _last_line(output: bytes) -> str:
    """The tool's most telling line: its last error (E: for apt), else its last line."""
    lines = [line.strip() for line in output.decode(errors="replace").splitlines() if line.strip()]
    lines = [line for line in lines if not line.startswith("WARNING: Location")] or lines  # pip's index noise
    errors = [line for line in lines if line.startswith(("E:", "ERROR:", "error:"))]
    return (errors or lines or ["no message"])[-1]


def _mib(path: Path) -> str:
    return f"{path.stat().st_size / 2**20:.1f} MiB"
