"""What a remote control client may see and do: ``--remote-allow VM-PATTERN=subject:A=V,…``.

A certificate is granted every VM whose name matches the pattern of a rule whose subject it
matches (patterns and subjects as for ``--allow``, net/access.py). Unlike ``--allow``, what no
rule grants is hidden: a remote client sees and touches only the VMs granted to it.

Each operation's ``scope`` (operations.py) says how the grant applies:

- ``vm``: the request's VM must be granted, else the answer is exactly the one for a VM that
  does not exist (``not-found``, the same words), so that names are not revealed;
- ``daemon``: allowed; the result is filtered here (every such operation has a filter);
- ``local``: refused (``permission-denied``), as is any argument marked ``remote=False``.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigError, InternalError, PermissionDeniedError
from ..net.access import Allow, Peer, parse_allow
from ..operations import OPERATIONS, Operation
from ..registry import unknown_vm


def parse_remote_allow(text: str) -> Allow:
    """``VM-PATTERN=subject:A=V[,A=V...]`` (ConfigError for anything else)."""
    allow = parse_allow(text, "--remote-allow")
    if allow.rule.kind != "subject":
        raise ConfigError(f"bad --remote-allow {text!r}: use VM-PATTERN=subject:CN=NAME[,...]")
    return allow


@dataclass(frozen=True)
class Grants:
    """Every ``--remote-allow`` rule of a daemon."""

    allows: tuple[Allow, ...] = ()

    @classmethod
    def parse(cls, texts: Sequence[str]) -> Grants:
        return cls(tuple(parse_remote_allow(text) for text in texts))

    def view(self, peer: Peer) -> RemoteView:
        return RemoteView(self, peer)

    def sees(self, vm: str, peer: Peer) -> bool:
        return any(
            fnmatch.fnmatchcase(vm, allow.pattern) and allow.rule.matches(peer)
            for allow in self.allows
        )


@dataclass(frozen=True)
class RemoteView:
    """The daemon as one remote client (one certificate) may see it."""

    grants: Grants
    peer: Peer

    def sees(self, vm: str) -> bool:
        return self.grants.sees(vm, self.peer)

    def check(self, op: Operation, args: dict[str, Any]) -> None:
        """Refuse what this client may not ask (before anything is done)."""
        if op.scope == "local":
            raise PermissionDeniedError(
                f"'{op.name}' is for local clients only (the daemon's control socket)"
            )
        for arg in op.args:
            if not arg.remote and args.get(arg.name) not in (None, False):
                raise PermissionDeniedError(
                    f"'{op.name}': '{arg.name}' is for local clients only (a path on the "
                    "daemon's host)"
                )
        if op.scope == "vm" and not self.sees(str(args["vm"])):
            raise unknown_vm(str(args["vm"]))
        if op.scope == "daemon" and op.name not in FILTERS:
            raise InternalError(f"internal error: '{op.name}' has no filter for remote clients")

    def filter(self, op: Operation, result: Any) -> Any:
        """The result with everything of VMs this client may not see removed."""
        if op.scope != "daemon":
            return result
        return FILTERS[op.name](self, result)


def _status(view: RemoteView, status: dict[str, Any]) -> dict[str, Any]:
    sessions = [s for s in status["sessions"] if view.sees(s["vm"])]
    exports = {disk["export"] for s in sessions for disk in s["disks"].values()}
    filtered = {key: value for key, value in status.items() if key != "connections"}
    filtered["vms"] = [vm for vm in status["vms"] if view.sees(vm["name"])]
    filtered["sessions"] = sessions
    # Only the exports of the client's VMs' sessions: file and restore exports are no VM's.
    filtered["exports"] = [e for e in status["exports"] if e["name"] in exports]
    return filtered


def _hello(view: RemoteView, hello: dict[str, Any]) -> dict[str, Any]:
    remote = {op.name for op in OPERATIONS if op.scope != "local"}
    return {**hello, "operations": [name for name in hello["operations"] if name in remote]}


# How the result of each "daemon"-scoped operation is filtered for a remote client.
FILTERS: dict[str, Callable[[RemoteView, Any], Any]] = {"status": _status, "hello": _hello}
