#!/usr/bin/env python3
"""Check run C's console log: what each `gpu-passthrough` command inside the guest printed.

  check-host.py CONSOLE_LOG OUT_DIR
The guest's /init (host-guest-init.sh) frames every command as
`E2E-C begin L` stdout `E2E-C stderr L` stderr `E2E-C end L` `E2E-C rc L N`. This writes
OUT_DIR/run-c-L.out and .err and prints `PASS <what>` / `FAIL <what>: <why>` lines.
"""
import json
import os
import re
import sys

log_path, out_dir = sys.argv[1], sys.argv[2]
lines = []
for raw in open(log_path, encoding="utf-8", errors="replace"):
    # strip the harness's timestamp column
    lines.append(raw.rstrip("\n").split(" ", 1)[1] if " " in raw else raw.rstrip("\n"))

out, err, rc, facts = {}, {}, {}, {}
cur, part = None, None
for line in lines:
    m = re.search(r"E2E-C (begin|stderr|end) (\S+)$", line)
    if m:
        kind, label = m.groups()
        cur, part = (label, "out") if kind == "begin" else (label, "err") if kind == "stderr" else (None, None)
        continue
    m = re.search(r"E2E-C rc (\S+) (\d+)", line)
    if m:
        rc[m.group(1)] = int(m.group(2))
        continue
    m = re.search(r"E2E-C (devices|boot_vga|kvm|crash_left_driver) (.*)$", line)
    if m:
        facts[m.group(1)] = m.group(2).strip()
    if cur:
        (out if part == "out" else err).setdefault(cur, []).append(line)

for label in set(out) | set(err):
    with open(os.path.join(out_dir, f"run-c-{label}.out"), "w") as f:
        f.write("\n".join(out.get(label, [])) + "\n")
    with open(os.path.join(out_dir, f"run-c-{label}.err"), "w") as f:
        f.write("\n".join(err.get(label, [])) + "\n")

devs = dict(kv.split("=", 1) for kv in facts.get("devices", "").split() if "=" in kv)
vga, nic = devs.get("vga", "?"), devs.get("nic", "?")


def text(label):
    return "\n".join(out.get(label, []))


def etext(label):
    return "\n".join(err.get(label, []))


def as_json(label):
    try:
        return json.loads(text(label))
    except ValueError:
        return None


def check(what, ok, why=""):
    why = " ".join(str(why).split())[:400]
    print(f"PASS {what}" if ok else f"FAIL {what}: {why}")


def rc_is(label, want=0):
    got = rc.get(label)
    check(f"gpu-passthrough {label} exits {want}", got == want,
          f"exit {got}; stderr: {etext(label)[-300:]!r}")


# doctor: the IOMMU and VFIO checks pass in this guest; with a nested /dev/kvm the verdict too.
doc = as_json("doctor")
check("doctor --json is JSON", doc is not None, text("doctor")[:200])
if doc is not None:
    checks = {c.get("name"): str(c.get("status", "")).lower() for c in doc.get("checks", [])}
    check("doctor: iommu OK", checks.get("iommu") == "ok", f"checks: {checks}")
    vfio = {k: v for k, v in checks.items() if k and k.startswith("vfio")}
    check("doctor: every vfio check OK", vfio and all(v == "ok" for v in vfio.values()), f"vfio checks: {vfio}")
    print(f"INFO doctor checks: {checks}")
if facts.get("kvm") == "present":
    rc_is("doctor", 0)
else:
    check("doctor exits 5 (not ready) without /dev/kvm", rc.get("doctor") == 5, f"exit {rc.get('doctor')}")

rc_is("devices")


def by_address(label):
    doc = as_json(label)
    return {e.get("address"): e for e in doc} if isinstance(doc, list) else {}


cands = by_address("devices")
v = cands.get(vga, {})
check("devices: the VGA device is a candidate, on bochs-drm, in its own IOMMU group, boot_vga",
      v.get("driver") == "bochs-drm" and v.get("iommu_group") is not None and v.get("boot_vga") is True
      and v.get("kind") == "display", json.dumps(v)[:300])
