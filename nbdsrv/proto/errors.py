"""Errors of the protocol core, and the one mapping from OSError to an NBD errno.

NBDError               (a branch of nbdsrv.errors.NbdsrvError: the whole tree is drawn there)
 ├── ProtocolError      the peer broke the protocol: close the connection
 └── ReplyError         the server answered a request or option with an error (client side)
"""

import errno as _errno

from ..errors import NbdsrvError
from .constants import Errno


class NBDError(NbdsrvError):
    """Base of the protocol core's errors."""

    code = "nbd"


class ProtocolError(NBDError):
    """The peer sent something the protocol forbids; the only answer is to hang up."""

    code = "nbd-protocol"


class ReplyError(NBDError):
    """The server refused an option or failed a request (as seen by a client)."""

    code = "nbd-reply"

    def __init__(self, errno: int, message: str) -> None:
        super().__init__(message)
        self.errno = errno
        self.message = message


_OS_TO_NBD = {
    _errno.EPERM: Errno.EPERM,
    _errno.EACCES: Errno.EPERM,
    _errno.EROFS: Errno.EPERM,
    _errno.EIO: Errno.EIO,
    _errno.ENOMEM: Errno.ENOMEM,
    _errno.EINVAL: Errno.EINVAL,
    _errno.ENOSPC: Errno.ENOSPC,
    _errno.EDQUOT: Errno.ENOSPC,
    _errno.EFBIG: Errno.ENOSPC,
    _errno.EOVERFLOW: Errno.EOVERFLOW,
    _errno.ENOTSUP: Errno.ENOTSUP,
    _errno.ESHUTDOWN: Errno.ESHUTDOWN,
}


def nbd_errno(error: OSError) -> Errno:
    """The NBD error value for an OSError; EIO when there is no closer one."""
    return _OS_TO_NBD.get(error.errno or 0, Errno.EIO)
