"""The guest's files as the guest has finished writing them (written and synced): the
manifest a point in time of its data disk must hold exactly."""

from __future__ import annotations

import random

from tests.guest.vm import GuestVM


class Files:
    """Name (in /data) → content, kept as the guest writes through its agent."""

    def __init__(self, vm: GuestVM, now: dict[str, bytes] | None = None, seed: int = 10) -> None:
        self.vm = vm
        self.now: dict[str, bytes] = dict(now or {})
        self.rng = random.Random(seed)

    def write(self, name: str, size: int) -> None:
        data = self.rng.randbytes(size)
        self.vm.write_file(name, data)
        self.now[name] = data

    def overwrite(self, name: str) -> None:
        """New content in the blocks the file has now."""
        data = self.rng.randbytes(len(self.now[name]))
        self.vm.write_file(name, data, in_place=True)
        self.now[name] = data

    def remove(self, name: str) -> None:
        self.vm.remove_file(name)
        del self.now[name]
