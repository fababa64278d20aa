"""The error of restore sessions (drawn in nbdsrv/errors.py's tree)."""

from ..errors import NbdsrvError


class RestoreError(NbdsrvError):
    """A restore session cannot begin or end as asked (bad input, a refused image or source,
    QEMU's reason in its own words)."""

    code = "restore"
