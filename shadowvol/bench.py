"""Benchmarks, measured side by side in one run (never timed assertions in tests).

- ``bench reads``: read latency of 4, 64 and 4096 bytes at physical and kernel
  virtual addresses, shadow vs libvmi (the paper's table: ShadowMonitor
  0.357 µs, LibVMI 17.3 µs for 4 bytes).
- ``bench pslist``: end-to-end ``shadowvol -vm NAME linux.pslist`` against
  stock ``vol -f <raw dump of the same guest> linux.pslist`` with the same ISF,
  warm, and the libvmi backend.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

SIZES = (4, 64, 4096)


def _median_us(fn, addrs: list[int], size: int, repeat: int) -> float:
    samples = []
    clock = time.perf_counter_ns
    for i in range(repeat):
        a = addrs[i % len(addrs)]
        t0 = clock()
        fn(a, size)
        samples.append(clock() - t0)
    return statistics.median(samples) / 1000.0


def bench_reads(vm: str, repeat_shadow: int = 20000, repeat_libvmi: int = 300) -> list[dict[str, Any]]:
    """Median read latency per backend, address kind and size."""
    from .target import open_target

    rows = []
    for backend, repeat in (("shadow", repeat_shadow), ("libvmi", repeat_libvmi)):
        t = open_target(vm=vm, backend=backend)
        try:
            sym = t.isf["symbols"]
            # Kernel data the analyst reads most: task structs and their neighbours.
            base_va = sym["init_task"]["address"] + t.location.virt_shift
            vaddrs = [base_va + 64 * i for i in range(64)]
            paddrs = [t.kernel.translate(v)[0] for v in vaddrs]
            for a in vaddrs:  # warm the epoch's translation cache, as a plugin run would
                t.kernel.read(a, 8)
            for size in SIZES:
                rows.append({"backend": backend, "address_kind": "physical", "size": size,
                             "median_us": round(_median_us(t.memory.read, paddrs, size, repeat), 3)})
                rows.append({"backend": backend, "address_kind": "kernel_virtual", "size": size,
                             "median_us": round(_median_us(t.kernel.read, vaddrs, size, repeat), 3)})
        finally:
            t.close()
    return rows


def _time_cmd(cmd: list[str], runs: int) -> tuple[float, str]:
    times = []
    out = ""
    for _ in range(runs):
        t0 = time.perf_counter()
        p = subprocess.run(cmd, capture_output=True, text=True)
        times.append(time.perf_counter() - t0)
        if p.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd[:4])}... failed: {(p.stderr or p.stdout)[-300:]}")
        out = p.stdout
    return statistics.median(times), out


def bench_pslist(vm: str, runs: int = 3) -> list[dict[str, Any]]:
    """End-to-end pslist: shadow and libvmi live vs stock vol on a raw dump, warm."""
    from .target import open_target
    from .vm.registry import get_vm

    entry = get_vm(vm)
    t = open_target(vm=vm)
    profile = t.profile_path
    t.close()
    me = [sys.executable, "-m", "shadowvol", "-vm", vm]
    rows = []
    _time_cmd(me + ["linux.pslist"], 1)  # warm: profile cache, kernel location
    for backend in ("shadow", "libvmi"):
        secs, out = _time_cmd(me + ["--backend", backend, "linux.pslist"], runs)
        rows.append({"tool": f"shadowvol --backend {backend} (live)", "median_s": round(secs, 3),
                     "processes": max(0, len(out.splitlines()) - 2)})
    vol = shutil.which("vol", path=os.path.dirname(sys.executable)) or shutil.which("vol")
    if vol:
        with tempfile.TemporaryDirectory(prefix="shadowvol-bench-", dir="/var/tmp") as tmp:
            dump = Path(tmp) / "web01.raw"
            # A consistent raw copy of guest RAM: pause, copy the shared file, resume.
            from .qmp import QMPClient

            with QMPClient(entry.qmp) as q:
                q.execute("stop")
                try:
                    shutil.copyfile(entry.ram_file, dump)
                finally:
                    q.execute("cont")
            symdir = Path(tmp) / "symbols" / "linux"
            symdir.mkdir(parents=True)
            if profile.name.endswith(".xz"):
                shutil.copy(profile, symdir / profile.name)
            else:
                shutil.copy(profile, symdir / (profile.name + ""))
            cmd = [vol, "-q", "-s", str(Path(tmp) / "symbols"), "-f", str(dump), "linux.pslist"]
            _time_cmd(cmd, 1)  # warm vol's own caches (banner and ISF caches)
            secs, out = _time_cmd(cmd, runs)
            rows.append({"tool": "stock vol -f raw dump", "median_s": round(secs, 3),
                         "processes": max(0, len(out.splitlines()) - 4)})
    base = next(r["median_s"] for r in rows if r["tool"].startswith("shadowvol --backend shadow"))
    for r in rows:
        r["ratio_vs_shadow"] = round(r["median_s"] / base, 2)
    return rows


def render(rows: list[dict[str, Any]], fmt: str) -> None:
    if fmt == "json":
        print(json.dumps(rows, indent=1))
        return
    cols = list(rows[0]) if rows else []
    widths = [max(len(str(c)), *(len(str(r[c])) for r in rows)) for c in cols]
    print("  ".join(str(c).ljust(w) for c, w in zip(cols, widths)))
    for r in rows:
        print("  ".join(str(r[c]).ljust(w) for c, w in zip(cols, widths)))


def summarize_reads(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """shadow/libvmi speed ratio per address kind and size."""
    out = []
    for kind in ("physical", "kernel_virtual"):
        for size in SIZES:
            s = next(r["median_us"] for r in rows if r["backend"] == "shadow" and r["address_kind"] == kind
                     and r["size"] == size)
            lv = next(r["median_us"] for r in rows if r["backend"] == "libvmi" and r["address_kind"] == kind
                      and r["size"] == size)
            out.append({"address_kind": kind, "size": size, "shadow_us": s, "libvmi_us": lv,
                        "speedup": round(lv / s, 1) if s else None})
    return out
