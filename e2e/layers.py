#!/usr/bin/env python3
"""Helpers over `initrd build --json` output and initrd files, for e2e/run.

  layers.py BUILD_JSON     print the base, gpu and combined layer paths on one line
  layers.py --list FILE    list the entries of one (possibly compressed) cpio layer, using the
                           system decompressors and GNU cpio: an oracle independent of our code
"""
import json
import subprocess
import sys

DECOMPRESSORS = [
    (b"\x28\xb5\x2f\xfd", ["zstd", "-dc"]),
    (b"\x1f\x8b", ["gzip", "-dc"]),
    (b"\x02\x21\x4c\x18", ["lz4", "-dc"]),
    (b"\xfd7zXZ\x00", ["xz", "-dc"]),
]


def layer_path(doc, name):
    """Find the path of layer `name` wherever the JSON keeps it (top level or under "layers")."""
    for holder in (doc, doc.get("layers", {})):
        if isinstance(holder, list):
            for item in holder:
                if item.get("name") == name or item.get("kind") == name:
                    return item["path"]
        elif isinstance(holder, dict) and name in holder:
            v = holder[name]
            return v if isinstance(v, str) else v["path"]
    raise SystemExit(f"layers.py: no '{name}' layer path in the build output: {json.dumps(doc)[:400]}")


def list_entries(path):
    with open(path, "rb") as f:
        head = f.read(6)
    cmd = next((c for m, c in DECOMPRESSORS if head.startswith(m)), None)
    with open(path, "rb") as f:
        if cmd:
            dec = subprocess.Popen(cmd, stdin=f, stdout=subprocess.PIPE)
            out = subprocess.run(["cpio", "-t", "--quiet"], stdin=dec.stdout, capture_output=True, check=True)
            dec.wait()
        else:
            out = subprocess.run(["cpio", "-t", "--quiet"], stdin=f, capture_output=True, check=True)
    print(out.stdout.decode(), end="")


if len(sys.argv) == 3 and sys.argv[1] == "--list":
    list_entries(sys.argv[2])
elif len(sys.argv) == 2:
    with open(sys.argv[1]) as f:
        doc = json.load(f)
    print(" ".join(layer_path(doc, n) for n in ("base", "gpu", "combined")))
else:
    raise SystemExit(__doc__)
