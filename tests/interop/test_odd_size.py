"""An export whose size is not a multiple of 512 stays exact, to the last byte.

QEMU 7.2's block layer counts in 512-byte sectors: it sees a 5000-byte image as 5120 bytes
and reads the tail past the end as zeroes, for a local file and for an NBD export alike. So
for qemu-img, "exact" means: the export reads exactly as qemu-img reads the file itself.
"""

import json
from pathlib import Path

from tests.harness.served import Served
from tests.harness.tools import require_tool, run
from tests.interop.nbdsh import nbdsh

SIZE = 5000


def test_size_is_advertised_exactly(nbdsrv: Served) -> None:
    size = run([require_tool("nbdinfo"), "--size", nbdsrv.tcp_uri("odd")])
    assert int(size) == SIZE == nbdsrv.images["odd"].size


def test_nbdcopy_copies_every_byte_and_no_more(nbdsrv: Served, tmp_path: Path) -> None:
    target = tmp_path / "copy.bin"
    run([require_tool("nbdcopy"), nbdsrv.unix_uri("odd"), str(target)])
    assert target.read_bytes() == nbdsrv.images["odd"].content()


def test_qemu_img_reads_the_export_as_it_reads_the_file(nbdsrv: Served, tmp_path: Path) -> None:
    qemu_img = require_tool("qemu-img")
    from_nbd, from_file = tmp_path / "nbd.raw", tmp_path / "file.raw"
    run([qemu_img, "convert", "-f", "raw", "-O", "raw", nbdsrv.tcp_uri("odd"), str(from_nbd)])
    path = str(nbdsrv.images["odd"].path)
    run([qemu_img, "convert", "-f", "raw", "-O", "raw", path, str(from_file)])
    converted = from_nbd.read_bytes()
    assert converted[:SIZE] == nbdsrv.images["odd"].content()
    assert converted == from_file.read_bytes()


def test_qemu_img_compare_finds_the_export_identical_to_the_file(nbdsrv: Served) -> None:
    path = str(nbdsrv.images["odd"].path)
    argv = [require_tool("qemu-img"), "compare", "-f", "raw", "-F", "raw"]
    out = run([*argv, path, nbdsrv.unix_uri("odd")])
    assert "Images are identical" in out


def test_qemu_img_map_shows_the_data_up_to_the_real_end(nbdsrv: Served) -> None:
    out = run(
        [require_tool("qemu-img"), "map", "--output=json", "-f", "raw", nbdsrv.tcp_uri("odd")]
    )
    entries = json.loads(out)
    assert (entries[0]["start"], entries[0]["length"], entries[0]["data"]) == (0, SIZE, True)
    # Anything after is QEMU's own zero padding to a whole sector.
    assert all(not e["data"] and e["zero"] for e in entries[1:])
    assert sum(e["length"] for e in entries) - SIZE < 512


LAST_BYTES = """
h.set_strict_mode(0)
h.connect_uri(uri)
out["size"] = h.get_size()
out["tail"] = h.pread(8, size - 8).hex()
out["past_end"] = error_of(h.pread, 8, size - 4)
"""


def test_libnbd_reads_the_last_bytes_and_not_past_them(nbdsrv: Served) -> None:
    result = nbdsh(LAST_BYTES, uri=nbdsrv.unix_uri("odd"), size=SIZE)
    assert result["size"] == SIZE
    assert result["tail"] == nbdsrv.images["odd"].content()[-8:].hex()
    assert result["past_end"] is not None
    assert result["past_end"]["errno"] == "EINVAL"
