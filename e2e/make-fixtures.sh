#!/usr/bin/env bash
# Make the e2e fixtures (a Debian guest kernel, a subset of its modules, the NVIDIA open kernel
# modules built for it, GSP firmware and the userspace libraries) from Debian bookworm packages,
# following the recipe in shared/fixtures/README.md. For machines without ../shared/fixtures.
#
# Usage: e2e/make-fixtures.sh OUT_DIR
# Needs root (apt-get), network access to the Debian archive, gcc/make, and about 15 minutes on
# 2 cores (the NVIDIA module build dominates). Installs linux-image-amd64 and linux-headers-amd64
# on this machine (the module build and `modprobe --show-depends` need them installed); it does
# not boot them. Adds the contrib/non-free/non-free-firmware components in a separate apt
# source file. Output archives are deterministic (sorted, mtime 0, root-owned, gzip -n -9).
set -euo pipefail
export LC_ALL=C DEBIAN_FRONTEND=noninteractive

OUT=${1:?usage: make-fixtures.sh OUT_DIR}
[ "$(id -u)" = 0 ] || { echo "make-fixtures.sh: run as root (it installs packages with apt-get)" >&2; exit 2; }
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
say() { printf '==> %s\n' "$*"; }
det_tar() { # DIR OUT PATH...: deterministic tar.gz of PATH... relative to DIR
    local dir=$1 out=$2; shift 2
    (cd "$dir" && tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner -cf - "$@") | gzip -n -9 >"$out"
}

# 1. Components. Written as its own deb822 file so the machine's sources stay untouched.
codename=$(. /etc/os-release && echo "$VERSION_CODENAME")
src=/etc/apt/sources.list.d/gpu-passthrough-fixtures.sources
if [ ! -f "$src" ]; then
    say "adding contrib non-free non-free-firmware for $codename"
    cat >"$src" <<EOF
Types: deb
URIs: http://deb.debian.org/debian
Suites: $codename $codename-updates
Components: contrib non-free non-free-firmware
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
fi
apt-get update -qq

# 2. The guest kernel (whatever linux-image-amd64 currently points at) and its headers.
say "installing linux-image-amd64 linux-headers-amd64 kmod build tools"
apt-get install -y -qq linux-image-amd64 linux-headers-amd64 kmod build-essential binutils >/dev/null
KVER=$(dpkg-query -W -f='${Depends}' linux-image-amd64 | grep -o 'linux-image-[0-9][^ ,]*-amd64' | head -n1 | sed 's/^linux-image-//')
[ -d "/lib/modules/$KVER" ] || { echo "make-fixtures.sh: /lib/modules/$KVER missing after install" >&2; exit 1; }
say "kernel $KVER"

# 3. The driver packages, unpacked (never installed: that would run DKMS on this host).
DRV=$(apt-cache policy nvidia-open-kernel-dkms | awk '/Candidate:/ { print $2 }' | sed 's/-[^-]*$//')
[ -n "$DRV" ] && [ "$DRV" != "(none)" ] || { echo "make-fixtures.sh: no nvidia-open-kernel-dkms candidate; check the non-free component" >&2; exit 1; }
say "NVIDIA driver $DRV"
pkgs=(nvidia-open-kernel-dkms firmware-nvidia-gsp libcuda1 libnvidia-ml1 libnvidia-ptxjitcompiler1
    libnvidia-nvvm4 libnvidia-cfg1 nvidia-smi nvidia-modprobe nvidia-driver)
(cd "$WORK" && apt-get download -qq "${pkgs[@]}")
mkdir -p "$WORK/x"
for deb in "$WORK"/*.deb; do dpkg -x "$deb" "$WORK/x"; done

# 3b. The inputs of `versions build`, as Debian ships them: the open module source and the
# kernel's three build-tree packages (arch headers, common headers, kbuild).
mkdir -p "$OUT/build-inputs"
cp "$WORK"/nvidia-open-kernel-dkms_*.deb "$OUT/build-inputs/"
hdeps=$(dpkg-query -W -f='${Depends}' "linux-headers-$KVER")
common=$(grep -o 'linux-headers-[^ ,]*-common' <<<"$hdeps" | head -n1)
kbuild=$(grep -o 'linux-kbuild-[0-9.]*' <<<"$hdeps" | head -n1)
(cd "$OUT/build-inputs" && apt-get download -qq "linux-headers-$KVER" "$common" "$kbuild")

KDIR=$OUT/linux-$KVER
NDIR=$OUT/nvidia-$DRV
mkdir -p "$KDIR" "$NDIR"

# Kernel image and config, straight from the installed package.
cp "/boot/vmlinuz-$KVER" "$KDIR/vmlinuz"
cp "/boot/config-$KVER" "$KDIR/config"

# 4. The open kernel modules, built against the installed headers.
say "building the NVIDIA open modules (several minutes)"
srcdir=$(find "$WORK/x/usr/src" -maxdepth 1 -type d -name "nvidia-*open*-$DRV" | head -n1)
[ -n "$srcdir" ] || { echo "make-fixtures.sh: no open module source in nvidia-open-kernel-dkms" >&2; exit 1; }
cat >"$NDIR/nv-pci-exclude-bars.patch" <<'EOF'
--- a/nvidia/nv-pci.c
+++ b/nvidia/nv-pci.c
@@ -220,7 +220,7 @@
 
 resize:
     /* Attempt to resize BAR1 to the largest supported size */
