#!/usr/bin/env python3
"""Make a copy of a kernel module look built for another kernel release, in place.

  doctor-module.py [--release-only] MODULE.ko OLD_RELEASE NEW_RELEASE

Two same-length byte edits, so no ELF offset moves:
- the release in `vermagic=` (what our builder checks against the registry's kernel_version);
- the CRC of `module_layout` in `__versions` (what the kernel checks: with CONFIG_MODVERSIONS it
  ignores the release word of vermagic and compares symbol CRCs instead, so a release edit alone
  still loads). A module really built for another kernel ABI differs in exactly these ways.
With --release-only the CRC is kept: the module still loads, it only claims the other release
(used for the kernel modules of a fake release, so that only nvidia.ko is really incompatible).
"""
import struct
import sys


def main():
    args = sys.argv[1:]
    release_only = args[:1] == ["--release-only"]
    if release_only:
        args = args[1:]
    if len(args) != 3:
        raise SystemExit(__doc__)
    path, old, new = args[0], args[1].encode(), args[2].encode()
    if len(old) != len(new):
        raise SystemExit("doctor-module.py: releases must have the same length")
    data = bytearray(open(path, "rb").read())
    magic = b"vermagic=" + old + b" "
    if data.count(magic) != 1:
        raise SystemExit(f"doctor-module.py: {path}: expected one '{magic.decode()}'")
    at = data.find(magic)
    data[at:at + len(magic)] = b"vermagic=" + new + b" "
    if release_only:
        open(path, "wb").write(bytes(data))
        return
    # __versions entries are {unsigned long crc; char name[56]}: the name follows its CRC.
    name = b"module_layout\0"
    at = data.find(name)
    if at < 8:
        raise SystemExit(f"doctor-module.py: {path}: no module_layout entry in __versions")
    crc, = struct.unpack_from("<Q", data, at - 8)
    struct.pack_into("<Q", data, at - 8, crc ^ 0xFFFFFFFF)
    open(path, "wb").write(bytes(data))


main()
