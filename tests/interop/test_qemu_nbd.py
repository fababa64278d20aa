"""qemu-nbd as a client: ``qemu-nbd --list`` shows what QEMU sees of every export."""

import re

from tests.harness.served import Served
from tests.harness.tools import require_tool, run


def test_list_shows_exports_sizes_flags_and_contexts(nbdsrv: Served) -> None:
    out = run([require_tool("qemu-nbd"), "--list", "-k", nbdsrv.unix_socket])
    assert "exports available: 2" in out
    blocks = {
        m.group(1): m.group(2)
        for m in re.finditer(r"^ export: '([^']*)'\n((?:  .*\n?)*)", out, re.MULTILINE)
    }
    assert set(blocks) == {"sparse", "odd"}
    for name, image in nbdsrv.images.items():
        block = blocks[name]
        assert re.search(rf"^  size:\s+{image.size}$", block, re.MULTILINE), block
        flags = re.search(r"^  flags: 0x[0-9a-f]+ \( (.*) \)$", block, re.MULTILINE)
        assert flags is not None, block
        assert {"readonly", "multi"} <= set(flags.group(1).split()), block
        assert "available meta contexts: 1\n   base:allocation" in block
