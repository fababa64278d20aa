#!/usr/bin/env bash
# Part of make demo (scripts/demo.sh calls it with the running daemon): the demo's own full
# backup comes back through the same daemon — written into a new image through restore/ID,
# then live-restored from an NBD server (qemu-nbd) while the export is already readable.
# Each restored image is checked against the backup by checksum.
#   usage: restore-demo.sh WORK_DIR BACKUP.raw   (control socket: WORK_DIR/state/control.sock)
set -euo pipefail
cd "$(dirname "$0")/.."
work=$1
backup=$2
NBDSRV=.venv/bin/nbdsrv
nbdsrv() { $NBDSRV "$@" --control "$work/state/control.sock"; }
json() { .venv/bin/python -c "import json,sys; d=json.load(sys.stdin); print($1)"; }
step() { printf '\n== %s\n' "$*"; }
source_pid=
cleanup() { if [ -n "$source_pid" ]; then kill "$source_pid" 2>/dev/null || true; fi; }
trap cleanup EXIT
size=$(stat -c %s "$backup")
want=$(sha256sum <"$backup" | cut -d' ' -f1)
check() {  # IMAGE: what it reads as must be the backup
    qemu-img convert -O raw "$1" "$work/check.raw"
    got=$(sha256sum <"$work/check.raw" | cut -d' ' -f1)
    rm -f "$work/check.raw"
    echo "backup $want"; echo "image  $got"
    [ "$got" = "$want" ] && echo "restored exactly"
}

step "restore the full backup into a new image: restore begin --image, nbdcopy, restore end"
begun=$(nbdsrv restore begin --image "$work/restored.qcow2" --size "$size" --json)
rid=$(echo "$begun" | json 'd["id"]')
uri=$(echo "$begun" | json 'd["uri"]')
echo "restore $rid: $uri"
nbdcopy "$backup" "$uri"
nbdsrv restore list
nbdsrv restore end "$rid"
check "$work/restored.qcow2"

step "live restore: the backup served read-only by qemu-nbd, restore begin --source"
qemu-nbd -r -t -f raw -x backup -k "$work/backup.sock" "$backup" &
source_pid=$!
for _ in $(seq 100); do [ -S "$work/backup.sock" ] && break; sleep 0.05; done
begun=$(nbdsrv restore begin --image "$work/live.qcow2" \
    --source "nbd+unix:///backup?socket=$work/backup.sock" --json)
rid=$(echo "$begun" | json 'd["id"]')
uri=$(echo "$begun" | json 'd["uri"]')
echo "readable at once (a VM could boot from it now):"
qemu-io -f raw -c "read -P 0x11 0 1M" "$uri" | head -1
for _ in $(seq 600); do
    state=$(nbdsrv restore list --json | json '[s["state"] for s in d if s["id"] == "'"$rid"'"][0]')
    [ "$state" = ready ] && break
    sleep 0.1
done
nbdsrv restore list
nbdsrv restore end "$rid"
kill "$source_pid"; wait "$source_pid" 2>/dev/null || true; source_pid=
qemu-img info "$work/live.qcow2" | grep -q '^backing file' && { echo "still has a backing"; exit 1; }
check "$work/live.qcow2"
