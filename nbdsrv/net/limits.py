"""Default limits of the NBD server, apart so the CLI can show them without importing it."""

DEFAULT_MAX_CONNECTIONS = 128
DEFAULT_HANDSHAKE_TIMEOUT = 10.0
# After a block status answered at once, how long to wait for the client's next request
# (seconds): a client that maps one extent at a time (qemu-img map: REQ_ONE) sends it 25-35 µs
# after our answer on this machine, and waking the daemon for it costs more than that.
POLL_WINDOW = 50e-6
