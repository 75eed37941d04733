#!/bin/sh
# The workload of run D, at /e2e/workload-d.sh in the workload root: the guest's memory right
# after GPU-INIT and after reading every library of the GPU payload once, around run A's
# workload. Lines `E2E-D mem <when> <field>: <kB> kB` and `E2E-D read_bytes N` are read by
# e2e-check. With E2E_HOLD=1 it then waits, so the host can measure several guests at once; with
# E2E_TIMING_ONLY=1 (a boot only timed to GPU-INIT) it does nothing.
export PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin
if [ "${E2E_TIMING_ONLY:-}" = 1 ]; then
    echo "E2E-D workload done"
    exit 0
fi
mount -t proc proc /proc 2>/dev/null
mem() {
    awk -v when="$1" '$1 == "MemAvailable:" || $1 == "MemFree:" || $1 == "Cached:" {
        print "E2E-D mem " when " " $1 " " $2 " kB" }' /proc/meminfo
}
mem after_init
/bin/sh /e2e/workload.sh
# Every driver library the loader can find, read once through its real file (in the payload the
# guest init mounted into this root: initramfs or image).
bytes=$(ldconfig -p | awk '$1 ~ /^lib(cuda|nv)/ { print $NF }' | while read -r f; do readlink -f "$f"; done |
    sort -u | while read -r f; do cat "$f"; done | wc -c)
echo "E2E-D read_bytes $bytes"
mem after_read
if [ "$E2E_HOLD" = 1 ]; then
    echo "E2E-D hold"
    sleep 600
fi
echo "E2E-D workload done"
