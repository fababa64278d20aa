"""Allow rules by source address and certificate subject, with real clients; the control
socket refuses other users."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest

from nbdsrv.net.access import AccessPolicy, Peer, parse_allow
from tests.harness.daemon import StartDaemon
from tests.harness.images import ImageFile
from tests.harness.served import serve_images
from tests.harness.tools import require_tool, run, run_fails

from .certs import Certs


def listed(uri: str) -> list[str]:
    listing = json.loads(run([require_tool("nbdinfo"), "--list", "--json", uri]))
    return sorted(e["export-name"] for e in listing["exports"])


def test_subject_rules_admit_only_matching_certificates(
    nbdsrv_daemons: StartDaemon, test_images: dict[str, ImageFile], short_dir: Path, certs: Certs
) -> None:
    served = serve_images(
        nbdsrv_daemons, test_images, short_dir, *certs.server_args_with_ca,
        "--allow", "sparse=subject:CN=backup,O=nbdsrv tests",
    )  # fmt: skip
    nbdinfo = require_tool("nbdinfo")
    run([nbdinfo, served.tcp_uri("sparse", certs.backup)])
    result = run_fails([nbdinfo, served.tcp_uri("sparse", certs.reader)])
    assert "no such file or directory for export: sparse" in result.stderr.lower()  # UNKNOWN
    run([nbdinfo, served.tcp_uri("odd", certs.reader)])  # no rule for odd: open to every client
    assert listed(served.tcp_uri("", certs.reader)) == ["odd"]
    assert listed(served.tcp_uri("", certs.backup)) == ["odd", "sparse"]
    assert "access denied: peer=127.0.0.1" in served.daemon.log()


def test_address_rules_tell_tcp_from_unix_clients(
    nbdsrv_daemons: StartDaemon, test_images: dict[str, ImageFile], short_dir: Path
) -> None:
    served = serve_images(
        nbdsrv_daemons, test_images, short_dir,
        "--allow", "sparse=unix",
        "--allow", "o*=cidr:10.0.0.0/8",
        "--allow", "o*=cidr:127.0.0.0/8",
    )  # fmt: skip
    nbdinfo = require_tool("nbdinfo")
    run([nbdinfo, served.unix_uri("sparse")])
    run_fails([nbdinfo, served.tcp_uri("sparse")])
    run([nbdinfo, served.tcp_uri("odd")])
    run_fails([nbdinfo, served.unix_uri("odd")])
    assert listed(served.tcp_uri()) == ["odd"]
    assert listed(served.unix_uri()) == ["sparse"]


def test_address_and_subject_rules_must_both_match(
    nbdsrv_daemons: StartDaemon, test_images: dict[str, ImageFile], short_dir: Path, certs: Certs
) -> None:
    served = serve_images(
        nbdsrv_daemons, test_images, short_dir, *certs.server_args_with_ca,
        "--allow", "*=cidr:192.0.2.0/24",
        "--allow", "*=subject:CN=backup",
    )  # fmt: skip
    # The right certificate from the wrong address: nothing is visible.
    run_fails([require_tool("nbdinfo"), served.tcp_uri("odd", certs.backup)])
    assert listed(served.tcp_uri("", certs.backup)) == []


@pytest.mark.parametrize(
    ("rules", "peer", "export", "allowed"),
    [
        ([], Peer("203.0.113.9"), "disk", True),
        (["disk=cidr:10.0.0.0/8"], Peer("10.1.2.3"), "disk", True),
        (["disk=cidr:10.0.0.0/8"], Peer("11.1.2.3"), "disk", False),
        (["disk=cidr:10.0.0.0/8"], Peer("::ffff:10.1.2.3"), "disk", True),
        (["disk=cidr:::1"], Peer("::1"), "disk", True),
        (["disk=cidr:10.0.0.0/8"], Peer(None), "disk", False),
        (["disk=unix"], Peer(None), "disk", True),
        (["disk=cidr:10.0.0.0/8"], Peer("11.1.2.3"), "other", True),
        (["vm1/*=subject:CN=backup"], Peer("1.2.3.4", (("CN", "backup"),)), "vm1/disk0", True),
        (["vm1/*=subject:CN=backup"], Peer("1.2.3.4", (("CN", "reader"),)), "vm1/disk0", False),
        (["vm1/*=subject:CN=backup"], Peer("1.2.3.4"), "vm1/disk0", False),
        (["*=subject:cn=back*,O=Ex"], Peer("1.2.3.4", (("CN", "backup1"), ("O", "Ex"))), "d", True),
        (
            ["*=subject:CN=backup,O=Ex"],
            Peer("1.2.3.4", (("CN", "backup"), ("O", "No"))),
            "d",
            False,
        ),
        (
            ["d=cidr:10.0.0.0/8", "d=unix", "d=subject:CN=a", "d=subject:CN=b"],
            Peer(None, (("CN", "b"),)),
            "d",
            True,
        ),
    ],
)
def test_allow_rules(rules: list[str], peer: Peer, export: str, allowed: bool) -> None:
    policy = AccessPolicy([parse_allow(r) for r in rules])
    assert policy.allowed(export, peer) is allowed


def test_control_socket_refuses_another_user(
    nbdsrv_daemons: StartDaemon, test_images: dict[str, ImageFile], short_dir: Path
) -> None:
    if os.getuid() != 0:
        pytest.skip("needs root to act as another user")
    served = serve_images(nbdsrv_daemons, test_images, short_dir)
    control = served.daemon.control
    assert os.stat(control).st_mode & 0o777 == 0o600
    os.chmod(control, 0o666)  # the mode alone would stop the other user: take it away
    os.chmod(short_dir, 0o755)
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through the pipe
        try:
            os.setgid(65534)
            os.setuid(65534)
            with socket.socket(socket.AF_UNIX) as sock:
                sock.settimeout(10)
                sock.connect(control)
                sock.sendall(b'{"op": "status"}\n')
                answer = sock.makefile("rb").readline()
            os.write(write_fd, answer or b"EOF")
        except BaseException as e:
            os.write(write_fd, f"child error: {e}".encode())
        finally:
            os._exit(0)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as pipe:
        answer = pipe.read()
    os.waitpid(pid, 0)
    response = json.loads(answer)
    assert response["ok"] is False
    assert response["error"]["code"] == "permission-denied"
    assert "refused uid 65534" in served.daemon.log()
    os.chmod(control, 0o600)
    served.daemon.status()  # our own user still gets answers
