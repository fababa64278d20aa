"""Default locations of the state directory and the control socket (docs/reference.md)."""

import os


def default_state_dir() -> str:
    """$NBDSRV_STATE_DIR, else /var/lib/nbdsrv as root, else $XDG_STATE_HOME/nbdsrv."""
    if env := os.environ.get("NBDSRV_STATE_DIR"):
        return env
    if os.geteuid() == 0:
        return "/var/lib/nbdsrv"
    xdg = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return os.path.join(xdg, "nbdsrv")


def default_control(state_dir: str | None = None) -> str:
    """$NBDSRV_CONTROL, else <state-dir>/control.sock."""
    if env := os.environ.get("NBDSRV_CONTROL"):
        return env
    return os.path.join(state_dir or default_state_dir(), "control.sock")
