"""One method per control operation (nbdsrv/operations.py), for the blocking and the asyncio
client. Arguments are the operation's (``from`` is ``from_``); an optional one left out is
sent as null, exactly as the CLI does. tests/remote/test_client_library.py checks that every
operation of the table has its method in both, with the table's arguments."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, cast

if TYPE_CHECKING:  # not loaded by a CLI command: TypedDicts cost start-up time
    from .results import (
        Checkpoint,
        CheckpointCreated,
        CheckpointDeleted,
        Hello,
        Session,
        SessionEnded,
        SnapshotCommitted,
        SnapshotCreated,
        Status,
    )


class Operations:
    def call(self, op: str, args: dict[str, Any] | None = None) -> Any:
        raise NotImplementedError

    def hello(self) -> Hello:
        return cast("Hello", self.call("hello"))

    def status(self) -> Status:
        return cast("Status", self.call("status"))

    def checkpoint_create(
        self,
        vm: str,
        name: str | None = None,
        granularity: int | None = None,
        quiesce: bool = False,
    ) -> CheckpointCreated:
        args = {"vm": vm, "name": name, "granularity": granularity, "quiesce": quiesce}
        return cast("CheckpointCreated", self.call("checkpoint-create", args))

    def checkpoint_list(self, vm: str) -> list[Checkpoint]:
        return cast("list[Checkpoint]", self.call("checkpoint-list", {"vm": vm}))

    def checkpoint_delete(self, vm: str, name: str) -> CheckpointDeleted:
        return cast("CheckpointDeleted", self.call("checkpoint-delete", {"vm": vm, "name": name}))

    def backup_begin(
        self,
        vm: str,
        from_: str | None = None,
        checkpoint: str | None = None,
        no_checkpoint: bool = False,
        all_checkpoints: bool = False,
        bitmap_name: str | None = None,
        quiesce: bool = False,
    ) -> Session:
        return cast(
            "Session",
            self.call("backup-begin", _begin_args(vm, from_, checkpoint, no_checkpoint,
                                                  all_checkpoints, bitmap_name, quiesce)),
        )  # fmt: skip

    def backup_list(self, vm: str) -> list[Session]:
        return cast("list[Session]", self.call("backup-list", {"vm": vm}))

    def backup_end(self, vm: str, id: str) -> SessionEnded:
        return cast("SessionEnded", self.call("backup-end", {"vm": vm, "id": id}))

    def snapshot_create(self, vm: str, dir: str | None = None) -> SnapshotCreated:
        return cast("SnapshotCreated", self.call("snapshot-create", {"vm": vm, "dir": dir}))

    def snapshot_commit(self, vm: str) -> SnapshotCommitted:
        return cast("SnapshotCommitted", self.call("snapshot-commit", {"vm": vm}))


class AsyncOperations:
    async def call(self, op: str, args: dict[str, Any] | None = None) -> Any:
        raise NotImplementedError

    async def hello(self) -> Hello:
        return cast("Hello", await self.call("hello"))

    async def status(self) -> Status:
        return cast("Status", await self.call("status"))

    async def checkpoint_create(
        self,
        vm: str,
        name: str | None = None,
        granularity: int | None = None,
        quiesce: bool = False,
    ) -> CheckpointCreated:
        args = {"vm": vm, "name": name, "granularity": granularity, "quiesce": quiesce}
        return cast("CheckpointCreated", await self.call("checkpoint-create", args))

    async def checkpoint_list(self, vm: str) -> list[Checkpoint]:
        return cast("list[Checkpoint]", await self.call("checkpoint-list", {"vm": vm}))

    async def checkpoint_delete(self, vm: str, name: str) -> CheckpointDeleted:
        args = {"vm": vm, "name": name}
        return cast("CheckpointDeleted", await self.call("checkpoint-delete", args))

    async def backup_begin(
        self,
        vm: str,
        from_: str | None = None,
        checkpoint: str | None = None,
        no_checkpoint: bool = False,
        all_checkpoints: bool = False,
        bitmap_name: str | None = None,
        quiesce: bool = False,
    ) -> Session:
        return cast(
            "Session",
            await self.call("backup-begin", _begin_args(vm, from_, checkpoint, no_checkpoint,
                                                        all_checkpoints, bitmap_name, quiesce)),
        )  # fmt: skip

    async def backup_list(self, vm: str) -> list[Session]:
        return cast("list[Session]", await self.call("backup-list", {"vm": vm}))

    async def backup_end(self, vm: str, id: str) -> SessionEnded:
        return cast("SessionEnded", await self.call("backup-end", {"vm": vm, "id": id}))

    async def snapshot_create(self, vm: str, dir: str | None = None) -> SnapshotCreated:
        return cast("SnapshotCreated", await self.call("snapshot-create", {"vm": vm, "dir": dir}))

    async def snapshot_commit(self, vm: str) -> SnapshotCommitted:
        return cast("SnapshotCommitted", await self.call("snapshot-commit", {"vm": vm}))


def _begin_args(
    vm: str,
    from_: str | None,
    checkpoint: str | None,
    no_checkpoint: bool,
    all_checkpoints: bool,
    bitmap_name: str | None,
    quiesce: bool,
) -> dict[str, Any]:
    return {
        "vm": vm,
        "from": from_,
        "checkpoint": checkpoint,
        "no_checkpoint": no_checkpoint,
        "all_checkpoints": all_checkpoints,
        "bitmap_name": bitmap_name,
        "quiesce": quiesce,
    }
