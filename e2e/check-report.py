#!/usr/bin/env python3
"""Check a `GPU-INIT {json}` report from a guest against what a scenario must show.

  check-report.py SCENARIO REPORT_JSON DRIVER_VERSION
Scenarios: expect-no-gpu (run A), expect-wrong-kernel (run A'), expect-skipped (run B).
Prints one line per assertion, `PASS <what>` or `FAIL <what>: <why>`; e2e/run counts them.
Field names follow the report contract in initrd/README.md.
"""
import json
import sys

results = []


def check(what, ok, why=""):
    results.append(f"PASS {what}" if ok else f"FAIL {what}: {why}")


def modules(rep):
    return {m.get("name", "").replace("-", "_"): m for m in rep.get("modules", [])}


def expect_no_gpu(rep, driver):
    mods = modules(rep)
    nv = mods.get("nvidia", {})
    check("report driver_version is " + driver, rep.get("driver_version") == driver,
          f"got {rep.get('driver_version')!r}")
    check("report kernel is the running 6.1.0-56-amd64", rep.get("kernel") == "6.1.0-56-amd64",
          f"got {rep.get('kernel')!r}")
    check("nvidia.ko passed the kernel's version checks and failed with ENODEV, class no_gpu",
          nv.get("result") == "failed" and nv.get("class") == "no_gpu" and nv.get("errno") == 19,
          f"got {json.dumps(nv)}")
    for dep in ("nvidia_uvm", "nvidia_modeset", "nvidia_drm"):
        m = mods.get(dep, {})
        check(f"{dep} skipped because nvidia failed (class no_gpu)",
              m.get("result") == "skipped" and m.get("class") == "no_gpu" and m.get("dependency"),
              f"got {json.dumps(m)}")
    kernel_deps = [m for n, m in mods.items() if not n.startswith("nvidia")]
    check("the kernel modules nvidia needs (drm, ...) loaded",
          kernel_deps and all(m.get("result") in ("loaded", "already_loaded") for m in kernel_deps),
          f"got {json.dumps(kernel_deps)}")
    fw = rep.get("firmware", {})
    check("GSP firmware found (none missing, search path set)", fw.get("missing") == [] and fw.get("path"),
          f"firmware: {json.dumps(fw)}")
    libs = rep.get("libraries", {})
    injected = " ".join(libs.get("injected", []))
    check("driver libraries injected (libcuda.so.1, libnvidia-ml.so.1)",
          "libcuda.so.1" in injected and "libnvidia-ml.so.1" in injected, f"libraries: {json.dumps(libs)[:400]}")
    check("the workload root's ldconfig ran", libs.get("ldconfig") == "ok", f"libraries: {json.dumps(libs)[:400]}")
    check("nvidia-smi put on the workload's PATH", any(b.endswith("/nvidia-smi") for b in rep.get("binaries", [])),
          f"binaries: {rep.get('binaries')}")
    check("zero GPUs seen and overall status failed", rep.get("gpus") == 0 and rep.get("status") == "failed",
          f"gpus={rep.get('gpus')} status={rep.get('status')}")


def expect_wrong_kernel(rep, driver):
    nv = modules(rep).get("nvidia", {})
    check("nvidia.ko classified wrong_kernel (ENOEXEC/EINVAL)",
          nv.get("result") == "failed" and nv.get("class") == "wrong_kernel" and nv.get("errno") in (8, 22),
          f"got {json.dumps(nv)}")
    check("the message names the module's kernel 6.1.0-99-amd64",
          "6.1.0-99-amd64" in (nv.get("message") or ""), f"message: {nv.get('message')!r}")


def expect_skipped(rep, driver):
    check("report says GPU setup skipped, nothing loaded", rep.get("status") == "skipped" and not rep.get("modules")
          and not rep.get("nodes") and not rep.get("libraries", {}).get("injected"),
          f"got {json.dumps(rep)[:400]}")


def main():
    if len(sys.argv) != 4:
        raise SystemExit(__doc__)
    scenario, path, driver = sys.argv[1:]
    try:
        with open(path) as f:
            rep = json.load(f)
    except (OSError, ValueError) as e:
        print(f"FAIL report is valid JSON: {e}")
        return
    {"expect-no-gpu": expect_no_gpu, "expect-wrong-kernel": expect_wrong_kernel,
     "expect-skipped": expect_skipped}[scenario](rep, driver)
    print("\n".join(results))


main()
