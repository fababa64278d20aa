"""Reopening a backing layer read-write for bitmap changes, and read-only again after.

QEMU opens backing images read-only, and their bitmaps are then read-only too ("Bitmap 'c1'
is readonly and cannot be modified"). ``blockdev-reopen`` needs the node's options: its
driver, its ``file`` child by node name, and its backing by node name.
"""

import contextlib
import logging
from collections.abc import AsyncIterator, Sequence

from .chain import Layer
from .errors import QEMUError
from .monitor import Monitor

log = logging.getLogger(__name__)


async def _file_node(monitor: Monitor, layer: Layer) -> str:
    for node in await monitor.execute("query-named-block-nodes", {"flat": True}):
        if node.get("drv") == "file" and node.get("file") == layer.filename:
            return str(node["node-name"])
    raise QEMUError(f"no file node under {layer.node_name} ({layer.filename})")


async def set_read_only(
    monitor: Monitor, layers: Sequence[Layer], index: int, read_only: bool
) -> None:
    layer = layers[index]
    options: dict[str, object] = {
        "driver": layer.format,
        "node-name": layer.node_name,
        "file": await _file_node(monitor, layer),
        "read-only": read_only,
    }
    if index + 1 < len(layers):
        options["backing"] = layers[index + 1].node_name
    await monitor.execute("blockdev-reopen", {"options": [options]})


@contextlib.asynccontextmanager
async def writable(
    monitor: Monitor, chains: Sequence[Sequence[Layer]], nodes: set[str]
) -> AsyncIterator[None]:
    """Make the read-only layers among ``nodes`` writable for the block, then read-only."""
    opened: list[tuple[Sequence[Layer], int]] = []
    try:
        for layers in chains:
            for i, layer in enumerate(layers):
                if layer.node_name in nodes and layer.read_only:
                    await set_read_only(monitor, layers, i, False)
                    opened.append((layers, i))
        yield
    finally:
        for layers, i in reversed(opened):
            try:
                await set_read_only(monitor, layers, i, True)
            except QEMUError as e:
                log.warning("could not make %s read-only again: %s", layers[i].node_name, e)
