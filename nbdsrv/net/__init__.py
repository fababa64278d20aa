"""asyncio layer: sockets, concurrency, shutdown. The protocol itself lives in nbdsrv.proto."""
