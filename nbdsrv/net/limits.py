"""Default limits of the NBD server, apart so the CLI can show them without importing it."""

DEFAULT_MAX_CONNECTIONS = 128
DEFAULT_HANDSHAKE_TIMEOUT = 10.0
