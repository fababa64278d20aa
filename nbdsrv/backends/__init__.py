"""Ways of driving a VM, behind one small interface (nbdsrv/backends/base.py): qmp/ (a running
QEMU or qemu-storage-daemon over a private monitor), embedded.py (nbdsrv's own
qemu-storage-daemon), libvirt/ (libvirt's checkpoint and pull-backup API)."""
