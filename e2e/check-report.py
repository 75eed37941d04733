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
    check("nvidia.ko accepted by the kernel, failed with no_gpu (ENODEV)",
          nv.get("status") == "failed" and nv.get("class") == "no_gpu", f"got {json.dumps(nv)}")
    for dep in ("nvidia_uvm", "nvidia_modeset", "nvidia_drm"):
        m = mods.get(dep, {})
        check(f"{dep} skipped because nvidia failed",
              m.get("status") == "skipped" and "nvidia" in json.dumps(m), f"got {json.dumps(m)}")
    fw = json.dumps(rep.get("firmware", nv.get("firmware", "")))
    check("GSP firmware present", "missing" not in fw.lower() and "gsp" in (fw + json.dumps(rep)).lower(),
          f"firmware: {fw}")
    libs = rep.get("libraries", {})
    text = json.dumps(libs)
    check("driver libraries injected (libcuda.so." + driver + ")", f"libcuda.so.{driver}" in text or "libcuda.so.1" in text,
          f"libraries: {text[:300]}")


def expect_wrong_kernel(rep, driver):
    nv = modules(rep).get("nvidia", {})
    check("nvidia.ko classified wrong_kernel (ENOEXEC/EINVAL)",
          nv.get("status") == "failed" and nv.get("class") == "wrong_kernel", f"got {json.dumps(nv)}")


def expect_skipped(rep, driver):
    check("report says GPU setup skipped", rep.get("status") == "skipped" and not any(
        m.get("status") == "loaded" for m in rep.get("modules", [])), f"got {json.dumps(rep)[:300]}")


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
