#!/usr/bin/env bash
# make demo: the main job on the embedded default, end to end with real clients.
# A disk image is served by `nbdsrv serve` (a private qemu-storage-daemon), written to,
# backed up in full, written again, then backed up incrementally: only the changed blocks
# are read, and the rebuilt image matches the disk at the point in time by checksum.
set -euo pipefail
cd "$(dirname "$0")/.."
NBDSRV=.venv/bin/nbdsrv
work=$(mktemp -d /tmp/nbdsrv-demo.XXXXXX)
daemon_pid=
cleanup() {
    if [ -n "$daemon_pid" ]; then kill -TERM "$daemon_pid" 2>/dev/null; wait "$daemon_pid" || true; fi
    rm -rf "$work"
}
trap cleanup EXIT
step() { printf '\n== %s\n' "$*"; }
nbdsrv() { $NBDSRV "$@" --control "$work/state/control.sock"; }
json() { .venv/bin/python -c "import json,sys; d=json.load(sys.stdin); print($1)"; }

step "a 256 MiB qcow2 disk, served by nbdsrv serve"
qemu-img create -q -f qcow2 "$work/disk.qcow2" 256M
$NBDSRV serve "$work/disk.qcow2" --name demo --state-dir "$work/state" \
    --listen "unix:$work/nbd.sock" 2>"$work/daemon.log" &
daemon_pid=$!
for _ in $(seq 100); do nbdsrv status >/dev/null 2>&1 && break; sleep 0.1; done
nbdsrv status
live="nbd+unix:///disk0?socket=$(nbdsrv status --json | json 'd["vms"][0]["live_socket"]')"
write() { qemu-io -f raw -c "write -P $1 $2 $3" "$live" >/dev/null; echo "wrote 0x$(printf %x $1) at $2 (+$3)"; }

step "the guest writes"
write 0x11 0 4M
write 0x22 64M 1M

step "full backup: backup begin (creates checkpoint c1 at the point in time), nbdcopy"
nbdsrv backup begin demo --checkpoint c1
sid=$(nbdsrv backup list demo --json | json 'd[0]["id"]')
uri="nbd+unix:///demo/disk0?socket=$work/nbd.sock"
nbdcopy "$uri" "$work/backup.raw"
nbdsrv backup end demo "$sid"

step "the guest writes more"
write 0x33 1M 128k
write 0x44 200M 64k
qemu-img convert -f raw -O raw "$live" "$work/expected.raw"   # the disk as it is now

step "incremental backup from c1 (creates c2)"
nbdsrv backup begin demo --from c1 --checkpoint c2
sid=$(nbdsrv backup list demo --json | json 'd[0]["id"]')
write 0x55 0 8M   # after the point in time: must not reach the backup
step "changed since c1: nbdinfo --map=qemu:dirty-bitmap:c1"
nbdinfo --map=qemu:dirty-bitmap:c1 "$uri"
step "copy only the dirty extents onto the full backup (libnbd)"
/usr/bin/python3 scripts/incremental_copy.py "$uri" qemu:dirty-bitmap:c1 "$work/backup.raw" |
    json '"copied %d extents, %d bytes" % (len(d), sum(n for _, n in d))'
step "checksums: rebuilt backup vs. the disk at the point in time"
sha256sum "$work/backup.raw" "$work/expected.raw"
cmp "$work/backup.raw" "$work/expected.raw" && echo "the incremental backup is exact"
nbdsrv backup end demo "$sid"

bash scripts/restore-demo.sh "$work" "$work/backup.raw"

step "checkpoints"
nbdsrv checkpoint list demo
step "stop the daemon (SIGTERM)"
kill -TERM "$daemon_pid"; wait "$daemon_pid"; daemon_pid=
echo "daemon stopped cleanly"
