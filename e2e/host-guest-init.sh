#!/bin/sh
# /init of run C: a QEMU guest with an emulated IOMMU that plays the *host*.
# It loads VFIO and the devices' drivers, proves a plain sysfs bind cycle (so the guest set-up is
# known-good independently of our CLI), then drives the static `gpu-passthrough` CLI through
# doctor/devices/plan/attach/detach and a crash mid-attach repaired by reconcile.
# Every result is a line `E2E-C <key> <value...>` on the console, checked by `e2e-check host`.
export PATH=/bin:/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
mkdir -p /tmp /run /var/lib && mount -t tmpfs tmpfs /tmp

say() { echo "E2E-C $*"; }
check() { # name, then a command; records PASS/FAIL without stopping the run
    name=$1; shift
    if "$@"; then say check "$name" PASS; else say check "$name" FAIL; fi
}
now_ms() { awk '{ printf "%d", $1 * 1000 }' /proc/uptime; }  # busybox date has no %N; 10 ms resolution
driver_of() {
    if [ -L /sys/bus/pci/devices/$1/driver ]; then basename "$(readlink /sys/bus/pci/devices/$1/driver)"; else echo none; fi
}
find_dev() { # vendor device [class] -> first matching PCI address
    for d in /sys/bus/pci/devices/*; do
        if [ "$(cat $d/vendor)" = "$1" ] && [ "$(cat $d/device)" = "$2" ] &&
            { [ -z "$3" ] || [ "$(cat $d/class)" = "$3" ]; }; then basename $d; return; fi
    done
}
finish() { say "done"; sync; poweroff -f; }

for ko in $(cat /modules.order); do
    insmod "$ko" || say check "insmod $(basename $ko)" FAIL
done
# kvm_amd gives this TCG guest a nested /dev/kvm (for doctor's KVM checks); optional.
for ko in $(cat /modules.optional); do
    insmod "$ko" 2>/dev/null || say optional_module_failed "$(basename $ko)"
done
say kvm "$( [ -c /dev/kvm ] && echo present || echo absent)"
VGA=$(find_dev 0x1234 0x1111 0x030000)
# A second display controller (bochs-display, class 0x038000): where `attach --gpus 1` goes once
# the VGA device is quarantined.
DISP2=$(find_dev 0x1234 0x1111 0x038000)
EDU=$(find_dev 0x1234 0x11e8)
NIC=$(find_dev 0x8086 0x10d3)
NVME=$(find_dev 0x1b36 0x0010)
say devices vga=$VGA edu=$EDU nic=$NIC disp2=$DISP2 nvme=$NVME
check "iommu groups exist" test -n "$(ls /sys/kernel/iommu_groups)"
check "vga bound to bochs-drm at boot" test "$(driver_of $VGA)" = bochs-drm
check "nic bound to e1000e at boot" test "$(driver_of $NIC)" = e1000e

# 1. Plain sysfs cycle, no CLI: override -> unbind -> drivers_probe -> /dev/vfio/N -> restore.
sysfs_cycle() { # addr original-driver
    group=$(basename "$(readlink /sys/bus/pci/devices/$1/iommu_group)")
    t0=$(now_ms)
    echo vfio-pci > /sys/bus/pci/devices/$1/driver_override
    [ "$2" = none ] || echo $1 > /sys/bus/pci/drivers/$2/unbind
    echo $1 > /sys/bus/pci/drivers_probe
    i=0; while [ ! -e /dev/vfio/$group ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i + 1)); done
    t1=$(now_ms)
    check "sysfs: $1 on vfio-pci" test "$(driver_of $1)" = vfio-pci
    check "sysfs: /dev/vfio/$group for $1" test -c /dev/vfio/$group
    t2=$(now_ms)
    echo $1 > /sys/bus/pci/drivers/vfio-pci/unbind
    echo > /sys/bus/pci/devices/$1/driver_override
    echo $1 > /sys/bus/pci/drivers_probe
    t3=$(now_ms)
    check "sysfs: $1 back on $2" test "$(driver_of $1)" = "$2"
    say timing sysfs_bind_ms $1 $((t1 - t0))
    say timing sysfs_restore_ms $1 $((t3 - t2))
}
sysfs_cycle $VGA bochs-drm
sysfs_cycle $NIC e1000e
sysfs_cycle $EDU none

CLI=/bin/gpu-passthrough
# run LABEL COMMAND...: runs it, shows stdout and stderr between markers (the harness extracts
# them into e2e/work/logs/run-c-LABEL.out/.err), leaves stdout in /tmp/out, returns its exit code.
run() {
    label=$1; shift
    "$@" > /tmp/out 2> /tmp/err; rc=$?
    echo "E2E-C begin $label"; cat /tmp/out
    echo "E2E-C stderr $label"; cat /tmp/err
    echo "E2E-C end $label"
    say rc "$label" $rc
    return $rc
}
say boot_vga "$(cat /sys/bus/pci/devices/$VGA/boot_vga 2>/dev/null || echo none)"
run doctor $CLI doctor --json
run devices $CLI devices --json
run devices-all $CLI devices --all --json
# The VGA device is this guest's boot display: plan must refuse it unless allowed explicitly.
run plan-boot-vga $CLI plan $VGA --json
run plan $CLI plan $VGA $NIC --allow-boot-vga --json

t0=$(now_ms)
run attach $CLI attach $VGA $NIC --owner vm-1 --allow-boot-vga --vmm qemu --json
t1=$(now_ms)
say timing attach_ms $((t1 - t0))
check "attach: vga on vfio-pci" test "$(driver_of $VGA)" = vfio-pci
check "attach: nic on vfio-pci" test "$(driver_of $NIC)" = vfio-pci
check "attach: nic kept out of D3cold (d3cold_allowed=0)" test "$(cat /sys/bus/pci/devices/$NIC/d3cold_allowed)" = 0
say reset_method nic "$(cat /sys/bus/pci/devices/$NIC/reset_method 2>/dev/null || echo none)"
say reset_method vga "$(cat /sys/bus/pci/devices/$VGA/reset_method 2>/dev/null || echo none)"
run attach-again $CLI attach $VGA --owner vm-2 --allow-boot-vga --json

t0=$(now_ms)
run detach $CLI detach --owner vm-1 --json
t1=$(now_ms)
say timing detach_ms $((t1 - t0))
check "detach: vga back on bochs-drm" test "$(driver_of $VGA)" = bochs-drm
check "detach: nic back on e1000e" test "$(driver_of $NIC)" = e1000e
check "detach: vga driver_override cleared" test "$(cat /sys/bus/pci/devices/$VGA/driver_override)" = "(null)"
check "detach: nic d3cold_allowed restored to 1" test "$(cat /sys/bus/pci/devices/$NIC/d3cold_allowed)" = 1

# Crash between unbind and bind: the failpoint aborts the process mid-transaction.
run crash env GPU_PASSTHROUGH_FAILPOINT=after-unbind $CLI attach $VGA --owner vm-2 --allow-boot-vga --json
say crash_left_driver "$(driver_of $VGA)"
run reconcile $CLI reconcile --json
check "reconcile: vga back on bochs-drm" test "$(driver_of $VGA)" = bochs-drm
run reconcile-again $CLI reconcile --json
run attach-after-reconcile $CLI attach $VGA --owner vm-3 --allow-boot-vga --json
check "attach after reconcile: vga on vfio-pci" test "$(driver_of $VGA)" = vfio-pci
run detach-after-reconcile $CLI detach --owner vm-3 --json
check "detach after reconcile: vga back on bochs-drm" test "$(driver_of $VGA)" = bochs-drm

# Health between tenants: a console log of vm-1 doctored with an Xid 79 (at the guest address the
# boot spec gave the VGA device, 00:10.0: GPUs come first), ingested for both owners the VGA device had (vm-1, vm-3): quarantined, so an explicit
# attach is refused naming the events and `--gpus 1` picks the other display.
cat > /tmp/console-vm-1.log <<'LOG'
[    5.120000] NVRM: loading NVIDIA UNIX Open Kernel Module for x86_64  535.261.03  Release Build
[   42.000000] NVRM: Xid (PCI:0000:00:10): 13, pid=77, name=python3, Graphics Exception: ESR 0x404490=0x80000001
[   42.500000] NVRM: Xid (PCI:0000:00:10): 79, pid=77, GPU has fallen off the bus.
GPU-XID {"address":"0000:00:10.0","kind":"xid","xid":79,"message":"pid=77, GPU has fallen off the bus","action":"reset_gpu"}
[   43.000000] nvidia 0000:00:10.0: Unable to change power state from D3cold to D0, device inaccessible
LOG
say reset_method nvme "$(cat /sys/bus/pci/devices/$NVME/reset_method 2>/dev/null || echo none)"
run attach-nvme $CLI attach $NVME --owner vm-5 --json
run detach-nvme $CLI detach --owner vm-5 --json
check "detach: nvme back with no driver, as it came" test "$(driver_of $NVME)" = none
run plan-gpus-before $CLI plan --gpus 1 --allow-boot-vga --json
run health-scan $CLI health scan --console /tmp/console-vm-1.log --json
run ingest-vm-1 $CLI health ingest --owner vm-1 --console /tmp/console-vm-1.log --json
run ingest-vm-3 $CLI health ingest --owner vm-3 --console /tmp/console-vm-1.log --json
run health $CLI health --json
run devices-quarantined $CLI devices --json
run attach-quarantined $CLI attach $VGA --owner vm-4 --allow-boot-vga --json
check "quarantined vga not moved" test "$(driver_of $VGA)" = bochs-drm
run attach-gpus $CLI attach --gpus 1 --owner vm-4 --allow-boot-vga --json
check "attach --gpus 1: the other display ($DISP2) on vfio-pci" test "$(driver_of $DISP2)" = vfio-pci
run detach-gpus $CLI detach --owner vm-4 --json
run health-clear $CLI health clear $VGA --json

# Host hardening (checks in e2e/check/src/host/hardening.rs): a process
# holding a device's VFIO node keeps the device. The NIC, bound to vfio-pci by hand (no journal
# record) and held by `sleep`: attach by another owner is refused naming it, the NIC stays bound.
# The edu device attached for vm-h, then held: detach and reconcile --gone refuse and keep it;
# once the holder exits, detach gives it back.
# hold ROLE NODE: a background `sleep` holding NODE open on fd 3, in $holder; waits until the
# sleep itself holds it (exec'd, fd 3 open), since the CLI names a holder from /proc/PID/comm and
# /proc/PID/fd: a holder caught between fork and exec reads as `sh`, or holds nothing yet.
hold() {
    sleep 600 3<>"$2" &
    holder=$!
    i=0
    while { [ "$(cat /proc/$holder/comm 2>/dev/null)" != sleep ] ||
        [ "$(readlink /proc/$holder/fd/3 2>/dev/null)" != "$2" ]; } && [ $i -lt 50 ]; do
        sleep 0.1; i=$((i + 1))
    done
    check "held: the $1 holder is sleep with $2 open" test "$(cat /proc/$holder/comm)" = sleep -a \
        "$(readlink /proc/$holder/fd/3)" = "$2"
    say holder $1 $holder
}
hardening_holders() {
    g=$(basename "$(readlink /sys/bus/pci/devices/$NIC/iommu_group)")
    echo vfio-pci > /sys/bus/pci/devices/$NIC/driver_override
    echo $NIC > /sys/bus/pci/drivers/e1000e/unbind
    echo $NIC > /sys/bus/pci/drivers_probe
    i=0; while [ ! -e /dev/vfio/$g ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i + 1)); done
    hold nic /dev/vfio/$g
    run held-attach $CLI attach $NIC --owner vm-h2 --json
    check "held: nic still on vfio-pci after the refused attach" test "$(driver_of $NIC)" = vfio-pci
    kill $holder; wait $holder 2>/dev/null
    echo $NIC > /sys/bus/pci/drivers/vfio-pci/unbind
    echo > /sys/bus/pci/devices/$NIC/driver_override
    echo $NIC > /sys/bus/pci/drivers_probe
    check "held: nic back on e1000e by hand" test "$(driver_of $NIC)" = e1000e

    run held-edu-attach $CLI attach $EDU --owner vm-h --json
    g=$(basename "$(readlink /sys/bus/pci/devices/$EDU/iommu_group)")
    hold edu /dev/vfio/$g
    run held-detach $CLI detach --owner vm-h --json
    check "held: edu still on vfio-pci after the refused detach" test "$(driver_of $EDU)" = vfio-pci
    run held-reconcile $CLI reconcile --gone vm-h --json
    check "held: edu still on vfio-pci after reconcile --gone" test "$(driver_of $EDU)" = vfio-pci
    kill $holder; wait $holder 2>/dev/null
    run held-detach-after $CLI detach --owner vm-h --json
    check "held: edu back with no driver once its holder exited" test "$(driver_of $EDU)" = none
}
hardening_holders

# Blind (issue 24): in a PID namespace of its own, as in a pod without hostPID, /proc shows none
# of the host's processes, so nothing is moved or released: the device plugin's --prepare is
# refused naming the fix (bounded: a plugin that started serving would run until killed),
# attach is refused with the edu device left as it is, doctor fails host_processes (checked by
# e2e-check from its JSON).
blind() {
    mkdir -p /tmp/kubelet/device-plugins
    run blind-plugin timeout 60 unshare --pid --fork --mount-proc \
        $CLI device-plugin --kubelet-dir /tmp/kubelet --prepare all
    rc=$?
    check "blind: device-plugin --prepare all stops with an error, not the timeout" \
        test $rc -ne 0 -a $rc -ne 124 -a $rc -ne 143
    check "blind: the plugin's refusal names hostPID: true" grep -q "hostPID: true" /tmp/out /tmp/err
    run blind-attach unshare --pid --fork --mount-proc $CLI attach $EDU --owner vm-blind --json
    check "blind: attach refused" test $? -ne 0
    check "blind: the attach refusal names hostPID: true" grep -q "hostPID: true" /tmp/out /tmp/err
    check "blind: edu not moved (no driver, as it came)" test "$(driver_of $EDU)" = none
    run blind-doctor unshare --pid --fork --mount-proc $CLI doctor --json
}
blind

# Kernel events on a real kernel: the device plugin, polling only every 10 minutes, hears the
# kernel announce driver changes (netlink uevents) and scans at once. Unbinding a device from
# vfio-pci by hand must show in its kernel_events_total{source="uevent"} and start a scan within
# seconds. No NVIDIA device exists in this guest, so what that scan concludes for a served GPU
# (Unhealthy) is shown by the device plugin's fake-sysfs tests.
metric() { # NAME SOURCE -> the plugin's counter, 0 when absent
    v=$(wget -q -O - http://127.0.0.1:9400/metrics 2>/dev/null |
        awk -v m="gpu_passthrough_plugin_$1_total{source=\"$2\"}" '$1 == m { print $2 }')
    echo "${v:-0}"
}
plugin_events() {
    ip link set lo up
    mkdir -p /tmp/kubelet/device-plugins
    $CLI device-plugin --kubelet-dir /tmp/kubelet --poll-ms 600000 \
        --metrics-addr 127.0.0.1:9400 > /tmp/plugin.out 2> /tmp/plugin.err &
    plugin=$!
    i=0
    until wget -q -O /dev/null http://127.0.0.1:9400/metrics 2>/dev/null || [ $i -ge 300 ]; do
        sleep 0.1; i=$((i + 1))
    done
    check "events: the plugin serves metrics" wget -q -O /dev/null http://127.0.0.1:9400/metrics
    g=$(basename "$(readlink /sys/bus/pci/devices/$EDU/iommu_group)")
    echo vfio-pci > /sys/bus/pci/devices/$EDU/driver_override
    echo $EDU > /sys/bus/pci/drivers_probe
    i=0; while [ ! -e /dev/vfio/$g ] && [ $i -lt 50 ]; do sleep 0.1; i=$((i + 1)); done
    sleep 1 # let the bind's own events settle
    uevents=$(metric kernel_events uevent)
    scans=$(metric scans uevent)
    t0=$(now_ms)
    echo $EDU > /sys/bus/pci/drivers/vfio-pci/unbind
    i=0
    while [ "$(metric kernel_events uevent)" -le "$uevents" ] && [ $i -lt 100 ]; do
        sleep 0.05; i=$((i + 1))
    done
    t1=$(now_ms)
    check "events: unbinding edu from vfio-pci reached the plugin as a uevent" \
        test "$(metric kernel_events uevent)" -gt "$uevents"
    say timing plugin_uevent_ms $((t1 - t0))
    i=0
    while [ "$(metric scans uevent)" -le "$scans" ] && [ "$(metric scans inotify)" -eq 0 ] &&
        [ $i -lt 100 ]; do
        sleep 0.05; i=$((i + 1))
    done
    check "events: a kernel event started a scan, the 10-minute poll none" \
        test "$(metric scans poll)" -eq 0 -a \
        "$(( $(metric scans uevent) + $(metric scans inotify) ))" -gt 0
    echo > /sys/bus/pci/devices/$EDU/driver_override
    kill $plugin; wait $plugin 2>/dev/null
    echo "E2E-C begin plugin-events"; cat /tmp/plugin.out
    echo "E2E-C stderr plugin-events"; cat /tmp/plugin.err
    echo "E2E-C end plugin-events"
    check "events: edu left with no driver" test "$(driver_of $EDU)" = none
}
plugin_events

# The host checks for itself (issue 23; checks in e2e/check/src/host/host_check.rs). Two owners'
# consoles forge GPU-XID lines for the edu device with no kernel fault behind them, at the guest
# address the boot spec gave it (00:10.0; one line claims a host-side kind, which the host
# refuses; one names an address the VM did not have, counted and dropped; one is stamped with a
# wall-clock time before the attachment, not counted): the device becomes suspect, never
# quarantined, and attach refuses it. The host's own check then reads edu's identity
# register (BAR0 offset 0, 0x010000ed) through the kernel's resource0, with memory decoding on
# (sysfs `enable`; a driverless device has it off), and returns the device to service.
host_check() {
    run edu-attach-1 $CLI attach $EDU --owner vm-e1 --vmm qemu --json
    run edu-detach-1 $CLI detach --owner vm-e1 --json
    run edu-attach-2 $CLI attach $EDU --owner vm-e2 --vmm qemu --json
    run edu-detach-2 $CLI detach --owner vm-e2 --json
    cat > /tmp/console-forged.log <<'LOG'
[    3.000000] e2e: a tenant's console, forged by root inside the guest
GPU-XID {"address":"0000:00:10.0","kind":"xid","xid":79,"message":"pid=7, GPU has fallen off the bus","action":"reboot_host"}
GPU-XID {"address":"0000:00:10.0","kind":"verify_failed","xid":null,"message":"forged host check","action":"reset_gpu"}
GPU-XID {"address":"0000:00:07.0","kind":"xid","xid":79,"message":"pid=8, GPU has fallen off the bus","action":"reset_gpu"}
2001-01-01T00:00:00Z GPU-XID {"address":"0000:00:10.0","kind":"xid","xid":79,"message":"pid=9, GPU has fallen off the bus","action":"reset_gpu"}
LOG
    run forged-scan $CLI health scan --console /tmp/console-forged.log --json
    run forged-ingest-1 $CLI health ingest --owner vm-e1 --console /tmp/console-forged.log --json
    run forged-ingest-2 $CLI health ingest --owner vm-e2 --console /tmp/console-forged.log --json
    run health-suspect $CLI health --json
    run attach-suspect $CLI attach $EDU --owner vm-e3 --json
    check "suspect: edu not moved by the refused attach" test "$(driver_of $EDU)" = none
    say edu_enable_before "$(cat /sys/bus/pci/devices/$EDU/enable)"
    echo 1 > /sys/bus/pci/devices/$EDU/enable
    check "host check: edu's memory decoding on (sysfs enable)" test "$(cat /sys/bus/pci/devices/$EDU/enable)" = 1
    run edu-check $CLI health check $EDU --json
    run health-checked $CLI health --json
    echo 0 > /sys/bus/pci/devices/$EDU/enable
    run edu-attach-checked $CLI attach $EDU --owner vm-e3 --json
    run edu-detach-checked $CLI detach --owner vm-e3 --json
    check "checked: edu back with no driver, as it came" test "$(driver_of $EDU)" = none
}
host_check

# Optional: a nested QEMU given the edu device through the boot spec's vfio-pci arguments.
if [ -x /nested/qemu-system-x86_64 ]; then
    run nested-attach $CLI attach $EDU --owner nested --vmm qemu --json
    # The device argument comes from the boot spec, as a VMM launcher would take it, with the
    # guest address it fixes (bus=pcie.0,addr=...): the nested guest lists edu there.
    spec_dev=$(grep -o 'vfio-pci,host=[^"]*' /tmp/out | head -n 1)
    say nested_device "$spec_dev"
    accel=tcg
    [ -c /dev/kvm ] && accel=kvm
    say nested_accel $accel
    t0=$(now_ms)
    timeout 600 /nested/qemu-system-x86_64 -L /nested/share -accel $accel -machine q35 -m 256 -smp 1 \
        -nographic -vga none -no-reboot -nic none -kernel /nested/vmlinuz -initrd /nested/initrd.cpio \
        -append "console=ttyS0 panic=-1 quiet" -device "$spec_dev" < /dev/null 2>&1 |
        sed 's/^/E2E-N /'
    t1=$(now_ms)
    say timing nested_ms $((t1 - t0))
    run nested-detach $CLI detach --owner nested --json
fi
finish
