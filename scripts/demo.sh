#!/usr/bin/env bash
# make demo: serve a generated sample disk with nbdsrv and use it with real NBD clients.
set -euo pipefail
cd "$(dirname "$0")/.."
NBDSRV=.venv/bin/nbdsrv
work=$(mktemp -d /tmp/nbdsrv-demo.XXXXXX)
daemon_pid=
cleanup() {
    [ -n "$daemon_pid" ] && kill -TERM "$daemon_pid" 2>/dev/null && wait "$daemon_pid" || true
    rm -rf "$work"
}
trap cleanup EXIT

step() { printf '\n== %s\n' "$*"; }

step "a 256 MiB sample disk: two data regions, holes elsewhere"
truncate -s 256M "$work/disk.raw"
head -c 4M /dev/urandom | dd of="$work/disk.raw" bs=1M seek=16 conv=notrunc status=none
printf 'nbdsrv demo' | dd of="$work/disk.raw" bs=1 seek=$((200 * 1024 * 1024)) conv=notrunc status=none

step "nbdsrv daemon --file disk=$work/disk.raw"
$NBDSRV daemon --state-dir "$work/state" --listen "unix:$work/nbd.sock" \
    --listen tcp:127.0.0.1:0 --file "disk=$work/disk.raw" 2>"$work/daemon.log" &
daemon_pid=$!
for _ in $(seq 100); do
    $NBDSRV status --control "$work/state/control.sock" >/dev/null 2>&1 && break
    sleep 0.1
done
$NBDSRV status --control "$work/state/control.sock"
uri="nbd+unix:///disk?socket=$work/nbd.sock"

step "nbdinfo --list"
nbdinfo --list "$uri"
step "nbdinfo --map (allocation)"
nbdinfo --map "$uri"
step "nbdcopy to a file, checksums compared"
nbdcopy "$uri" "$work/copy.raw"
sha256sum "$work/disk.raw" "$work/copy.raw"
cmp "$work/disk.raw" "$work/copy.raw" && echo "copy matches the disk"
step "qemu-img compare and qemu-io read over TCP"
tcp=$($NBDSRV status --control "$work/state/control.sock" --json |
      .venv/bin/python -c 'import json,sys; print(json.load(sys.stdin)["exports"][0]["uris"][1])')
qemu-img compare -f raw "$work/disk.raw" "$tcp"
qemu-io -r -f raw -c "read -P 0 0 16M" "$tcp"

step "stop the daemon (SIGTERM)"
kill -TERM "$daemon_pid"; wait "$daemon_pid"; daemon_pid=
echo "daemon stopped cleanly"
