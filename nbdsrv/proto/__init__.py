"""Sans-I/O NBD protocol core: bytes in, events out; no asyncio, no logging, no clock."""