check("devices: the NIC is not offered as a GPU candidate", nic not in cands, list(cands))
rc_is("devices-all")
every = by_address("devices-all")
check("devices --all: the NIC on e1000e and edu with no driver",
      every.get(nic, {}).get("driver") == "e1000e" and devs.get("edu") in every
      and every.get(devs.get("edu"), {}).get("driver") is None, list(every))

if facts.get("boot_vga") == "1":
    check("plan refuses the boot VGA device without --allow-boot-vga",
          rc.get("plan-boot-vga", 0) != 0 and "boot" in (etext("plan-boot-vga") + text("plan-boot-vga")).lower(),
          f"exit {rc.get('plan-boot-vga')}: {etext('plan-boot-vga')[-300:]!r}")
rc_is("plan")
check("plan lists the sysfs writes for both devices",
      vga in text("plan") and nic in text("plan") and "driver_override" in text("plan"), text("plan")[:300])

rc_is("attach")
a = text("attach")
check("attach: VFIO verification passed and the boot spec was printed (JSON)", as_json("attach") is not None, a[:300])
check(f"attach: boot spec has -device vfio-pci,host={vga} and host={nic}",
      f"vfio-pci,host={vga}" in a and f"vfio-pci,host={nic}" in a, a[:400])
check("attach: boot spec has HAS_GPU=1 and /dev/vfio/N", "HAS_GPU=1" in a and "/dev/vfio/" in a, a[:400])
check("attach of a device owned by vm-1 is refused naming vm-1",
      rc.get("attach-again", 0) != 0 and "vm-1" in etext("attach-again") + text("attach-again"),
      f"exit {rc.get('attach-again')}: {etext('attach-again')[-300:]!r}")
rc_is("detach")
check("attach with failpoint after-unbind aborted", rc.get("crash", 0) != 0, f"exit {rc.get('crash')}")
check("the crash left the VGA device without its driver (so reconcile has work)",
      facts.get("crash_left_driver") != "bochs-drm", f"driver after crash: {facts.get('crash_left_driver')}")
rc_is("reconcile")
rc_is("reconcile-again")
rc_is("attach-after-reconcile")
rc_is("detach-after-reconcile")

# ---- health between tenants: reset and verification at detach, quarantine and placement
disp2 = devs.get("disp2", "?")
det = as_json("detach") or {}
restored = {r.get("device"): r for r in det.get("restored", [])} if isinstance(det, dict) else {}
methods = {m.group(1): m.group(2).split() for m in
           (re.search(r"E2E-C reset_method (\S+) (.*)$", l) for l in lines) if m}
nv = as_json("detach-nvme") or {}
restored.update({r.get("device"): r for r in nv.get("restored", [])} if isinstance(nv, dict) else {})
for name, addr in (("NIC", nic), ("VGA", vga), ("NVMe", devs.get("nvme", "?"))):
    h = (restored.get(addr) or {}).get("health") or {}
    r, v = h.get("reset") or {}, h.get("verify") or {}
    print(f"INFO detach {name} {addr}: reset {r.get('outcome')} method={r.get('method')} "
          f"offered={r.get('methods')} {r.get('ms')} ms; verify ok={v.get('ok')} "
          f"id={v.get('vendor_id')}:{v.get('device_id')} driver={v.get('driver')} {v.get('ms')} ms "
          f"problems={v.get('problems')}")
    if r.get("ms") is not None:
        print(f"FIGURE run C detach {name}: reset {r.get('method') or r.get('outcome')} (ms)|{r.get('ms')}")
    if v.get("ms") is not None:
        print(f"FIGURE run C detach {name}: verify (ms)|{v.get('ms')}")
