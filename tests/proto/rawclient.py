"""A raw NBD client over asyncio streams, written from the spec (no nbdsrv client code)."""

import asyncio
import struct
from dataclasses import dataclass, field

from . import spec


class OptionRefused(Exception):
    def __init__(self, reply_type: int) -> None:
        super().__init__(f"option refused: 0x{reply_type:x}")
        self.reply_type = reply_type


@dataclass
class Answer:
    """Everything the server sent for one cookie."""

    error: int = 0
    data: bytearray = field(default_factory=bytearray)
    extents: dict[int, list[tuple[int, int]]] = field(default_factory=dict)
    done: int = 0  # how many final replies (simple reply or DONE chunk) arrived


class RawClient:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.structured = False
        self.size = 0
        # cookie -> (offset, length) of READs in flight, to frame simple replies
        self.reads: dict[int, tuple[int, int]] = {}

    @classmethod
    async def connect(cls, path: str) -> "RawClient":
        reader, writer = await asyncio.open_unix_connection(path)
        return cls(reader, writer)

    async def option(self, opt: int, data: bytes = b"") -> list[spec.OptionReply]:
        """Send an option; return its replies up to the final ACK or error."""
        self.writer.write(spec.option(opt, data))
        replies = []
        while True:
            header = await self.reader.readexactly(spec.L_OPTION_REPLY.size)
            magic, ropt, rtype, length = spec.L_OPTION_REPLY.unpack(header)
            assert (magic, ropt) == (spec.OPTION_REPLY_MAGIC, opt)
            replies.append(spec.OptionReply(ropt, rtype, await self.reader.readexactly(length)))
            if rtype == spec.REP_ACK or rtype & 0x80000000:
                return replies

    async def handshake(
        self, export: str, *, structured: bool = True, contexts: tuple[str, ...] = ()
    ) -> None:
        greeting = await self.reader.readexactly(spec.L_GREETING.size)
        assert greeting == spec.greeting()
        self.writer.write(spec.u32(3))
        if structured:
            assert (await self.option(spec.OPT_STRUCTURED_REPLY))[-1].type == spec.REP_ACK
            self.structured = True
            if contexts:
                await self.option(spec.OPT_SET_META_CONTEXT, spec.meta_data(export, contexts))
        replies = await self.option(spec.OPT_GO, spec.info_data(export))
        if replies[-1].type != spec.REP_ACK:
            raise OptionRefused(replies[-1].type)
        info = next(r.payload for r in replies if r.payload[:2] == spec.u16(spec.INFO_EXPORT))
        self.size = struct.unpack(">Q", info[2:10])[0]

    def read(self, cookie: int, offset: int, length: int, flags: int = 0) -> None:
        self.reads[cookie] = (offset, length)
        self.writer.write(spec.request(spec.CMD_READ, cookie, offset, length, flags))

    def block_status(self, cookie: int, offset: int, length: int, flags: int = 0) -> None:
        self.writer.write(spec.request(spec.CMD_BLOCK_STATUS, cookie, offset, length, flags))

    async def next_reply(self, answers: dict[int, Answer]) -> int:
        """Read one simple reply or chunk into ``answers``; return its cookie."""
        (magic,) = struct.unpack(">I", await self.reader.readexactly(4))
        if magic == spec.SIMPLE_REPLY_MAGIC:
            error, cookie = struct.unpack(">IQ", await self.reader.readexactly(12))
            answer = answers.setdefault(cookie, Answer())
            answer.error, answer.done = error, answer.done + 1
            offset_length = self.reads.pop(cookie, None)
            if error == 0 and offset_length is not None:
                answer.data += await self.reader.readexactly(offset_length[1])
            return cookie
        assert magic == spec.STRUCTURED_REPLY_MAGIC, hex(magic)
        flags, rtype, cookie, length = struct.unpack(">HHQI", await self.reader.readexactly(16))
        payload = await self.reader.readexactly(length)
        answer = answers.setdefault(cookie, Answer())
        start = self.reads.get(cookie, (0, 0))[0]
        if rtype == spec.TYPE_OFFSET_DATA:
            put(answer.data, struct.unpack(">Q", payload[:8])[0] - start, payload[8:])
        elif rtype == spec.TYPE_OFFSET_HOLE:
            offset, n = struct.unpack(">QI", payload)
            put(answer.data, offset - start, bytes(n))
        elif rtype == spec.TYPE_BLOCK_STATUS:
            context_id, extents = spec.parse_extents(payload)
            answer.extents[context_id] = extents
        elif rtype == spec.TYPE_ERROR:
            answer.error = spec.parse_error_chunk(payload)[0]
        else:
            assert rtype == spec.TYPE_NONE, rtype
        if flags & spec.REPLY_FLAG_DONE:
            answer.done += 1
            self.reads.pop(cookie, None)
        return cookie

    async def answers(self, cookies: set[int]) -> dict[int, Answer]:
        """Read replies until every cookie in ``cookies`` is finished."""
        answers: dict[int, Answer] = {}
        while not all(answers.get(c, Answer()).done for c in cookies):
            await self.next_reply(answers)
        return answers

    async def pread(self, offset: int, length: int, cookie: int = 1) -> bytes:
        self.read(cookie, offset, length)
        answer = (await self.answers({cookie}))[cookie]
        assert answer.error == 0, answer.error
        return bytes(answer.data)

    async def disconnect(self) -> None:
        self.writer.write(spec.request(spec.CMD_DISC, 0, 0, 0))
        await self.writer.drain()
        assert await self.reader.read() == b""  # the server closes after DISC
        self.writer.close()


def put(buf: bytearray, at: int, data: bytes) -> None:
    if len(buf) < at + len(data):
        buf.extend(bytes(at + len(data) - len(buf)))
    buf[at : at + len(data)] = data
