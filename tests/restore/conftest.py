"""Restore sessions served in-process: an NBD server on a unix socket, the restore sessions
with their real qemu-storage-daemon, and real clients run as subprocesses."""

import asyncio
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from nbdsrv.exports.catalog import ExportCatalog
from nbdsrv.net.address import Address
from nbdsrv.net.server import NBDServer, ServerPolicy
from nbdsrv.restore.sessions import RestoreSessions
from tests.harness.checksums import file_sha256
from tests.harness.tools import SYSTEM_PATH_FIRST, TIMEOUT, require_tool
from tests.security.conftest import certs  # noqa: F401 - the fixture, for nbds:// sources


@dataclass
class Served:
    sessions: RestoreSessions
    server: NBDServer
    socket: str
    state_dir: str

    def uri(self, export: str) -> str:
        return f"nbd+unix:///{export}?socket={self.socket}"


async def serve(short_dir: Path, name: str = "state") -> Served:
    catalog = ExportCatalog()
    server = NBDServer(catalog, ServerPolicy())
    socket = str(short_dir / f"{name}.nbd")
    await server.listen(Address("unix", path=socket))
    state_dir = str(short_dir / name)
    sessions = RestoreSessions(catalog, server.addresses, state_dir)
    return Served(sessions, server, socket, state_dir)


async def stop(served: Served) -> None:
    await served.sessions.shutdown()
    await served.server.stop()


@pytest.fixture
async def restore(short_dir: Path) -> AsyncIterator[Served]:
    for tool in ("qemu-storage-daemon", "qemu-img"):
        require_tool(tool)
    served = await serve(short_dir)
    try:
        yield served
    finally:
        await stop(served)


async def tool(*argv: str, check: bool = True, env: dict[str, str] | None = None) -> str:
    """Run a client while the server runs in this event loop; its stdout."""
    require_tool(argv[0])
    proc = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, **(env or {})},
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), TIMEOUT * 4)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise AssertionError(f"{argv} timed out") from None
    if check and proc.returncode != 0:
        raise AssertionError(f"{argv} failed ({proc.returncode}): {err.decode()}")
    return out.decode()


async def nbdsh(uri: str, script: str, contexts: list[str] | None = None) -> str:
    """An nbdsh script against ``uri`` (``h``: the handle, connected after asking for
    ``contexts``)."""
    argv = ["nbdsh"]
    for context in contexts or ():
        argv += ["--base-allocation"] if context == "base:allocation" else []
    return await tool(*argv, "-u", uri, "-c", script, env=SYSTEM_PATH_FIRST)


async def image_sha256(path: str | Path) -> str:
    """sha256 of what an image reads as (any format), through qemu-img convert."""
    raw = f"{path}.check.raw"
    await tool("qemu-img", "convert", "-O", "raw", str(path), raw)
    try:
        return file_sha256(raw)
    finally:
        os.unlink(raw)
