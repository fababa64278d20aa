"""Every VM of the daemon, by name, whatever backend drives it."""

import logging

from .backends.base import VMBackend
from .errors import ConfigError, NbdsrvError, NotFoundError

log = logging.getLogger(__name__)


def unknown_vm(name: str) -> NotFoundError:
    """The error for a VM that does not exist (or that a remote client may not see: the
    same words, so that it learns no names)."""
    return NotFoundError(f"no VM named '{name}'")


class VMRegistry:
    def __init__(self) -> None:
        self.vms: dict[str, VMBackend] = {}

    def get(self, name: str) -> VMBackend:
        vm = self.vms.get(name)
        if vm is None:
            raise unknown_vm(name)
        return vm

    async def add(self, vm: VMBackend) -> None:
        """Register ``vm`` and start it (it connects, or keeps trying in the background)."""
        if vm.name in self.vms:
            raise ConfigError(f"VM '{vm.name}' given twice")
        self.vms[vm.name] = vm
        await vm.start()

    async def stop(self) -> None:
        for vm in self.vms.values():
            try:
                await vm.stop()
            except NbdsrvError as e:
                log.error("VM %s: %s", vm.name, e)
