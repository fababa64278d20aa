"""Errors of the protocol core.

NBDError
 ├── ProtocolError      the peer broke the protocol: close the connection
 └── ReplyError         the server answered a request or option with an error (client side)
"""


class NBDError(Exception):
    """Base of the protocol core's errors."""


class ProtocolError(NBDError):
    """The peer sent something the protocol forbids; the only answer is to hang up."""


class ReplyError(NBDError):
    """The server refused an option or failed a request (as seen by a client)."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
