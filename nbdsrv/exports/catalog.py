"""The exports the server offers right now, by name."""

import logging
from collections.abc import Sequence

from .export import Export

log = logging.getLogger(__name__)


class ExportCatalog:
    """Name → export. Removing an export closes it: its clients get ESHUTDOWN from then on,
    and new clients are told it is unknown."""

    def __init__(self) -> None:
        self._exports: dict[str, Export] = {}

    def add(self, export: Export) -> None:
        if export.name in self._exports:
            raise ValueError(f"export '{export.name}' already exists")
        self._exports[export.name] = export
        log.info("export %s added (%d bytes)", export.name, export.size)

    def remove(self, name: str) -> None:
        export = self._exports.pop(name)
        export.close()
        log.info("export %s removed", name)

    def find_export(self, name: str) -> Export | None:
        return self._exports.get(name)

    def list_exports(self) -> Sequence[Export]:
        return list(self._exports.values())

    def close_all(self) -> None:
        for name in list(self._exports):
            self.remove(name)
