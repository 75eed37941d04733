#!/usr/bin/env python3
"""Make a copy of a kernel module look built for another kernel release, in place.

  doctor-module.py MODULE.ko OLD_RELEASE NEW_RELEASE

Two same-length byte edits, so no ELF offset moves:
- the release in `vermagic=` (what our builder checks against the registry's kernel_version);
- the CRC of `module_layout` in `__versions` (what the kernel checks: with CONFIG_MODVERSIONS it
  ignores the release word of vermagic and compares symbol CRCs instead, so a release edit alone
  still loads). A module really built for another kernel ABI differs in exactly these ways.
"""
import struct
import sys


def main():
    if len(sys.argv) != 4:
        raise SystemExit(__doc__)
    path, old, new = sys.argv[1], sys.argv[2].encode(), sys.argv[3].encode()
    if len(old) != len(new):
        raise SystemExit("doctor-module.py: releases must have the same length")
    data = bytearray(open(path, "rb").read())
    magic = b"vermagic=" + old + b" "
    if data.count(magic) != 1:
        raise SystemExit(f"doctor-module.py: {path}: expected one '{magic.decode()}'")
    at = data.find(magic)
    data[at:at + len(magic)] = b"vermagic=" + new + b" "
    # __versions entries are {unsigned long crc; char name[56]}: the name follows its CRC.
    name = b"module_layout\0"
    at = data.find(name)
    if at < 8:
        raise SystemExit(f"doctor-module.py: {path}: no module_layout entry in __versions")
    crc, = struct.unpack_from("<Q", data, at - 8)
    struct.pack_into("<Q", data, at - 8, crc ^ 0xFFFFFFFF)
    open(path, "wb").write(bytes(data))


main()
