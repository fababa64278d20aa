#!/bin/busybox sh
# /init of the test guest (tests/guest/build.py): load the virtio modules, mount the ext4
# data disk /dev/vda on /data, run the QEMU guest agent on its virtio-serial port. Lines
# starting with "guest:" on the serial console tell the harness how far boot got.
/bin/busybox --install -s /bin
export PATH=/bin:/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in $(cat /etc/modules); do
    insmod "/lib/modules/$m.ko" || echo "guest: insmod $m failed"
done

wait_for() {  # wait_for TEST ARG: up to 10 s for `test TEST ARG`
    i=0
    while ! test "$1" "$2" && [ $i -lt 100 ]; do sleep 0.1; i=$((i + 1)); done
    test "$1" "$2"
}

wait_for -b /dev/vda || echo "guest: no /dev/vda"
mount -t ext4 /dev/vda /data && echo "guest: /data mounted"

port=
for p in /sys/class/virtio-ports/*; do
    [ "$(cat "$p/name" 2>/dev/null)" = org.qemu.guest_agent.0 ] && port=/dev/${p##*/}
done
wait_for -c "$port" || echo "guest: no agent port"
echo "guest: agent on $port"
# init must never exit (the kernel would panic); restart the agent if it dies.
while true; do
    qemu-ga --method=virtio-serial --path="$port" --statedir=/run
    echo "guest: qemu-ga exited with status $?"
    sleep 1
done
