"""The tests' one harness: what every test directory uses to run nbdsrv and QEMU.

- ``tools``: ``require_tool``, ``run``, ``run_result``, ``run_fails`` (external programs).
- ``daemon``: ``DaemonProcess`` (``nbdsrv daemon`` in a subprocess, its CLI and ``--json``
  answers), ``nbdsrv_argv``, ``qmp_daemon``, ``StartDaemon``.
- ``served``: ``Served``, ``serve_images`` (a daemon exporting the test images on unix and
  TCP); ``images``: those images (``ImageFile``, the sparse and odd layouts).
- ``in_process``: the real NBD server in the test's own event loop (``start_server``,
  ``serving``).
- ``qsd``: a test-owned qemu-storage-daemon standing for a VM (``ExternalQSD``) and an nbdsrv
  attached to it; ``qemu_vm``: a VM-like qemu-system-x86_64 with no guest (``QemuSystem``,
  ``running_vm``); ``qmp``: ``SyncQMP``, the test's own monitor.
- ``timeline``: what a disk held at each checkpoint, checked by content.
- ``waiting``: ``wait_for``; ``checksums``: ``sha256``, ``file_sha256``; ``dirs``:
  ``short_tmp_dir``; ``extents``: ``merged``; ``sparse_file``: ``write_sparse``.

Fixtures stay in the conftest.py files; they build on these modules.
"""
