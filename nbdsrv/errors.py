"""Errors users see.

NbdsrvError                 one clear sentence for the user (CLI: `nbdsrv: error: ...`)
 ├── ConfigError            bad command-line or configuration value
 ├── ControlError           the control socket cannot be reached or answered an error
 └── NotFoundError          an unknown VM, export, checkpoint or session
"""


class NbdsrvError(Exception):
    """A failure explained in one sentence."""


class ConfigError(NbdsrvError):
    pass


class ControlError(NbdsrvError):
    pass


class NotFoundError(NbdsrvError):
    pass
