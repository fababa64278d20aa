"""A running QEMU or qemu-storage-daemon driven over a QMP monitor nbdsrv has to itself."""
