"""Errors from talking to QEMU; each is one sentence a user can read.

NbdsrvError
 └── QEMUError              anything that went wrong with QEMU
      ├── QMPError          a QMP command failed: "CMD failed: QEMU's own text"
      │    └── QMPTimeoutError   no answer in time: "CMD timed out after Ns"
      │    └── EventTimeoutError  an awaited event did not come in time
      ├── QEMUGoneError     the QMP connection is lost
      │    └── QEMUUnreachableError   no QMP connection could be made at all
      ├── ImageError        an image is missing or in a format we do not handle
      └── StorageDaemonError    the private qemu-storage-daemon failed to start or died
"""

from ..errors import NbdsrvError


class QEMUError(NbdsrvError):
    """Something went wrong with QEMU."""

    code = "qemu"


class QMPError(QEMUError):
    """A QMP command returned an error.

    `command` is the command name, `error_class` QEMU's error class (e.g. "GenericError")
    and `desc` QEMU's own message.
    """

    code = "qmp"

    def __init__(self, command: str, desc: str, error_class: str = "GenericError") -> None:
        super().__init__(f"{command} failed: {desc}")
        self.command = command
        self.desc = desc
        self.error_class = error_class


class QMPTimeoutError(QMPError):
    """A QMP command got no answer in time (QEMU may still carry it out)."""

    code = "qmp-timeout"

    def __init__(self, command: str, timeout: float) -> None:
        desc = f"no answer from QEMU after {timeout:g}s"
        QEMUError.__init__(self, f"{command} timed out after {timeout:g}s")
        self.command = command
        self.desc = desc
        self.error_class = "Timeout"
        self.timeout = timeout


class QEMUGoneError(QEMUError):
    """The QMP connection to QEMU is lost, or QEMU is not there."""

    code = "qemu-gone"

    def __init__(self, path: str, detail: str | None = None) -> None:
        message = f"QEMU at {path} went away"
        if detail:
            message += f" ({detail})"
        super().__init__(message)
        self.path = path


class QEMUUnreachableError(QEMUGoneError):
    """No QMP connection could be made (nothing listening, or QEMU does not answer)."""

    code = "qemu-unreachable"

    def __init__(self, path: str, detail: str) -> None:
        QEMUError.__init__(self, f"cannot reach QEMU at {path}: {detail}")
        self.path = path


class EventTimeoutError(QMPTimeoutError):
    """An awaited QMP event did not arrive in time."""

    code = "event-timeout"

    def __init__(self, event: str, timeout: float) -> None:
        QEMUError.__init__(self, f"QEMU sent no {event} event within {timeout:g}s")
        self.command = event
        self.desc = f"no {event} event after {timeout:g}s"
        self.error_class = "Timeout"
        self.timeout = timeout


class ImageError(QEMUError):
    """An image cannot be used: missing, unreadable, or an unsupported format."""

    code = "image"


class StorageDaemonError(QEMUError):
    """The private qemu-storage-daemon could not start, or stopped unexpectedly."""

    code = "storage-daemon"
