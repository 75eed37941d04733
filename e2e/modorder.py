#!/usr/bin/env python3
"""Print the .ko files needed to load the named kernel modules, dependencies first.

Reads each module's `depends=` from its ELF `.modinfo` section (the fixture tar carries no
modules.dep), so the guest can `insmod` them in order without modprobe.
Usage: modorder.py MODULE_TREE NAME...   (names with `-` or `_`, as modprobe accepts them)
"""
import os
import struct
import sys


def canon(name):
    return name.replace("-", "_")


def modinfo(path):
    """Return the key=value pairs of the .modinfo section of an ELF64 little-endian .ko."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:4] != b"\x7fELF" or data[4] != 2:
        raise SystemExit(f"modorder: {path}: not an ELF64 kernel module")
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    sections = []
    for i in range(shnum):
        name, _type, _flags, _addr, off, size = struct.unpack_from(
            "<IIQQQQ", data, shoff + i * shentsize)
        sections.append((name, off, size))
    strtab_off = sections[shstrndx][1]
    for name, off, size in sections:
        end = data.index(b"\0", strtab_off + name)
        if data[strtab_off + name:end] == b".modinfo":
            pairs = []
            for item in data[off:off + size].split(b"\0"):
                if b"=" in item:
                    k, v = item.decode("utf-8", "replace").split("=", 1)
                    pairs.append((k, v))
            return pairs
    raise SystemExit(f"modorder: {path}: no .modinfo section")


def main():
    if len(sys.argv) < 3:
        raise SystemExit(__doc__)
    tree, wanted = sys.argv[1], sys.argv[2:]
    files = {}
    for root, _dirs, names in os.walk(tree):
        for n in names:
            if n.endswith(".ko"):
                files[canon(n[:-3])] = os.path.join(root, n)
    order, state = [], {}

    def visit(name, chain):
        name = canon(name)
        if state.get(name) == "done":
            return
        if state.get(name) == "visiting":
            raise SystemExit(f"modorder: dependency cycle: {' -> '.join(chain + [name])}")
        if name not in files:
            raise SystemExit(
                f"modorder: module {name} (needed by {' -> '.join(chain) or 'command line'}) "
                f"is not in {tree}; add it to the kernel-modules artifact")
        state[name] = "visiting"
        for k, v in modinfo(files[name]):
            if k == "depends":
                for dep in filter(None, v.split(",")):
                    visit(dep, chain + [name])
        state[name] = "done"
        order.append(files[name])

    for w in wanted:
        visit(w, [])
    print("\n".join(order))


main()
