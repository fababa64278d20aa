"""Live restore into a disk of an --image VM from an ``nbds://`` source: qemu-nbd serves the
backup over TLS on TCP, and the QSD that holds the disk reads it with the daemon's TLS files
(its certificate as the client's, its CA to verify the source). The disk ends as the source
plus a write made through restore/ID while the copy ran (sha256)."""

import asyncio
import random
import socket
import subprocess
from pathlib import Path

import pytest

from tests.conftest import StartDaemon
from tests.harness.tools import require_tool, run, stop_process
from tests.restore.test_live_disk import read_all, sha, wait_state, write_with_nbdsh
from tests.security.certs import Certs

KiB = 1024
MiB = 1024 * KiB
SIZE = 16 * MiB
WRITE = (5 * MiB + 4 * KiB, 192 * KiB, 0x5A)  # through restore/ID while it streams


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class TLSSource:
    """qemu-nbd serving ``image`` read-only over TLS on 127.0.0.1 as export ``backup``."""

    def __init__(self, image: Path, certs: Certs) -> None:
        self.port = free_port()
        self.proc = subprocess.Popen(
            [
                *(require_tool("qemu-nbd"), "-r", "-t", "-f", "qcow2", "-x", "backup"),
                *("-b", "127.0.0.1", "-p", str(self.port), "--tls-creds", "tls0"),
                "--object",
                f"tls-creds-x509,id=tls0,dir={certs.server},endpoint=server,verify-peer=off",
                str(image),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    @property
    def uri(self) -> str:
        return f"nbds://127.0.0.1:{self.port}/backup"

    async def wait_listening(self) -> None:
        for _ in range(200):
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            await asyncio.sleep(0.05)
        raise AssertionError("qemu-nbd did not listen")


def test_live_restore_into_a_disk_from_an_nbds_source(
    nbdsrv_daemons: StartDaemon,
    short_dir: Path,
    tmp_path: Path,
    certs: Certs,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The backup: random data with a hole, as a sparse qcow2.
    data = bytearray(random.Random(11).randbytes(SIZE))
    data[8 * MiB : 12 * MiB] = bytes(4 * MiB)
    (tmp_path / "backup.raw").write_bytes(bytes(data))
    backup = tmp_path / "backup.qcow2"
    run(
        [
            require_tool("qemu-img"),
            "convert",
            "-O",
            "qcow2",
            str(tmp_path / "backup.raw"),
            str(backup),
        ]
    )
    # The disk holds something else everywhere, the backup's hole included.
    disk = tmp_path / "disk.qcow2"
    run([require_tool("qemu-img"), "create", "-q", "-f", "qcow2", str(disk), str(SIZE)])
    run([require_tool("qemu-io"), "-f", "qcow2", "-c", f"write -P 0x66 0 {SIZE}", str(disk)])

    source = TLSSource(backup, certs)
    monkeypatch.setenv("NBDSRV_RESTORE_SPEED", str(2 * MiB))  # copying for some seconds
    try:
        asyncio.run(source.wait_listening())
        # TLS offered (plain clients still served), with the files a source is read with.
        daemon = nbdsrv_daemons(
            "--listen", f"unix:{short_dir / 'nbd.sock'}", "--image", f"vm1={disk}",
            "--tls", "on", *certs.server_args_with_ca,
        )  # fmt: skip
        began = daemon.json("restore", "begin", "vm1", "--disk", "disk0", "--source", source.uri)
        assert began["state"] == "streaming" and began["source"] == source.uri, began
        assert began["size"] == SIZE

        # Reads as the source at once; a write lands while the copy goes on.
        assert sha(read_all(began["uri"], tmp_path / "early.raw")) == sha(bytes(data))
        offset, length, pattern = WRITE
        write_with_nbdsh(began["uri"], offset, length, pattern, flush=True)
        [during] = daemon.json("restore", "list")
        assert during["state"] == "streaming", during  # the write was made during the copy
        data[offset : offset + length] = bytes([pattern]) * length

        info = wait_state(daemon, began["id"], "ready", "failed")
        assert info["state"] == "ready" and info["error"] is None, info
        daemon.json("restore", "end", began["id"])
    finally:
        stop_process(source.proc)

    # The disk itself, through its live export again: the source plus the write.
    live = f"nbd+unix:///disk0?socket={daemon.state_dir}/vm1.live.sock"
    assert sha(read_all(live, tmp_path / "now.raw")) == sha(bytes(data))
    assert list(tmp_path.glob("disk.qcow2.restore-*")) == []
