#!/bin/sh
# The rig guest's /init (busybox sh). The host packs it with /etc/rig/env (configuration, required
# features, mode) and /etc/rig/plan (one line per test or command to run).
#
# The console (ttyS0) gets everything a human wants to read. The host parses only the second
# serial port (ttyS1), which the kernel never prints on, so its marker lines cannot be torn by printk:
#   @@RIG BOOT <centiseconds since boot>   /init started
#   @@RIG FACT <key> <value>               what this guest offers (devices, nodes)
#   @@RIG START <id>                       a plan item starts; its output follows verbatim
#   @@RIG END <id> <exit status> <centiseconds>
#   @@RIG DONE                             every plan item ran; the guest powers off next
export PATH=/bin
/bin/busybox mount -t proc proc /proc
/bin/busybox --install -s /bin # resolves its own path through /proc/self/exe
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
# No tmpfs on /tmp: the initramfs root is writable memory already, and workspace binaries are
# packed at their host paths, which lie under /tmp when the checkout does; a mount would hide them.
mkdir -p /tmp && chmod 1777 /tmp
mount -t debugfs debugfs /sys/kernel/debug 2>/dev/null
. /etc/rig/env

exec 3>/dev/ttyS1
uptime_cs() { awk '{ printf "%d", $1 * 100 }' /proc/uptime; }
fact() { echo "@@RIG FACT $1 $2" >&3; echo "rig: $1 = $2"; }

echo "@@RIG BOOT $(uptime_cs)" >&3
echo "rig: configuration $RIG_CONFIG, kernel $RIG_KERNEL ($(uname -r)), GMEM_DMA_REQUIRE=$GMEM_DMA_REQUIRE"

# Find the edu device (PCI 1234:11e8) and hand it to vfio-pci. An emulated IOMMU probes its
# endpoints during boot; wait briefly for the device's IOMMU group where one is expected.
# QEMU has two edu devices (tests that share an address space between devices use the second);
# GMEM_DMA_EDU names the first, and vfio-pci's new_id binds both.
EDU=
ALL_EDU=
for d in /sys/bus/pci/devices/*; do
    if [ "$(cat "$d/vendor")" = 0x1234 ] && [ "$(cat "$d/device")" = 0x11e8 ]; then
        [ -z "$EDU" ] && EDU=${d##*/}
        ALL_EDU="$ALL_EDU ${d##*/}"
    fi
done
if [ -n "$EDU" ]; then
    i=0
    while [ "$RIG_IOMMU" = yes ] && [ ! -e "/sys/bus/pci/devices/$EDU/iommu_group" ] && [ $i -lt 50 ]; do
        sleep 0.1; i=$((i + 1))
    done
    echo 1234 11e8 >/sys/bus/pci/drivers/vfio-pci/new_id 2>/dev/null
    i=0
    while [ ! -e "/sys/bus/pci/devices/$EDU/driver" ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i + 1)); done
    export GMEM_DMA_EDU=$EDU
    fact edu "$EDU"
    fact edu-all "$ALL_EDU"
    fact edu-driver "$(basename "$(readlink "/sys/bus/pci/devices/$EDU/driver")")"
    fact edu-iommu-group "$(basename "$(readlink "/sys/bus/pci/devices/$EDU/iommu_group")")"
else
    fact edu none
fi
fact iommu-classes "$(ls /sys/class/iommu 2>/dev/null | tr '\n' ' ')"
fact dev-vfio "$(ls /dev/vfio 2>/dev/null | tr '\n' ' ')"
fact dev-vfio-devices "$(ls /dev/vfio/devices 2>/dev/null | tr '\n' ' ')"
fact dev-iommu "$([ -e /dev/iommu ] && echo present || echo absent)"
fact dev-kvm "$([ -e /dev/kvm ] && echo present || echo absent)"
fact kernel "$(uname -r)"
export GMEM_DMA_REQUIRE RIG_CONFIG RUST_BACKTRACE=1

if [ "$RIG_MODE" = shell ]; then
    echo "rig: interactive shell; the plan is in /etc/rig/plan; 'poweroff -f' to leave"
    setsid cttyhack sh
    poweroff -f
fi

# Each plan item runs as its own process, so a crash or hang loses only that item.
#   test <id> <seconds> <binary> <exact test name>
#   cmd  <id> <seconds> <binary> [args...]
while read -r kind id limit bin rest; do
    case "$kind" in
        test) set -- --exact --test-threads=1 --nocapture "$rest" ;;
        cmd) set -- $rest ;;
        *) continue ;;
    esac
    echo "rig: == $id: $bin $*"
    echo "@@RIG START $id" >&3
    t0=$(uptime_cs)
    { timeout -s KILL "$limit" "$bin" "$@" </dev/null; echo $? >/tmp/rc; } 2>&1 | tee /tmp/out
    t1=$(uptime_cs)
    cat /tmp/out >&3
    echo >&3 # the output's last line may lack its newline
    echo "@@RIG END $id $(cat /tmp/rc) $((t1 - t0))" >&3
done </etc/rig/plan

echo "@@RIG DONE" >&3
sync
poweroff -f
