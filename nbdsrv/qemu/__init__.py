"""QEMU building blocks: the QMP monitor, backing chains, and the private storage daemon.

monitor.py          Monitor: asyncio QMP client with clear errors, events and reconnection
chain.py            backing chains and dirty bitmaps per disk, from query-named-block-nodes
storage_daemon.py   StorageDaemon: the embedded default, a qemu-storage-daemon we own
errors.py           the errors these raise
"""
