"""QEMU building blocks the QMP backends share (docs/architecture.md has the map).

monitor.py          Monitor: asyncio QMP client with clear errors, events and reconnection
chain.py            disks, backing chains and dirty bitmaps (query-block, named block nodes)
fleece.py           copy-before-write filters, snapshot-access, frozen bitmaps, exports
storage_daemon.py   StorageDaemon: the embedded default, a qemu-storage-daemon we own
parent_death.py     children started without preexec_fn: umask 077, SIGTERM on our death
images.py           qemu-img: format detection, overlays; scratch blockdev options
scratch_image.py    scratch qcow2 images written from a template qemu-img made once
block_jobs.py       waiting for block jobs (ready, gone) on QEMU's events
block_exports.py    waiting for a deleted export to go (BLOCK_EXPORT_DELETED)
reopen.py           read-only layers reopened read-write
names.py            node, job and file names that fit QEMU's limits for any disk id
guest_agent.py      the QEMU guest agent client (sync, freeze, thaw)
errors.py           the errors these raise
"""
