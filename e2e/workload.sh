#!/bin/sh
# The workload of run A, living at /e2e/workload.sh inside the Debian-like workload root.
# It reports what a CUDA program would see: the loader cache, nvidia-smi on PATH and its exit code
# (9 = "couldn't communicate with the NVIDIA driver", expected: there is no GPU in the guest).
# Lines `E2E-A <key> <value...>` are parsed by e2e/run.
# Works whether guest init ran it inside the root (switch_root/chroot) or from the initramfs.
if [ "$E2E_IN_ROOT" != 1 ] && [ -x /workload/bin/chroot ]; then
    E2E_IN_ROOT=1 exec /workload/bin/chroot /workload /bin/sh /e2e/workload.sh "$@"
fi
export PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin
mount -t proc proc /proc 2>/dev/null
mount -t sysfs sysfs /sys 2>/dev/null
echo "E2E-A workload started"
ldconfig -p | grep -E 'lib(cuda|nvidia-ml)\.so\.1 ' | sed 's/^/E2E-A ldconfig /'
# The first cache entry is the one the dynamic loader uses.
f=$(ldconfig -p | awk '$1 == "libcuda.so.1" { print $NF; exit }')
echo "E2E-A libcuda_real ${f:-none} -> $([ -e "$f" ] && readlink -f "$f")"
echo "E2E-A which $(which nvidia-smi || echo none)"
ls /dev/nvidia* 2>/dev/null | sed 's/^/E2E-A node /'
nvidia-smi
echo "E2E-A nvidia_smi_rc $?"
echo "E2E-A workload done"
