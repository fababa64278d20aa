"""Errors users see, and the one mapping from OSError to NBD errno.

NbdsrvError                 one clear sentence for the user (CLI: `nbdsrv: error: ...`)
 ├── ConfigError            bad command-line or configuration value
 ├── ControlError           the control socket cannot be reached or answered an error
 └── NotFoundError          an unknown VM, export, checkpoint or session
"""

import errno as _errno

from .proto.constants import Errno


class NbdsrvError(Exception):
    """A failure explained in one sentence."""


class ConfigError(NbdsrvError):
    pass


class ControlError(NbdsrvError):
    pass


class NotFoundError(NbdsrvError):
    pass


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
