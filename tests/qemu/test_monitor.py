"""Monitor against a real qemu-storage-daemon (and a silent fake for timeouts)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
from pathlib import Path

import pytest

from nbdsrv.qemu.errors import QEMUUnreachableError, QMPError, QMPTimeoutError
from nbdsrv.qemu.monitor import Monitor, QMPEvent, raise_first_error
from nbdsrv.qemu.storage_daemon import StorageDaemon

from .conftest import Exits


async def test_qmp_error_names_the_command_and_gives_qemus_text(qsd: StorageDaemon) -> None:
    args = {"node": "disk0", "name": "c1"}
    await qsd.monitor.execute("block-dirty-bitmap-add", args)
    with pytest.raises(QMPError) as info:
        await qsd.monitor.execute("block-dirty-bitmap-add", args)
    assert str(info.value) == "block-dirty-bitmap-add failed: Bitmap already exists: c1"
    assert (info.value.command, info.value.error_class) == (
        "block-dirty-bitmap-add",
        "GenericError",
    )


async def test_transaction_is_all_or_nothing(qsd: StorageDaemon) -> None:
    monitor = qsd.monitor
    await monitor.transaction(
        [
            ("block-dirty-bitmap-add", {"node": "disk0", "name": "a"}),
            ("block-dirty-bitmap-add", {"node": "disk1", "name": "a"}),
        ]
    )
    with pytest.raises(QMPError, match=r"^transaction failed: Bitmap already exists: a$"):
        await monitor.transaction(
            [
                ("block-dirty-bitmap-add", {"node": "disk0", "name": "b"}),
                ("block-dirty-bitmap-add", {"node": "disk1", "name": "a"}),
            ]
        )
    nodes = await monitor.execute("query-named-block-nodes", {"flat": True})
    names = {n["node-name"]: [b["name"] for b in n.get("dirty-bitmaps", [])] for n in nodes}
    assert names["disk0"] == ["a"]


async def test_wait_event_finds_an_event_that_came_before_the_wait(qsd: StorageDaemon) -> None:
    monitor = qsd.monitor
    seen: list[QMPEvent] = []
    unsubscribe = monitor.subscribe("BLOCK_EXPORT_DELETED", seen.append)
    seq = monitor.last_seq
    await monitor.execute("block-export-del", {"id": "disk1"})
    await asyncio.sleep(0.2)  # the event is in by now
    event = await monitor.wait_event(
        "BLOCK_EXPORT_DELETED", lambda e: e.data["id"] == "disk1", timeout=5, after=seq
    )
    assert event.seq > seq and event.timestamp > 0
    assert [e.data["id"] for e in seen] == ["disk1"]
    unsubscribe()
    assert monitor.events("BLOCK_EXPORT_DELETED", after=seq) == [event]


async def test_qemu_qmp_keeps_no_events_of_its_own(qsd: StorageDaemon) -> None:
    """Events are kept in the Monitor's bounded history only: qemu.qmp's default listener
    would otherwise queue every event for as long as the connection lives."""
    monitor = qsd.monitor
    seq = monitor.last_seq
    await monitor.execute("block-export-del", {"id": "disk1"})
    await monitor.wait_event("BLOCK_EXPORT_DELETED", timeout=5, after=seq)
    client = monitor._client  # the library's state is what this test is about
    assert client is not None
    assert client.events.empty() and client.events.history == ()


async def test_wait_event_times_out_clearly(qsd: StorageDaemon) -> None:
    with pytest.raises(QMPTimeoutError, match=r"^QEMU sent no SHUTDOWN event within 0\.1s$"):
        await qsd.monitor.wait_event("SHUTDOWN", timeout=0.1)


async def test_monitor_reconnects_when_qemu_restarts_on_the_same_socket(
    qsd: StorageDaemon, exits: Exits
) -> None:
    assert qsd.test_qmp_path is not None
    reconnected = asyncio.Event()
    reasons: list[str] = []

    async def on_reconnect() -> None:
        reconnected.set()

    monitor = Monitor(
        str(qsd.test_qmp_path),
        on_reconnect=on_reconnect,
        on_disconnect=reasons.append,
        backoff_initial=0.05,
        backoff_max=0.5,
    )
    await monitor.connect()
    try:
        assert qsd.pid is not None
        os.kill(qsd.pid, signal.SIGKILL)
        await asyncio.wait_for(exits.event.wait(), 10)
        for _ in range(100):
            if monitor.reconnecting:
                break
            await asyncio.sleep(0.02)
        assert monitor.reconnecting and not monitor.connected
        assert len(reasons) == 1
        await qsd.start()
        await asyncio.wait_for(reconnected.wait(), 10)
        assert monitor.connected
        exports = await monitor.execute("query-block-exports")
        assert {e["id"] for e in exports} == {"disk0", "disk1"}
    finally:
        await monitor.close()


async def test_connect_to_nothing_is_a_clear_error(tmp_path: Path) -> None:
    monitor = Monitor(str(tmp_path / "no.sock"))
    with pytest.raises(QEMUUnreachableError, match=r"^cannot reach QEMU at .*no\.sock: "):
        await monitor.connect()


async def test_a_monitor_in_use_does_not_answer_a_second_client(qsd: StorageDaemon) -> None:
    second = Monitor(str(qsd.qmp_path), attempt_timeout=0.3)
    with pytest.raises(QEMUUnreachableError, match="another client connected"):
        await second.connect()


async def test_command_timeout_names_the_command(tmp_path: Path) -> None:
    """A QMP server that greets, negotiates, then never answers."""
    path = tmp_path / "silent.sock"

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        version = {"qemu": {"major": 7, "minor": 2, "micro": 0}, "package": ""}
        greeting = {"QMP": {"version": version, "capabilities": []}}
        writer.write(json.dumps(greeting).encode() + b"\n")
        line = json.loads(await reader.read(4096))  # qemu.qmp sends no newline
        reply = {"return": {}} | ({"id": line["id"]} if "id" in line else {})
        writer.write(json.dumps(reply).encode() + b"\n")
        await reader.read()  # swallow everything else
        writer.close()

    server = await asyncio.start_unix_server(serve, str(path))
    monitor = Monitor(str(path), reconnect=False)
    try:
        await monitor.connect()
        with pytest.raises(QMPTimeoutError, match=r"^query-block timed out after 0\.2s$"):
            await monitor.execute("query-block", timeout=0.2)
    finally:
        await monitor.close()
        server.close()
        await server.wait_closed()


async def test_execute_many_runs_in_order_and_returns_each_answer(qsd: StorageDaemon) -> None:
    # Each command needs the one before it: out of order, QEMU would refuse them.
    results = await qsd.monitor.execute_many(
        [
            ("block-dirty-bitmap-add", {"node": "disk0", "name": "a"}),
            ("block-dirty-bitmap-disable", {"node": "disk0", "name": "a"}),
            ("block-dirty-bitmap-add", {"node": "disk0", "name": "a"}),  # refused
            ("block-dirty-bitmap-remove", {"node": "disk0", "name": "a"}),
            ("query-named-block-nodes", {"flat": True}),
        ]
    )
    assert results[:2] == [{}, {}]
    assert isinstance(results[2], QMPError)
    assert str(results[2]) == "block-dirty-bitmap-add failed: Bitmap already exists: a"
    assert results[3] == {}
    disk0 = next(n for n in results[4] if n["node-name"] == "disk0")
    assert disk0.get("dirty-bitmaps", []) == []
    with pytest.raises(QMPError, match="already exists"):
        raise_first_error(results)
