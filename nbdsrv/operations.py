"""Every control operation, once: its name, its command line, its arguments, its handler.

From this table alone
- ``cli.py`` builds the client commands (``nbdsrv checkpoint create VM --name NAME``): one
  command word per operation word, positionals and options from the arguments;
- ``control_requests.py`` checks each request's arguments before any handler runs;
- ``daemon.py`` dispatches each operation to the handler named after it
  (``checkpoint-create`` → ``Daemon.checkpoint_create``; tests/control/test_operations.py
  checks that every operation has one).

Adding an operation is one entry here, a handler, and tests. Each entry's ``show`` writes the
result for people (``--json`` prints the result itself); text_output.py holds those functions.

A request on the wire is ``{"op": NAME, "args": {ARG: VALUE, ...}}`` (docs/api.md); the CLI
sends null for an option not given, so an optional argument may always be null.

Remote clients (``--remote``, a TLS certificate granted some VMs by ``--remote-allow``) may use
an operation according to its ``scope``:

- ``"vm"``: it acts on the VM named by its ``vm`` argument; allowed when the certificate is
  granted that VM, answered as for an unknown VM otherwise (the client learns no names);
- ``"daemon"``: it names no VM (``status``, ``hello``); allowed, and its result is filtered so
  that it shows only the VMs the certificate is granted (nbdsrv/remote/grants.py);
- ``"local"`` (the default, so an operation nobody thought about stays local): refused to
  remote clients with ``permission-denied`` — e.g. an operation that writes to a host path
  the caller chooses.

An argument with ``remote=False`` (a host path such as ``snapshot create --dir``) may not be
given by remote clients either. Local clients on the control socket may do everything.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Literal, NamedTuple

from . import text_output

PROTOCOL_VERSION = 1
"""The control protocol's version (docs/api.md, "Versions"): a request may carry
``"version": N``; a daemon refuses with ``unsupported-version`` one newer than this. Adding an
operation, an optional argument or a result field does not change it."""


class Arg(NamedTuple):
    """One argument of an operation: a request field and its command-line form."""

    name: str
    """The request's field (``vm``, ``from``, ``no_checkpoint``)."""
    kind: str
    """``str``, ``int``, ``bytes`` (an integer on the wire; the command line also takes a K,
    M, G or T suffix, powers of 1024, as qemu-img does), ``bool`` (a flag on the command
    line) or ``path`` (a string the CLI makes absolute, since the daemon's working directory
    is not the user's)."""
    help: str
    required: bool = False
    positional: bool = False
    """A word of its own on the command line (``VM``) instead of an option (``--name``)."""
    metavar: str | None = None
    choices: tuple[str, ...] = ()
    exclusive: str | None = None
    """Arguments with the same value here cannot be given together."""
    remote: bool = True
    """False: remote clients may not give it (a path on the daemon's host)."""

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


Scope = Literal["vm", "daemon", "local"]
"""Who may use an operation remotely, see the module's docstring."""


class Operation(NamedTuple):
    name: str
    """The name on the wire (``checkpoint-create``); the handler is ``Daemon.<name with _>``."""
    words: tuple[str, ...]
    """The command words (``checkpoint create``)."""
    help: str
    args: tuple[Arg, ...]
    show: Callable[[dict[str, Any], Any], str]
    """The result as text for people, from the request's arguments and the result."""
    progress_of: str | None = None
    """While it runs, the CLI shows the progress of the VM's block jobs of this type."""
    scope: Scope = "local"
    """What a remote client may do with it (see the module's docstring)."""

    @property
    def handler(self) -> str:
        return self.name.replace("-", "_")


def _vm(help_text: str = "the VM") -> Arg:
    return Arg("vm", "str", help_text, required=True, positional=True, metavar="VM")


_QUIESCE = Arg(
    "quiesce",
    "bool",
    "freeze the guest's filesystems for the instant (needs the guest agent: --qga or libvirt)",
)