nh = (restored.get(nic) or {}).get("health") or {}
nr = nh.get("reset") or {}
# QEMU 7.2's e1000e has no FLR capability: the kernel offers it `pm` only.
check(f"detach: the NIC was reset by the kernel with the first method it offers ({methods.get('nic')}) and verified",
      nr.get("outcome") == "done" and [nr.get("method")] == methods.get("nic", [])[:1]
      and (nh.get("verify") or {}).get("ok") is True, f"health: {json.dumps(nh)[:400]}")
rc_is("attach-nvme")
rc_is("detach-nvme")
mh = (restored.get(devs.get("nvme")) or {}).get("health") or {}
check("detach: the NVMe controller was reset with FLR and verified",
      (mh.get("reset") or {}).get("method") == "flr" and (mh.get("reset") or {}).get("outcome") == "done"
      and (mh.get("verify") or {}).get("ok") is True,
      f"reset_method in the guest: {methods.get('nvme')}; health: {json.dumps(mh)[:400]}")
vh = (restored.get(vga) or {}).get("health") or {}
check("detach: the VGA device (no reset method) verified without a reset",
      (vh.get("reset") or {}).get("outcome") == "no_method" and (vh.get("verify") or {}).get("ok") is True,
      f"reset_method in the guest: {methods.get('vga')}; health: {json.dumps(vh)[:400]}")

scan = as_json("health-scan")
check("health scan: 3 faults (Xid 13 none, Xid 79 reset_gpu counted once with its GPU-XID line, D3cold)",
      isinstance(scan, list) and [(f.get("kind"), f.get("xid"), f.get("action")) for f in scan]
      == [("xid", 13, "none"), ("xid", 79, "reset_gpu"), ("power_state", None, "reset_gpu")],
      text("health-scan")[:400])
for f in scan if isinstance(scan, list) else []:
    print(f"INFO health scan: {f.get('address')}  {f.get('kind')} {f.get('xid') or ''}  action {f.get('action')}  {f.get('message')}")
i1, i3 = as_json("ingest-vm-1") or {}, as_json("ingest-vm-3") or {}
check("health ingest vm-1: the guest-address faults recorded against the VGA device, not yet quarantined",
      {e.get("device") for e in i1.get("recorded", [])} == {vga} and len(i1.get("recorded", [])) == 2
      and not i1.get("quarantined"), text("ingest-vm-1")[:400])
check("health ingest vm-3 (second owner): the VGA device quarantined",
      [q.get("device") for q in i3.get("quarantined", [])] == [vga], text("ingest-vm-3")[:400])
rec = {d.get("device"): d for d in (as_json("health") or [])}
check("health --json: the VGA device quarantined by vm-1 and vm-3",
      ((rec.get(vga) or {}).get("quarantine") or {}).get("owners") == ["vm-1", "vm-3"], text("health")[:400])
dq = by_address("devices-quarantined").get(vga, {})
check("devices: the VGA device not ready, quarantined",
      dq.get("ready") is False and any("quarantined" in r for r in dq.get("not_ready_because", [])), json.dumps(dq)[:300])
aq = etext("attach-quarantined") + text("attach-quarantined")
check("attach of the quarantined VGA refused (exit 4) naming the events",
      rc.get("attach-quarantined") == 4 and "quarantined" in aq and "vm-1: xid 79" in aq and "vm-3" in aq, aq[-400:])
before = as_json("plan-gpus-before") or {}
check("plan --gpus 1 before the quarantine picks the VGA device", before.get("requested") == [vga],
      text("plan-gpus-before")[:300])
rc_is("attach-gpus")
ag = as_json("attach-gpus") or {}
check(f"attach --gpus 1 after the quarantine picks the other display {disp2}",
      [d.get("address") for d in ag.get("devices", [])] == [disp2], text("attach-gpus")[:300])
rc_is("detach-gpus")
check("health clear lifts the quarantine", (as_json("health-clear") or {}).get("was_quarantined") is True,
      text("health-clear")[:300])
