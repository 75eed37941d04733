#!/bin/sh
# /init of the nested guest (optional part of run C): list the PCI devices it was given.
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
for d in /sys/bus/pci/devices/*; do
    echo "E2E-N pci $(basename $d) $(cat $d/vendor):$(cat $d/device) class=$(cat $d/class)"
done
echo "E2E-N done"
poweroff -f