# In the order `nbdsrv --help` lists them.
OPERATIONS: tuple[Operation, ...] = (
    Operation(
        "status",
        ("status",),
        "VMs, exports and sessions of a running daemon",
        (),
        text_output.status,
        scope="daemon",
    ),
    Operation(
        "hello",
        ("hello",),
        "the control protocol version, nbdsrv's version and the operations the daemon speaks",
        (),
        text_output.hello,
        scope="daemon",
    ),
    Operation(
        "checkpoint-create",
        ("checkpoint", "create"),
        "a checkpoint over all disks of VM, atomically",
        (
            _vm(),
            Arg("name", "str", "the checkpoint's name (default: ckpt-<UTC time>)", metavar="NAME"),
            Arg("granularity", "bytes", "bitmap granularity (default 65536)", metavar="BYTES"),
            _QUIESCE,
        ),
        text_output.checkpoint_created,
        scope="vm",
    ),
    Operation(
        "checkpoint-list",
        ("checkpoint", "list"),
        "checkpoints of VM, oldest first",
        (_vm(),),
        text_output.checkpoints,
        scope="vm",
    ),
    Operation(
        "checkpoint-delete",
        ("checkpoint", "delete"),
        "delete a checkpoint; its changes go to its parent",
        (_vm(), Arg("name", "str", "the checkpoint", required=True, positional=True)),
        text_output.checkpoint_deleted,
        scope="vm",
    ),
    Operation(
        "backup-begin",
        ("backup", "begin"),
        "fix a point in time and export every disk of VM",
        (
            _vm(),
            Arg(
                "from",
                "str",
                "incremental: offer qemu:dirty-bitmap:CKPT (changed since CKPT)",
                metavar="CKPT",
            ),
            Arg("checkpoint", "str", "name of the new checkpoint", metavar="NAME", exclusive="new"),
            Arg(
                "no_checkpoint",
                "bool",
                "do not create a checkpoint at the point in time",
                exclusive="new",
            ),
            Arg(
                "all_checkpoints",
                "bool",
                "offer a dirty-bitmap context for every valid checkpoint",
            ),
            Arg(
                "bitmap_name",
                "str",
                "name the --from context qemu:dirty-bitmap:NAME",
                metavar="NAME",
            ),
            _QUIESCE,
        ),
        text_output.session,
        scope="vm",
    ),
    Operation(
        "backup-list",
        ("backup", "list"),
        "backup sessions of VM",
        (_vm(),),
        text_output.sessions,
        scope="vm",
    ),
    Operation(
        "backup-end",
        ("backup", "end"),
        "end a backup session; its exports go",
        (_vm(), Arg("id", "str", "the session", required=True, positional=True)),
        text_output.session_ended,
        scope="vm",
    ),
    Operation(
        "snapshot-create",
        ("snapshot", "create"),
        "new qcow2 overlays on every disk of VM, atomically",
        (
            _vm(),
            Arg(
                "dir",
                "path",
                "where the overlays go (default: beside)",
                metavar="DIR",
                remote=False,
            ),
        ),
        text_output.snapshot_created,
        scope="vm",
    ),
    Operation(
        "snapshot-commit",
        ("snapshot", "commit"),
        "commit every disk's top overlay into its backing",
        (_vm(),),
        text_output.snapshot_committed,
        progress_of="commit",
        scope="vm",
    ),
    Operation(
        "restore-begin",
        ("restore", "begin"),
        "a writable export restore/ID into an image, or into a disk of VM",
        (
            Arg("vm", "str", "restore into a disk of this VM (with --disk)", positional=True),
            Arg("image", "path", "the image to restore into", metavar="PATH", exclusive="into"),
            Arg("disk", "str", "the VM's disk to restore into", metavar="DISK", exclusive="into"),
            Arg("size", "bytes", "size of an image to create", metavar="BYTES"),
            Arg(
                "format",
                "str",
                "format of an image to create (default qcow2)",
                choices=("qcow2", "raw"),
            ),
            Arg(
                "source",
                "str",
                "live restore: read from this NBD URI at once, copy it in the background",
                metavar="URI",
            ),
        ),
        text_output.restore,
    ),
    Operation(
        "restore-list",
        ("restore", "list"),
        "restore sessions and their progress",
        (),
        text_output.restores,
    ),
    Operation(
        "restore-end",
        ("restore", "end"),
        "flush and close a restore session's image; its export goes",
        (
            Arg("id", "str", "the restore session", required=True, positional=True),
            Arg("abort", "bool", "end it even while it still copies from its source"),
        ),
        text_output.restore_ended,
    ),
)

BY_NAME: dict[str, Operation] = {op.name: op for op in OPERATIONS}

# Help of the command words that group several operations.
GROUPS: dict[str, str] = {
    "checkpoint": "create, list and delete checkpoints",
    "backup": "pull-mode backup sessions",
    "snapshot": "external snapshots that keep checkpoints usable",
    "restore": "restore sessions: writable exports into images and disks, live restore",
}
