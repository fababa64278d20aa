"""A READ reply sink for tests: the chunks as they came, and the bytes they filled in."""

import asyncio

from nbdsrv.proto.errors import ReplyError


class Recorder:
    """A reply sink that keeps the chunks as they came."""

    def __init__(self, offset: int, length: int) -> None:
        self.buffer = bytearray(length)
        self.offset = offset
        self.chunks: list[tuple[str, int, int]] = []
        self.future: asyncio.Future[ReplyError | None] = asyncio.get_running_loop().create_future()

    def pass_data(self, offset: int, length: int, last: bool, error: ReplyError | None) -> bool:
        return False  # every payload received here

    def pass_reply(self, cookie: int, offset: int, length: int) -> bool:
        return False

    def data_buffer(self, offset: int, length: int) -> memoryview:
        return memoryview(self.buffer)[offset - self.offset : offset - self.offset + length]

    def data(self, offset: int, length: int) -> None:
        self.chunks.append(("data", offset, length))

    def hole(self, offset: int, length: int) -> None:
        self.chunks.append(("hole", offset, length))

    def block_status(self, context_id: int, extents: list[tuple[int, int]]) -> None:
        pass

    def done(self, error: ReplyError | None) -> None:
        self.future.set_result(error)
