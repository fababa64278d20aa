"""What remote clients may use is a property of the operation table: every operation has a
scope the remote layer knows how to enforce, and no host path reaches a remote client."""

from __future__ import annotations

import pytest

from nbdsrv.errors import NotFoundError, PermissionDeniedError
from nbdsrv.net.access import Peer
from nbdsrv.operations import BY_NAME, OPERATIONS, Operation
from nbdsrv.remote.grants import FILTERS, Grants

BACKUP = Peer("192.0.2.1", (("CN", "backup"), ("O", "Example")))
GRANTS = Grants.parse(["web*=subject:CN=backup", "db=subject:O=Example,CN=backup"])


@pytest.mark.parametrize("op", OPERATIONS, ids=lambda op: op.name)
def test_every_operation_has_a_scope_the_remote_layer_enforces(op: Operation) -> None:
    assert op.scope in ("vm", "daemon", "local")
    if op.scope == "vm":
        vm = op.args[0]
        assert (vm.name, vm.required) == ("vm", True), "a vm-scoped operation names its VM first"
    if op.scope == "daemon":
        assert op.name in FILTERS, "a daemon-scoped result must be filtered for remote clients"
    for arg in op.args:
        if op.scope != "local" and arg.kind == "path":
            assert not arg.remote, f"{op.name}: '{arg.name}' is a host path: remote=False"


def test_grants_follow_patterns_and_subjects() -> None:
    view = GRANTS.view(BACKUP)
    assert [vm for vm in ("web", "web2", "db", "dbx", "mail") if view.sees(vm)] == [
        "web",
        "web2",
        "db",
    ]
    stranger = GRANTS.view(Peer("192.0.2.1", (("CN", "backup"), ("O", "Other"))))
    assert not stranger.sees("db") and stranger.sees("web")
    assert not GRANTS.view(Peer("192.0.2.1", None)).sees("web")


def test_a_hidden_vm_is_refused_as_an_unknown_one_and_local_things_are_refused() -> None:
    view = GRANTS.view(BACKUP)
    with pytest.raises(NotFoundError, match=r"^no VM named 'mail'$"):
        view.check(BY_NAME["backup-begin"], {"vm": "mail"})
    view.check(BY_NAME["backup-begin"], {"vm": "web"})
    with pytest.raises(PermissionDeniedError, match="'dir' is for local clients only"):
        view.check(BY_NAME["snapshot-create"], {"vm": "web", "dir": "/tmp"})
    local = BY_NAME["status"]._replace(name="x-local", scope="local")
    with pytest.raises(PermissionDeniedError, match="'x-local' is for local clients only"):
        view.check(local, {})


def test_status_shows_only_the_granted_vms() -> None:
    session = {"vm": "web", "disks": {"disk0": {"export": "web/disk0"}}}
    hidden = {"vm": "mail", "disks": {"disk0": {"export": "mail/disk0"}}}
    status = {
        "pid": 1,
        "vms": [{"name": "web"}, {"name": "mail"}],
        "sessions": [session, hidden],
        "exports": [{"name": "web/disk0"}, {"name": "mail/disk0"}, {"name": "file1"}],
        "connections": 3,
    }
    filtered = GRANTS.view(BACKUP).filter(BY_NAME["status"], status)
    assert filtered == {
        "pid": 1,
        "vms": [{"name": "web"}],
        "sessions": [session],
        "exports": [{"name": "web/disk0"}],
    }


def test_hello_lists_only_what_a_remote_client_may_use() -> None:
    names = [op.name for op in OPERATIONS]
    hello = {"protocol": 1, "nbdsrv": "x", "operations": [*names, "x-local"]}
    filtered = GRANTS.view(BACKUP).filter(BY_NAME["hello"], hello)
    # x-local is not in the table: unknown here means not offered remotely.
    assert filtered["operations"] == [op.name for op in OPERATIONS if op.scope != "local"]