-    r = pci_resize_resource(pci_dev, NV_GPU_BAR1, requested_size);
+    r = pci_resize_resource(pci_dev, NV_GPU_BAR1, requested_size, 0);
 
     if (r) {
         if (r == -ENOSPC)
EOF
# The backported 4th argument exists only in some kernels: apply the fix only where it is needed.
# (The declaration spans lines, so join them before matching.)
pci_h=$(find "/usr/src/linux-headers-$KVER/" "/usr/src/linux-headers-${KVER%-*}-common/" -path '*include/linux/pci.h' 2>/dev/null | head -n1)
if [ -n "$pci_h" ] && tr -d '\n' <"$pci_h" | grep -qE 'pci_resize_resource\(struct pci_dev \*dev, int i, int size,[[:space:]]*int'; then
    say "kernel has the 4-argument pci_resize_resource: applying nv-pci-exclude-bars.patch"
    patch -d "$srcdir" -p1 <"$NDIR/nv-pci-exclude-bars.patch"
fi
nice -n 10 make -C "$srcdir" -j"$(nproc)" modules KERNEL_UNAME="$KVER" >"$WORK/build.log" 2>&1 ||
    { tail -n 30 "$WORK/build.log" >&2; echo "make-fixtures.sh: module build failed (log above)" >&2; exit 1; }
mods=$WORK/nvmods/lib/modules/$KVER/kernel/drivers/gpu
mkdir -p "$mods"
for m in nvidia nvidia-uvm nvidia-modeset nvidia-drm nvidia-peermem; do
    ko=$(find "$srcdir" -name "$m.ko" | head -n1)
    [ -n "$ko" ] || { echo "make-fixtures.sh: $m.ko was not built" >&2; exit 1; }
    strip --strip-debug -o "$mods/$m.ko" "$ko"
done
det_tar "$WORK/nvmods" "$NDIR/nvidia-open-modules-$DRV-$KVER-x86_64.tar.gz" lib

# 5. The kernel-module subset: the modprobe closure of what the guests load.
say "collecting kernel modules"
ksub=$WORK/kmods
for m in vfio-pci vfio_iommu_type1 e1000e bochs drm_kms_helper video wmi kvm_amd kvm_intel virtio_blk \
    virtio_pci virtio_net overlay ext4 squashfs erofs 9p 9pnet_virtio virtiofs loop; do
    modprobe -S "$KVER" --show-depends "$m" | awk '$1 == "insmod" { print $2 }'
done | sort -u | while read -r ko; do
    mkdir -p "$ksub$(dirname "$ko")"
    case $ko in
        *.ko) cp "$ko" "$ksub$ko" ;;
        *.ko.xz) xz -dc "$ko" >"$ksub${ko%.xz}" ;;
        *.ko.zst) zstd -qdc "$ko" >"$ksub${ko%.zst}" ;;
    esac
done
for f in modules.builtin modules.builtin.modinfo modules.order; do
    cp "/lib/modules/$KVER/$f" "$ksub/lib/modules/$KVER/$f"
done
det_tar "$ksub" "$KDIR/kernel-modules-$KVER-x86_64.tar.gz" lib

# GSP firmware.
mkdir -p "$WORK/fw/lib/firmware/nvidia"
cp -a "$WORK/x/lib/firmware/nvidia/$DRV" "$WORK/fw/lib/firmware/nvidia/"
det_tar "$WORK/fw" "$NDIR/nvidia-gsp-firmware-$DRV.tar.gz" lib

# Userspace: real files under usr/lib/nvidia with soname and dev links, the tools, the GPU list.
say "collecting userspace libraries"
u=$WORK/libs
mkdir -p "$u/usr/lib/nvidia" "$u/usr/bin" "$u/usr/share/nvidia"
for lib in libcuda libnvidia-ml libnvidia-ptxjitcompiler libnvidia-nvvm libnvidia-cfg; do
    real=$(find "$WORK/x" -type f -name "$lib.so.$DRV" | head -n1)
    [ -n "$real" ] || { echo "make-fixtures.sh: $lib.so.$DRV not found in the packages" >&2; exit 1; }
    cp "$real" "$u/usr/lib/nvidia/"
    soname=$(objdump -p "$real" | awk '$1 == "SONAME" { print $2 }')
    ln -sf "$lib.so.$DRV" "$u/usr/lib/nvidia/$soname"
done
ln -sf libcuda.so.1 "$u/usr/lib/nvidia/libcuda.so"
ln -sf libnvidia-ml.so.1 "$u/usr/lib/nvidia/libnvidia-ml.so"
echo "$DRV" >"$u/usr/lib/nvidia/version"
for tool in nvidia-smi nvidia-modprobe; do
    bin=$(find "$WORK/x" -type f -name "$tool" -perm -u+x | head -n1)
    [ -n "$bin" ] || { echo "make-fixtures.sh: $tool not found in the packages" >&2; exit 1; }
    install -m 0755 "$bin" "$u/usr/bin/$tool" # also drops nvidia-modprobe's setuid bit
done
gz=$(find "$WORK/x" -name supported-gpus.json.gz | head -n1)
[ -n "$gz" ] || { echo "make-fixtures.sh: supported-gpus.json.gz not in nvidia-driver" >&2; exit 1; }
gzip -dc "$gz" >"$u/usr/share/nvidia/supported-gpus.json"
cp "$u/usr/share/nvidia/supported-gpus.json" "$NDIR/supported-gpus.json"
det_tar "$u" "$NDIR/nvidia-driver-libs-$DRV-x86_64.tar.gz" usr

(cd "$OUT" && find . -type f ! -name SHA256SUMS ! -name README.md | sort | xargs sha256sum >SHA256SUMS)
say "fixtures for kernel $KVER and driver $DRV in $OUT"
if [ "$KVER" != 6.1.0-56-amd64 ] || [ "$DRV" != 535.261.03 ]; then
    echo "note: e2e/run expects kernel 6.1.0-56-amd64 and driver 535.261.03; Debian has moved on, so update KVER/DRIVER in e2e/run" >&2
fi
