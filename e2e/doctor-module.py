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
An appended module signature is removed: after the edit it would be invalid, and the kernel
rejects a bad signature (EKEYREJECTED) even when it accepts unsigned modules.
"""
import struct
import sys

SIG_MARKER = b"~Module signature appended~\n"


def strip_signature(data):
    """Drop an appended signature: content | signature | struct module_signature (12 bytes,
    big-endian sig_len last) | marker."""
    if not data.endswith(SIG_MARKER):
        return data
    info_end = len(data) - len(SIG_MARKER)
    sig_len, = struct.unpack_from(">I", data, info_end - 4)
    return data[:info_end - 12 - sig_len]


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
    data = bytearray(strip_signature(open(path, "rb").read()))
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
