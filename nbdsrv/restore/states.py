"""States of a restore session, as ``restore list`` shows them (the contract's words)."""

WRITABLE = "writable"
STREAMING = "streaming"
READY = "ready"
UNREACHABLE = "source unreachable"
FAILED = "failed"
