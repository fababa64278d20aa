"""A bootable Linux guest made from Debian packages, without installing them on the host.

    apt-get download  linux-image-<abi>-cloud-amd64  busybox-static  qemu-guest-agent
    dpkg-deb -x       → vmlinuz, the few modules the guest needs, busybox, qemu-ga
    ldd qemu-ga       → its libraries (from the host: qemu-system-x86 depends on the same)
    find | cpio -H newc | gzip  → initrd.gz, whose /init (init.sh) mounts /dev/vda on /data
                                   and runs the guest agent on its virtio-serial port

The result is cached under ``$NBDSRV_GUEST_CACHE`` (default ``~/.cache/nbdsrv-guest``) in a
directory keyed by the package versions apt would download now and by this builder's own
sources, so a kernel update or a change here builds a new guest and nothing else does.
Several test runs may build at once (helpers share the machine): a lock file serialises them
and a finished guest appears by an atomic rename.

Run ``python -m tests.guest.build`` to build (or find) the guest and print its paths.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

KERNEL_METAPACKAGE = "linux-image-cloud-amd64"
PACKAGES = ("busybox-static", "qemu-guest-agent")
# virtio_pci: the bus; virtio_blk: the data disk; virtio_console: the agent's port. ext4,
# jbd2 and crc32c are built into the cloud kernel.
MODULES = ("virtio_pci", "virtio_blk", "virtio_console")
INIT_SCRIPT = Path(__file__).with_name("init.sh")
AGENT = "usr/sbin/qemu-ga"


class GuestBuildError(Exception):
    """The guest could not be built; the message says what failed."""


@dataclass(frozen=True)
class Guest:
    """A built guest: boot it with ``-kernel kernel -initrd initrd``."""

    kernel: Path
    initrd: Path
    versions: Mapping[str, str]


def cache_root() -> Path:
    configured = os.environ.get("NBDSRV_GUEST_CACHE")
    return Path(configured) if configured else Path.home() / ".cache" / "nbdsrv-guest"


def build_guest(root: Path | None = None) -> Guest:
    """The cached guest for the package versions apt offers now; built when missing."""
    root = root or cache_root()
    root.mkdir(parents=True, exist_ok=True)
    with open(root / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        versions = _versions(root)
        key = hashlib.sha256(
            json.dumps(versions, sort_keys=True).encode()
            + Path(__file__).read_bytes()
            + INIT_SCRIPT.read_bytes()
        ).hexdigest()[:16]
        final = root / key
        if not (final / "initrd.gz").exists():
            work = Path(tempfile.mkdtemp(prefix="build-", dir=root))
            try:
                _build(work, versions)
                (work / "out" / "versions.json").write_text(json.dumps(versions, indent=1))
                shutil.rmtree(final, ignore_errors=True)
                os.rename(work / "out", final)
                for other in root.glob("*/versions.json"):  # guests of older versions
                    if other.parent != final:
                        shutil.rmtree(other.parent, ignore_errors=True)
            finally:
                shutil.rmtree(work, ignore_errors=True)
    return Guest(final / "vmlinuz", final / "initrd.gz", versions)


def _run(argv: list[str], cwd: Path | None = None) -> str:
    result = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=300)
    if result.returncode != 0:
        raise GuestBuildError(
            f"{' '.join(argv)} failed with status {result.returncode}: {result.stderr.strip()}"
        )
    return result.stdout


def _versions(root: Path) -> dict[str, str]:
    """Package → the version `apt-get download` would fetch now, the kernel image first.

    Asking apt takes seconds on a busy machine, so the answer is kept per state of apt's
    package lists and configuration: it can only change when they do.
    """
    state = hashlib.sha256()
    for directory in (Path("/var/lib/apt/lists"), Path("/etc/apt")):
        for path in sorted(directory.rglob("*")):
            if path.is_file():
                st = path.stat()
                state.update(f"{path} {st.st_size} {st.st_mtime_ns}\n".encode())
    memo = root / f"apt-{state.hexdigest()[:16]}.json"
    if memo.exists():
        return dict(json.loads(memo.read_text()))
    out = _run(["apt-cache", "depends", KERNEL_METAPACKAGE])
    match = re.search(r"Depends:\s*(linux-image-\S+-cloud-amd64)", out)
    if match is None:
        raise GuestBuildError(f"no kernel image among the dependencies: {out.strip()!r}")
    packages = (match.group(1), *PACKAGES)
    # `apt-cache policy A B C` prints a section per package: "A:" then "  Candidate: V".
    out = _run(["apt-cache", "policy", *packages])
    candidates = dict(re.findall(r"^(\S+):\n\s+Installed:.*\n\s+Candidate:\s*(\S+)", out, re.M))
    versions = {}
    for package in packages:
        version = candidates.get(package, "(none)")
        if version == "(none)":
            raise GuestBuildError(
                f"apt knows no candidate for {package} (run `apt-get update` with the Debian "
                "bookworm sources enabled)"
            )
        versions[package] = version
    for old in root.glob("apt-*.json"):
        old.unlink()
    memo.write_text(json.dumps(versions))
    return versions


def _build(work: Path, versions: Mapping[str, str]) -> None:
    debs = work / "debs"
    debs.mkdir()
    _run(["apt-get", "download", *(f"{p}={v}" for p, v in versions.items())], cwd=debs)
    tree = work / "tree"
    for deb in sorted(debs.glob("*.deb")):
        _run(["dpkg-deb", "-x", str(deb), str(tree)])
    out = work / "out"
    out.mkdir()
    kernels = sorted((tree / "boot").glob("vmlinuz-*"))
    if len(kernels) != 1:
        raise GuestBuildError(f"expected one kernel in the packages, found {kernels}")
    release = kernels[0].name.removeprefix("vmlinuz-")
    shutil.copy(kernels[0], out / "vmlinuz")

    root = work / "initramfs"
    for d in ("bin", "sbin", "dev", "proc", "sys", "run", "tmp", "data", "etc", "lib/modules"):
        (root / d).mkdir(parents=True)
    shutil.copy(tree / "bin" / "busybox", root / "bin" / "busybox")
    shutil.copy(tree / AGENT, root / "sbin" / "qemu-ga")
    _copy_libraries(tree / AGENT, root)

    modules = _module_paths(tree / "lib" / "modules" / release)
    order = _load_order(MODULES, modules)
    for name in order:
        shutil.copy(modules[name], root / "lib" / "modules" / f"{name}.ko")
    (root / "etc" / "modules").write_text("".join(f"{name}\n" for name in order))
    shutil.copy(INIT_SCRIPT, root / "init")
    os.chmod(root / "init", 0o755)

    files = _run(["find", ".", "-mindepth", "1"], cwd=root)
    with open(out / "initrd.gz", "wb") as initrd:
        cpio = subprocess.Popen(
            ["cpio", "--quiet", "-o", "-H", "newc", "--owner", "0:0"],
            cwd=root,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
        )
        gzip = subprocess.Popen(["gzip", "-6", "-n"], stdin=cpio.stdout, stdout=initrd)
        assert cpio.stdin is not None and cpio.stdout is not None
        cpio.stdout.close()
        cpio.stdin.write(files.encode())
        cpio.stdin.close()
        if cpio.wait(300) != 0 or gzip.wait(300) != 0:
            raise GuestBuildError("cpio | gzip of the initramfs failed")


def _copy_libraries(binary: Path, root: Path) -> None:
    """Every library `ldd` resolves for `binary`, at the path the loader will look in."""
    out = _run(["ldd", str(binary)])
    for line in out.splitlines():
        if "not found" in line:
            raise GuestBuildError(f"ldd {binary}: {line.strip()} (install it on the host)")
        match = re.search(r"(/\S+) \(0x", line)
        if match is None:
            continue  # linux-vdso.so.1
        path = match.group(1)
        target = root / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(os.path.realpath(path), target)


def _module_paths(release_dir: Path) -> dict[str, Path]:
    """Module name (as `depends=` spells it: `-` read as `_`) → its .ko file."""
    return {
        ko.name.removesuffix(".ko").replace("-", "_"): ko
        for ko in (release_dir / "kernel").rglob("*.ko")
    }


def _load_order(wanted: Iterable[str], modules: Mapping[str, Path]) -> list[str]:
    """`wanted` and everything they depend on, each after its dependencies."""
    order: list[str] = []

    def visit(name: str, path: tuple[str, ...]) -> None:
        if name in order:
            return
        if name in path:
            raise GuestBuildError(f"module dependency loop: {' → '.join((*path, name))}")
        if name not in modules:
            raise GuestBuildError(f"module {name} is not in the kernel package")
        for dep in modinfo(modules[name]).get("depends", "").split(","):
            if dep:
                visit(dep, (*path, name))
        order.append(name)

    for name in wanted:
        visit(name, ())
    return order


def modinfo(ko: Path) -> dict[str, str]:
    """The `.modinfo` section of a kernel module (ELF64, little-endian): key → value.

    The packages carry no modules.dep (depmod makes it at install time), so dependencies
    come from here, where depmod reads them too.
    """
    data = ko.read_bytes()
    if data[:6] != b"\x7fELF\x02\x01":
        raise GuestBuildError(f"{ko} is not a little-endian ELF64 module")
    (shoff,) = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)

    def section(index: int) -> tuple[int, int, int]:
        name, _type, _flags, _addr, offset, size = struct.unpack_from(
            "<IIQQQQ", data, shoff + index * shentsize
        )
        return name, offset, size

    _, names_offset, _ = section(shstrndx)
    for index in range(shnum):
        name, offset, size = section(index)
        if data[names_offset + name :].startswith(b".modinfo\0"):
            fields = data[offset : offset + size].split(b"\0")
            return dict(f.decode(errors="replace").partition("=")[::2] for f in fields if b"=" in f)
    return {}


if __name__ == "__main__":
    try:
        guest = build_guest()
    except GuestBuildError as e:
        sys.exit(f"guest build failed: {e}")
    print(json.dumps({"kernel": str(guest.kernel), "initrd": str(guest.initrd), **guest.versions}))
