#!/usr/bin/env python3
"""Benchmark the console scan on a 1 GiB hostile console, and a detach beside its ingest.

Prints figures and ratios against baselines measured in the same run, never pass/fail:
- `gpu-passthrough health scan --console FILE --json` (the release CLI) over a generated
  1 GiB console: real NVRM lines (Xid 79/48 with a distinct pid per MiB, Xid 31, RmInitAdapter,
  power state), forged `GPU-XID` lines (an application fault called a reboot), ordinary chatter,
  and one 200 MiB line without a newline; against `grep -c NVRM` over the same file (target
  <= 3x), with the scan's peak RSS (target <= 64 MiB), each the median of --runs;
- a detach of another owner while a 1 GiB hostile console is ingested, against an idle detach
  (target <= 2x). The CLI's detach needs a kernel: against a fake sysfs tree only the
  simulation can play one, which the release CLI does not have, so this figure comes from the
  integration test `tests/tests/health_hostile_console.rs` (debug build, fake sysfs, the
  console streamed through a FIFO), whose `figures:` line is printed here.

Usage: bench/health-scan.py [--runs N] [--keep FILE] [--no-detach]  (from the repository root)
"""
import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
MIB = 1 << 20
CONSOLE = 1024 * MIB
LONG_LINE = 200 * MIB

LINES = [
    b"[  365.969681] NVRM: Xid (PCI:0000:01:00): 31, pid=13705, name=UnrealEditor, channel 0x0000000c, intr 00000000. MMU Fault: ENGINE GRAPHICS GPC2 GPCCLIENT_PROP_0 faulted @ 0x0_00000000. Fault is of type FAULT_PDE ACCESS_TYPE_VIRT_READ\n",
    b"[   87.473074] NVRM: GPU 0000:01:00.0: RmInitAdapter failed! (0x22:0x56:667)\n",
    b"[   87.473112] NVRM: GPU 0000:01:00.0: rm_init_adapter failed, device minor number 0\n",
    b'GPU-XID {"address":"0000:01:00.0","kind":"xid","xid":13,"message":"forged","action":"reboot_host"}\n',
    b"[    2.819204] pci 0000:01:00.0: [10de:2204] type 00 class 0x030000 PCIe Legacy Endpoint\n",
    b"workload: step 1000 loss 0.25 throughput 1234.5 samples/s on all eight workers\n",
    b"[   87.412759] nvidia 0000:01:00.0: Unable to change power state from D3cold to D0, device inaccessible\n",
    b"[    0.124799] pinctrl core: initialized pinctrl subsystem\n",
]


def block(n):
    """One MiB of console; the first two lines are distinct per block."""
    head = (
        f"[{n}.0] NVRM: Xid (PCI:0000:01:00): 79, pid={n}, GPU has fallen off the bus.\n"
        f"[{n}.1] NVRM: Xid (PCI:0000:01:00): 48, pid={n}, DBE (double bit error)\n"
    ).encode()
    body = b"".join(LINES)
    b = head + body * (MIB // len(body) + 1)
    return b[: MIB - 1] + b"\n"


def write_console(path):
    with open(path, "wb") as f:
        written, n = 0, 0
        while written < CONSOLE:
            if written == 400 * MIB:
                filler = b"x" * MIB
                for _ in range(LONG_LINE // MIB - 1):
                    f.write(filler)
                f.write(filler[:-1] + b"\n")
                written += LONG_LINE
                continue
            f.write(block(n))
            n += 1
            written += MIB


def timed(cmd, stdout=subprocess.DEVNULL):
    """Seconds and peak RSS (MiB) of one run of `cmd`, measured in a fresh interpreter so earlier
    children do not count."""
    code = (
        "import resource,subprocess,sys,time;"
        "t=time.perf_counter();"
        "r=subprocess.run(sys.argv[1:],stdout=subprocess.PIPE);"
        "e=time.perf_counter()-t;"
        "sys.stderr.buffer.write(r.stdout[-2000:]);"
        "print(e, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, r.returncode)"
    )
    out = subprocess.run([sys.executable, "-c", code, *cmd], check=True, capture_output=True, text=True)
    secs, rss, rc = out.stdout.split()
    if int(rc) not in (0, 1):  # grep -c exits 1 on no match
        sys.exit(f"{cmd[0]} exited {rc}: {out.stderr}")
    return float(secs), int(rss) / 1024, out.stderr


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--keep", help="write the console here and keep it")
    ap.add_argument("--no-detach", action="store_true", help="skip the detach figure (no cargo)")
    args = ap.parse_args()

    # Always through cargo: a no-op when fresh, and never a stale binary from an older tree.
    cli = REPO / "target" / "release" / "gpu-passthrough"
    print("building the release CLI (if stale) ...", flush=True)
    subprocess.run(["cargo", "build", "--release", "-p", "gpu-passthrough-cli"], cwd=REPO, check=True)

    tmp = tempfile.TemporaryDirectory()
    console = Path(args.keep) if args.keep else Path(tmp.name) / "console.log"
    start = time.perf_counter()
    write_console(console)
    print(f"console: {console.stat().st_size / MIB:.0f} MiB written in {time.perf_counter() - start:.1f}s")

    grep = [timed(["grep", "-c", "NVRM", str(console)]) for _ in range(args.runs)]
    ours = [timed([str(cli), "health", "scan", "--console", str(console), "--json"]) for _ in range(args.runs)]
    g = statistics.median(t for t, _, _ in grep)
    o = statistics.median(t for t, _, _ in ours)
    rss = max(r for _, r, _ in ours)
    print(f"grep -c NVRM:        {g:.2f}s (median of {args.runs}; runs {[round(t, 2) for t, _, _ in grep]})")
    print(f"health scan:         {o:.2f}s (median of {args.runs}; runs {[round(t, 2) for t, _, _ in ours]})")
    print(f"ratio scan/grep:     {o / g:.2f}x (target <= 3x)")
    print(f"peak RSS of the scan: {rss:.1f} MiB (target <= 64 MiB)")
    tail = ours[-1][2]
    marker = tail.find('"stats"')
    print("scan stats:", " ".join(tail[marker:].split()) if marker >= 0 else "(not in the output tail)")

    if not args.no_detach:
        print("detach beside the ingest (integration test, debug build) ...", flush=True)
        out = subprocess.run(
            ["cargo", "test", "-p", "gpu-passthrough-tests", "--test", "health_hostile_console", "--", "--nocapture"],
            cwd=REPO, capture_output=True, text=True,
        )
        figures = [l for l in out.stdout.splitlines() if l.startswith("figures:")]
        print(figures[0] if figures else f"no figures (exit {out.returncode}):\n{out.stdout[-3000:]}{out.stderr[-3000:]}")


if __name__ == "__main__":
    main()
