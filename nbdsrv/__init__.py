"""nbdsrv — an NBD pull-model backup server for QEMU."""

__version__ = "0.1.0"
