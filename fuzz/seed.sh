#!/bin/sh
# Seed corpora: a few small valid inputs, so the fuzzer starts from real structure.
set -eu
cd "$(dirname "$0")"
fixtures=${GPU_PASSTHROUGH_FIXTURES:-$(cd ../.. && pwd)/shared/fixtures}
[ -d "$fixtures" ] || fixtures=$(cd ../../.. && pwd)/shared/fixtures
mkdir -p corpus/archive_tar corpus/modinfo corpus/registry
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/t/usr/lib" && printf 'x' > "$work/t/usr/lib/libx.so.1.2" && ln -s libx.so.1.2 "$work/t/usr/lib/libx.so.1"
tar -C "$work/t" -cf corpus/archive_tar/plain.tar .
tar -C "$work/t" --format=pax -cf corpus/archive_tar/pax.tar .
gzip -9n < corpus/archive_tar/plain.tar > corpus/archive_tar/plain.tar.gz
# Extension headers and sparse files: the paths the header guard watches.
long=$(printf 'd%.0s' $(seq 1 200))
mkdir -p "$work/l/$long" && printf 'y' > "$work/l/$long/f"
tar -C "$work/l" --format=gnu -cf corpus/archive_tar/gnu-longname.tar .
tar -C "$work/l" --format=pax -cf corpus/archive_tar/pax-longname.tar .
mkdir -p "$work/s" && truncate -s 64K "$work/s/sparse" && printf 'z' >> "$work/s/sparse"
tar -C "$work/s" --sparse --format=pax -cf corpus/archive_tar/pax-sparse.tar .
tar -C "$work/s" --sparse --format=gnu -cf corpus/archive_tar/gnu-sparse.tar .
tar -xzf "$fixtures/nvidia-535.261.03/nvidia-open-modules-535.261.03-6.1.0-56-amd64-x86_64.tar.gz" -C "$work" \
  lib/modules/6.1.0-56-amd64/kernel/drivers/gpu/nvidia-peermem.ko
cp "$work/lib/modules/6.1.0-56-amd64/kernel/drivers/gpu/nvidia-peermem.ko" corpus/modinfo/peermem.ko
cp ../versions/registry.toml corpus/registry/registry.toml
