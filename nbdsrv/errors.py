"""The one error tree of nbdsrv.

Every error nbdsrv raises on purpose is an :class:`NbdsrvError`: one sentence a user can read
(CLI: ``nbdsrv: error: …``), and a stable ``code`` that the control protocol sends beside the
sentence (``{"ok": false, "error": {"code": …, "message": …}}``). Codes never change when a
class is renamed or moved; docs/reference.md ("Errors") lists them.

NbdsrvError                                  code
 ├── UsageError            bad command line  usage
 ├── ConfigError           bad configuration config
 ├── BadRequestError       malformed control request, unknown operation or argument
 │                                           bad-request
 ├── PermissionDeniedError a control client that may not use the daemon (or this operation)
 │                                           permission-denied
 ├── UnsupportedVersionError a request needs a newer control protocol   unsupported-version
 ├── LimitError            a remote control client passed a limit (request size,
 │                         connections)                                 limit
 ├── ControlError          the daemon cannot be reached, or answered with an error
 │                         (client side; ``code`` is then the daemon's)   control
 ├── NotFoundError         unknown VM, export, checkpoint or session     not-found
 ├── InternalError         a bug of nbdsrv's, answered in one line       internal
 ├── CheckpointError       backup/checkpoints.py                         checkpoint
 ├── SessionError          backup/sessions.py                            session
 ├── RestoreError          restore/errors.py                             restore
 ├── StoreError            backup/store.py: metadata not written         store
 ├── SnapshotError         backends/qmp/external_snapshots.py            snapshot
 ├── QuiesceError          backends/qmp/quiesce.py                       quiesce
 ├── GuestFrozenError      backends/frozen_guest.py: the thaw was not confirmed
 │                                                                      guest-frozen
 ├── ThawNotConfirmed      backends/libvirt/vm.py: the same, inside a libvirt call
 │                                                                      guest-frozen
 ├── LibvirtError          backends/libvirt/connection.py                libvirt
 │    └── NotConnectedError                                    libvirt-not-connected
 ├── LibvirtRefusal        backends/libvirt/vm.py: not offered for libvirt domains
 │                                                                      libvirt-refused
 ├── QEMUError             qemu/errors.py                                qemu
 │    ├── QMPError                                                      qmp
 │    │    └── QMPTimeoutError                                          qmp-timeout
 │    │         └── EventTimeoutError                                   event-timeout
 │    ├── QEMUGoneError                                                 qemu-gone
 │    │    └── QEMUUnreachableError                                     qemu-unreachable
 │    ├── ImageError                                                    image
 │    ├── StorageDaemonError                                            storage-daemon
 │    └── GuestAgentError  qemu/guest_agent.py                          guest-agent
 ├── NBDError              proto/errors.py: the NBD protocol tier        nbd
 │    ├── ProtocolError    the peer broke the protocol: hang up          nbd-protocol
 │    └── ReplyError       a server refused an option or request         nbd-reply
 │         └── ConnectionClosed   net/client.py                          nbd-closed
 ├── OptionError           proto/server.py: answered NBD_REP_ERR_*       nbd-option
 └── ExportGone            exports/export.py: answered ESHUTDOWN         export-gone

The NBD tier is caught where the STYLE's three tiers say (a ProtocolError closes the
connection, an OptionError becomes an option reply, a request error an errno reply); it
reaches control clients only when a control operation itself talks NBD.
"""


class NbdsrvError(Exception):
    """A failure explained in one sentence, with a stable code for the control protocol."""

    code = "error"


class UsageError(NbdsrvError):
    """The command line is wrong (unknown option, bad value, missing argument)."""

    code = "usage"


class ConfigError(NbdsrvError):
    """A configuration value cannot be used (a path, an address, a rule)."""

    code = "config"


class BadRequestError(NbdsrvError):
    """A control request is malformed, names an unknown operation, or has bad arguments."""

    code = "bad-request"


class PermissionDeniedError(NbdsrvError):
    """A control client is not allowed to use the daemon."""

    code = "permission-denied"


class UnsupportedVersionError(NbdsrvError):
    """A request carries a control protocol version newer than the daemon speaks."""

    code = "unsupported-version"


class LimitError(NbdsrvError):
    """A remote control client passed one of the daemon's limits (a request line too long,
    too many connections)."""

    code = "limit"


class ControlError(NbdsrvError):
    """The daemon cannot be reached, or answered with an error.

    For an error answer, ``code`` is the daemon's code for it (one of this tree's codes), so a
    client can tell ``not-found`` from ``session`` without reading the sentence."""

    code = "control"

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code


class NotFoundError(NbdsrvError):
    """An unknown VM, export, checkpoint or session."""

    code = "not-found"


class InternalError(NbdsrvError):
    """A bug of nbdsrv's, logged in full and answered in one line."""

    code = "internal"
