"""nbdinfo (libnbd) against a real nbdsrv daemon: listing, flags and allocation maps."""

import json

import pytest

from tests.harness.served import Served
from tests.harness.tools import require_tool, run, run_result

HOLE_ZERO = 3  # NBD_STATE_HOLE | NBD_STATE_ZERO


def nbdinfo(*args: str) -> str:
    return run([require_tool("nbdinfo"), *args])


def expected_map(served: Served, export: str) -> list[dict[str, object]]:
    return [
        {
            "offset": offset,
            "length": length,
            "type": 0 if is_data else HOLE_ZERO,
            "description": "data" if is_data else "hole,zero",
        }
        for offset, length, is_data in served.images[export].layout
    ]


def test_list_shows_every_export_with_size_description_and_contexts(nbdsrv: Served) -> None:
    listing = json.loads(nbdinfo("--list", "--json", nbdsrv.tcp_uri()))
    exports = {e["export-name"]: e for e in listing["exports"]}
    assert set(exports) == {"sparse", "odd"}
    for name, image in nbdsrv.images.items():
        export = exports[name]
        assert export["export-size"] == image.size
        assert export["description"]  # some human-readable text
        assert export["contexts"] == ["base:allocation"]
        assert export["can_multi_conn"] is True
        assert export["is_read_only"] is True


def test_list_over_unix_socket_matches_tcp(nbdsrv: Served) -> None:
    def names_and_sizes(uri: str) -> list[tuple[str, int]]:
        listing = json.loads(nbdinfo("--list", "--json", uri))
        return sorted((e["export-name"], e["export-size"]) for e in listing["exports"])

    assert names_and_sizes(nbdsrv.unix_uri()) == names_and_sizes(nbdsrv.tcp_uri())
    assert names_and_sizes(nbdsrv.unix_uri()) == [("odd", 5000), ("sparse", 8 * 1024 * 1024)]


def test_map_reports_data_and_holes_exactly_as_written(nbdsrv: Served) -> None:
    extents = json.loads(nbdinfo("--map", "--json", nbdsrv.tcp_uri("sparse")))
    assert extents == expected_map(nbdsrv, "sparse")


def test_map_of_fully_allocated_odd_sized_file_is_one_data_extent(nbdsrv: Served) -> None:
    extents = json.loads(nbdinfo("--map", "--json", nbdsrv.unix_uri("odd")))
    assert extents == [{"offset": 0, "length": 5000, "type": 0, "description": "data"}]


def test_totals_add_up_to_the_data_written(nbdsrv: Served) -> None:
    # --totals: percentage of the export per type; data is 260 KiB of 8 MiB.
    totals = json.loads(nbdinfo("--map", "--totals", "--json", nbdsrv.tcp_uri("sparse")))
    by_type = {t["type"]: t["size"] for t in totals}
    data = sum(length for _, length, is_data in nbdsrv.images["sparse"].layout if is_data)
    assert by_type == {0: data, HOLE_ZERO: nbdsrv.images["sparse"].size - data}


@pytest.mark.parametrize(
    "flag",
    [
        ["--can", "multi-conn"],
        ["--is", "read-only"],
        ["--can", "df"],
        ["--can", "cache"],
    ],
    ids=lambda f: "-".join(f).strip("-"),
)
def test_flag_is_advertised(nbdsrv: Served, flag: list[str]) -> None:
    # nbdinfo --can/--is exits 0 when true, 2 when false.
    result = run_result([require_tool("nbdinfo"), *flag, nbdsrv.tcp_uri("sparse")])
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    "flag", [["--can", "write"], ["--can", "trim"], ["--can", "zero"]], ids=lambda f: f[1]
)
def test_write_side_flags_are_not_advertised(nbdsrv: Served, flag: list[str]) -> None:
    result = run_result([require_tool("nbdinfo"), *flag, nbdsrv.tcp_uri("sparse")])
    assert result.returncode == 2, (result.returncode, result.stderr)
