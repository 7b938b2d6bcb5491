"""Benchmarks, measured side by side in one run (never timed assertions in tests).

- ``bench reads``: read latency of 4, 64 and 4096 bytes at physical and kernel
  virtual addresses, shadow vs libvmi (the paper's table: ShadowMonitor
  0.357 µs, LibVMI 17.3 µs for 4 bytes).
- ``bench pslist``: end-to-end ``shadowvol -vm NAME linux.pslist`` against
  stock ``vol -f <raw dump of the same guest> linux.pslist`` with the same ISF,
  warm, and the libvmi backend.
- ``bench watch``, ``bench diff``, ``bench profile-load`` (issue 13): a watch
  tick against a new context per tick and the whole command; ``diff`` of two
  snapshots; loading a profile in a new process.
- ``bench scale`` (issue 12): stock pslist/psaux and psxview live at growing
  task counts, beside stock ``vol -f`` and drgn; ``bench floor``: what the
  stock pslist code costs per task with member access at no cost.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ShadowvolError
from .safeio import atomic_copy, atomic_write

SIZES = (4, 64, 4096)

#: What a ``bench reads`` row measures, by the backend's metadata name.
READS_THROUGH = {
    "shadow-file": "mmap of the guest RAM file (VM running)",
    "shadow-process": "/proc/PID/mem of the QEMU process (VM running)",
    "libvmi-gdbstub": "gdbstub 'm' packets in physical mode, as LibVMI's KVM driver without KVMi (VM halted)",
    "libvmi-qmp": "QMP human-monitor-command xp (VM running)",
}


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
    """Median read latency per backend, address kind and size; ``reads_through`` says what each
    backend's read is (the libvmi rows are QEMU's gdbstub, not the LibVMI library)."""
    from .target import open_target

    rows = []
    for backend, repeat in (("shadow", repeat_shadow), ("libvmi", repeat_libvmi)):
        t = open_target(vm=vm, backend=backend)
        try:
            # Kernel data the analyst reads most: task structs and their neighbours.
            base_va = t.symbol_address("init_task")
            vaddrs = [base_va + 64 * i for i in range(64)]
            paddrs = [t.kernel.translate(v)[0] for v in vaddrs]
            for a in vaddrs:  # warm the epoch's translation cache, as a plugin run would
                t.kernel.read(a, 8)
            kind = str(t.memory.metadata().get("backend", backend))
            through = READS_THROUGH.get(kind, kind)
            for size in SIZES:
                rows.append({"backend": backend, "address_kind": "physical", "size": size,
                             "median_us": round(_median_us(t.memory.read, paddrs, size, repeat), 3),
                             "reads_through": through})
                rows.append({"backend": backend, "address_kind": "kernel_virtual", "size": size,
                             "median_us": round(_median_us(t.kernel.read, vaddrs, size, repeat), 3),
                             "reads_through": through})
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
    from . import fidelity
    from .target import open_target, vm_paused

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
            dump = Path(tmp) / "guest.raw"
            t = open_target(vm=vm)
            try:
                if t.endpoints.qmp is None:
                    raise ShadowvolError(f"{t.description} has no QMP socket: cannot pause it for a "
                                         "consistent copy")
                with vm_paused(vm):  # a consistent raw copy of guest RAM
                    fidelity.raw_copy(t.memory, dump)
                profile = t.profile_path
            finally:
                t.close()
            symdir = Path(tmp) / "symbols" / "linux"
            symdir.mkdir(parents=True)
            atomic_copy(profile, symdir / profile.name, mode=0o600)
            cmd = [vol, "-q", "-s", str(Path(tmp) / "symbols"), "-f", str(dump), "linux.pslist"]
            _time_cmd(cmd, 1)  # warm vol's own caches (banner and ISF caches)
            secs, out = _time_cmd(cmd, runs)
            rows.append({"tool": "stock vol -f raw dump", "median_s": round(secs, 3),
                         "processes": max(0, len(out.splitlines()) - 4)})
    base = next(r["median_s"] for r in rows if r["tool"].startswith("shadowvol --backend shadow"))
    for r in rows:
        r["ratio_vs_shadow"] = round(r["median_s"] / base, 2)
    return rows


def bench_libvirt(vm: str, domain: str, runs: int = 5, connect: str | None = None) -> list[dict[str, Any]]:
    """``-vm libvirt:DOMAIN linux.pslist`` against ``-vm VM linux.pslist`` (one of ours), per
    backend, runs interleaved so both see the same host load; warm (profile, kernel location)."""
    base = [sys.executable, "-m", "shadowvol"]
    sides = {"ours": ["-vm", vm], "libvirt": ["-vm", f"libvirt:{domain}", *(["--connect", connect] if connect else [])]}
    rows = []
    for backend in ("shadow", "libvmi"):
        times: dict[str, list[float]] = {k: [] for k in sides}
        procs: dict[str, int] = {}
        for side, spec in sides.items():
            _time_cmd(base + spec + ["--backend", backend, "linux.pslist"], 1)  # warm
        for _ in range(runs):
            for side, spec in sides.items():
                secs, out = _time_cmd(base + spec + ["--backend", backend, "linux.pslist"], 1)
                times[side].append(secs)
                procs[side] = max(0, len(out.splitlines()) - 2)
        ours, theirs = statistics.median(times["ours"]), statistics.median(times["libvirt"])
        rows.append({"backend": backend, "ours_s": round(ours, 3), "libvirt_s": round(theirs, 3),
                     "ratio": round(theirs / ours, 2), "processes_ours": procs["ours"],
                     "processes_libvirt": procs["libvirt"]})
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


# -- bench overhead: workloads under no monitor, the shadow stub, and breakpoints ----------

@dataclass(frozen=True)
class Workload:
    """A guest command run ``n`` times (``{n}`` in the command); fewer under breakpoints."""

    name: str
    cmd: str
    n_native: int          # none and shadow
    n_libvmi: int          # breakpoints: a few ms per event, so far fewer iterations
    setup: str | None = None


#: Host wall-clock time minus an empty ``vm exec`` under the same monitor, per
#: iteration, reported as the time of ``n_native`` iterations.
# Native iteration counts make each unmonitored run last about a second in the
# guest, so the ~40 ms vm-exec round trip and TCG's jitter stay small beside it.
OVERHEAD_WORKLOADS: tuple[Workload, ...] = (
    Workload("getppid", "/usr/bin/sv-syscall-loop {n}", 1_000_000, 1000),
    Workload("forkexec", "/usr/bin/sv-forkexec {n}", 150, 3),
    Workload("filecopy", "/usr/bin/sv-filecopy 1 {n}", 64, 1),
    Workload("gzip", "for i in $(seq {n}); do busybox gzip -c /tmp/sv-gzip-src >/dev/null; done", 3, 1,
             "dd if=/dev/urandom of=/tmp/sv-gzip-rnd bs=1k count=64 2>/dev/null; "
             "for i in 1 2 3 4; do cat /tmp/sv-gzip-rnd /usr/bin/sv-forkexec; done >/tmp/sv-gzip-src"),
    Workload("httpd", "for i in $(seq {n}); do wget -q -O /dev/null http://127.0.0.1/ || exit 1; done", 120, 2),
)
EMPTY = "true"


def _run_monitored(monitor: str, cmd: str, target: Any) -> tuple[float, int]:
    """Host wall-clock seconds of ``cmd`` in the guest while ``monitor`` runs, and its event count.

    Host time, not the guest's: a VM stopped at a breakpoint does not see
    the time pass (NOTES-lab: TSC unstable under a debugger).
    """
    import threading

    from .vm.console import vm_exec

    entry = _registry_vm(target, "bench overhead")
    stop = threading.Event()
    result: dict[str, Any] = {}
    mon = None
    if monitor == "libvmi":
        from .trace.breakpoint import BreakpointMonitor

        mon = BreakpointMonitor(target)
        mon.add_kind("syscall")
        mon.add_kind("switch")
        mon.attach()  # halts the VM until run() resumes it
        work = lambda: result.update(mon.run(3600.0, lambda e: None, stop.is_set))  # noqa: E731
    elif monitor == "shadow":
        from .trace.shadow import trace_shadow

        work = lambda: result.update(trace_shadow(  # noqa: E731
            target, syscalls=True, sched=True, duration=3600.0, should_stop=stop.is_set))
    else:
        work = None
    th = None
    try:
        if work is not None:
            def guarded() -> None:
                try:
                    work()
                except BaseException as exc:  # reported after the workload
                    result["error"] = exc
            th = threading.Thread(target=guarded, daemon=True)
            th.start()
            time.sleep(0.3)
        t0 = time.perf_counter()
        rc, out = vm_exec(entry, cmd, timeout=600.0)
        secs = time.perf_counter() - t0
        if rc != 0:
            raise ShadowvolError(f"workload {cmd!r} failed ({rc}): {out[-200:].decode(errors='replace')}")
    finally:
        stop.set()
        if th is not None:
            th.join(timeout=30)
        if mon is not None:
            mon.close()
    if "error" in result:
        raise result["error"]
    return secs, int(result.get("events", 0))


def _registry_vm(target: Any, what: str) -> Any:
    """The registry entry of ``target``: benchmarks that run workloads in the guest need
    its control channel, which only a VM started by ``shadowvol vm start`` has."""
    if target.vm is None:
        raise ShadowvolError(f"{what} runs workloads in the guest through its control channel: it needs a "
                             f"VM started by 'shadowvol vm start', not {target.description}")
    return target.vm


def _vm_entry(vm: str, what: str) -> Any:
    """The registry entry of ``-vm vm``, through the resolver (see :func:`_registry_vm`)."""
    from .target import open_target

    t = open_target(vm=vm)
    try:
        return _registry_vm(t, what)
    finally:
        t.close()


STUB_KO = "/lib/shadowvol/shadow_stub.ko"
#: What the shadow monitor records in bench overhead: syscalls and context switches (the paper's set).
STUB_EVENTS = 0x3


def _set_vm_running(qmp: str, running: bool) -> None:
    from .qemu.qmp import QMPClient

    with QMPClient(qmp) as q:
        q.set_running(running)


def _vm_running(qmp: str) -> bool:
    from .qemu.qmp import QMPClient

    with QMPClient(qmp) as q:
        return q.run_state()[0]


def _stub_loaded(entry: Any) -> bool:
    from .vm.console import vm_exec

    rc, _ = vm_exec(entry, "grep -q '^shadow_stub ' /proc/modules", timeout=30.0)
    return rc == 0


def _set_stub(entry: Any, load: bool, events: int = STUB_EVENTS) -> None:
    """Load (with ``events``) or unload the guest stub; the baseline runs without it."""
    from .vm.console import vm_exec

    if _stub_loaded(entry) == load:
        return
    cmd = f"insmod {STUB_KO} events={events}" if load else "rmmod shadow_stub"
    rc, out = vm_exec(entry, cmd, timeout=60.0)
    if rc != 0:
        raise ShadowvolError(f"{cmd} failed in {entry.name}: {out.decode(errors='replace').strip()[-200:]}")


def bench_overhead(vm: str, runs: int = 3, libvmi_runs: int = 1,
                   workloads: list[str] | None = None,
                   monitors: tuple[str, ...] = ("none", "shadow", "libvmi")) -> list[dict[str, Any]]:
    """Median time of each workload per monitor, and overhead against no monitor.

    none: the stub unloaded (it records whenever it is loaded). shadow: the
    stub loaded with syscall and context-switch events only, the host
    draining its rings concurrently (the shadow tracer in a thread). libvmi:
    gdbstub breakpoints on syscall entry and ``__switch_to``.

    Timing is the host's wall clock (a VM stopped at a breakpoint does not see
    time pass), minus the median of an empty ``vm exec`` under the same
    monitor, divided by the iterations; ``median_s`` is that per-iteration
    time times ``n_native``. Rows also carry the events per run, and the cost
    per event: (time per iteration - no-monitor time) / events per iteration.
    """
    from .target import open_target
    from .vm.console import vm_exec

    chosen = [w for w in OVERHEAD_WORKLOADS if workloads is None or w.name in workloads]
    rows: list[dict[str, Any]] = []
    t = open_target(vm=vm)
    try:
        entry = _registry_vm(t, "bench overhead")
    except BaseException:
        t.close()
        raise
    had_stub = _stub_loaded(entry)
    has_stub_ko = vm_exec(entry, f"test -f {STUB_KO}", timeout=30.0)[0] == 0
    try:
        for w in chosen:
            if w.setup:
                vm_exec(entry, w.setup, timeout=120.0)
            vm_exec(entry, w.cmd.format(n=1), timeout=120.0)  # warm the page cache
        for monitor in monitors:
            if monitor == "shadow" and not has_stub_ko:
                rows += [{"workload": w.name, "monitor": monitor, "median_s": None, "overhead_pct": None,
                          "note": f"the image has no {STUB_KO}: rebuild it with 'shadowvol vm build'"}
                         for w in chosen]
                continue
            if has_stub_ko:  # the stub records only while loaded: none/libvmi run without it
                _set_stub(entry, monitor == "shadow")
            n_runs = libvmi_runs if monitor == "libvmi" else runs
            if n_runs < 1:
                continue
            empty = [_run_monitored(monitor, EMPTY, t) for _ in range(max(n_runs, 2))]
            e_secs = statistics.median(x[0] for x in empty)
            e_events = statistics.median(x[1] for x in empty)
            for w in chosen:
                n = w.n_libvmi if monitor == "libvmi" else w.n_native
                res = [_run_monitored(monitor, w.cmd.format(n=n), t) for _ in range(n_runs)]
                raw = statistics.median(x[0] for x in res)
                per_iter = max(raw - e_secs, 0.0) / n
                row: dict[str, Any] = {"workload": w.name, "monitor": monitor,
                                       "median_s": round(per_iter * w.n_native, 4), "overhead_pct": None,
                                       "iterations": n, "raw_s": round(raw, 4), "empty_exec_s": round(e_secs, 4)}
                if monitor != "none":
                    row["events_per_iter"] = round(max(statistics.median(x[1] for x in res) - e_events, 0) / n, 1)
                rows.append(row)
    finally:
        t.close()
        if has_stub_ko:
            try:  # leave the stub as we found it (reloaded with its default events)
                _set_stub(entry, False)
                if had_stub:
                    _set_stub(entry, True, events=0x3F)
            except ShadowvolError:
                pass
    for r in rows:
        base = next((b["median_s"] for b in rows if b["workload"] == r["workload"] and b["monitor"] == "none"), None)
        if r["median_s"] is None or not base:
            continue
        r["overhead_pct"] = round(100.0 * (r["median_s"] - base) / base, 1)
        if r["monitor"] != "none" and r.get("events_per_iter"):
            n = OVERHEAD_WORKLOADS[[w.name for w in OVERHEAD_WORKLOADS].index(r["workload"])].n_native
            r["event_cost_us"] = round((r["median_s"] - base) / n / r["events_per_iter"] * 1e6, 2)
    rows.sort(key=lambda r: ([w.name for w in OVERHEAD_WORKLOADS].index(r["workload"]),
                             monitors.index(r["monitor"])))
    return rows


def summarize_event_cost(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per-event cost, shadow against breakpoint, per workload (from bench_overhead rows)."""
    out = []
    for name in dict.fromkeys(r["workload"] for r in rows):
        get = lambda m: next((r for r in rows if r["workload"] == name and r["monitor"] == m), {})  # noqa: E731
        s, b = get("shadow"), get("libvmi")
        cs, cb = s.get("event_cost_us"), b.get("event_cost_us")
        out.append({"workload": name, "shadow_events_per_iter": s.get("events_per_iter"),
                    "shadow_us_per_event": cs, "libvmi_events_per_iter": b.get("events_per_iter"),
                    "libvmi_us_per_event": cb,
                    "ratio": round(cb / cs, 1) if cs and cb and cs > 0 else None})
    return out


def bench_scan(vm: str, runs: int = 3) -> list[dict[str, Any]]:
    """Physical-layer scan throughput (GB/s): our literal scan against volatility3's own
    chunked scan, with the scanners stock plugins use (psscan's pointer needles, a banner)."""
    from volatility3.framework.layers import scanners

    from . import volbridge
    from .target import open_target

    volbridge.quiet_volatility()
    t = open_target(vm=vm)
    try:
        ctx = volbridge.build_context(t.memory, t.kernel, t.location, t.isf)
        layer = ctx.layers[volbridge.PHYSICAL_LAYER]
        kernel = ctx.modules[volbridge.KERNEL_MODULE]
        names = [n for n in ("fair_sched_class", "rt_sched_class", "dl_sched_class",
                             "idle_sched_class", "stop_sched_class") if kernel.has_symbol(n)]
        klayer = ctx.layers[kernel.layer_name]
        needles = [klayer.canonicalize(kernel.get_symbol(n).address + kernel.offset).to_bytes(8, "little")
                   for n in names]
        cases = [("MultiStringScanner (psscan needles)", lambda: scanners.MultiStringScanner(needles)),
                 ("BytesScanner (banner)", lambda: scanners.BytesScanner(b"Linux version "))]
        size = t.memory.size()
        rows = []
        for label, make in cases:
            for path, scan in (("shadowvol", layer.scan),
                               ("volatility3 chunked", super(volbridge.LivePhysicalLayer, layer).scan)):
                times, hits = [], 0
                for _ in range(runs if path == "shadowvol" else 1):
                    t0 = time.perf_counter()
                    hits = sum(1 for _ in scan(ctx, make()))
                    times.append(time.perf_counter() - t0)
                secs = statistics.median(times)
                rows.append({"scanner": label, "path": path, "hits": hits, "seconds": round(secs, 3),
                             "GB_per_s": round(size / secs / 1e9, 2)})
        return rows
    finally:
        t.close()


# -- bench scale (issue 12): stock plugins as the task count grows --------

DRGN_TASKS = "import drgn\nfrom drgn.helpers.linux.pid import for_each_task\n" \
             "print(sum(1 for _ in for_each_task(prog)))\n"
#: drgn doing pslist's work: each task's pid, tgid, parent's tgid, comm, four ids
#: and creation time (boot time in whole seconds plus ``start_boottime``, as
#: volatility3 and procps compute it), printed as pslist's rows are, one per line.
#: Its rows are stock pslist's (``-r quick``, less the File output column, the
#: offset sign-extended): compare like with like, not a count with a table.
DRGN_PSLIST = """import datetime
from drgn.helpers.linux.pid import for_each_task

tk = prog["tk_core"].timekeeper
boot = datetime.datetime.fromtimestamp((tk.offs_real.value_() - tk.offs_boot.value_()) // 10**9,
                                       tz=datetime.timezone.utc)
out = []
for t in for_each_task(prog):
    cred = t.cred
    start = boot + datetime.timedelta(seconds=t.start_boottime.value_() / 1e9)
    out.append(f"{t.value_():#x}\\t{t.pid.value_()}\\t{t.tgid.value_()}\\t{t.real_parent.tgid.value_()}\\t"
               f"{t.comm.string_().decode(errors='replace')}\\t{cred.uid.val.value_()}\\t{cred.gid.val.value_()}\\t"
               f"{cred.euid.val.value_()}\\t{cred.egid.val.value_()}\\t{start:%Y-%m-%d %H:%M:%S.%f %Z}")
print("\\n".join(out))
"""
#: drgn doing psaux's work: pid, parent's tgid, comm, and the command line read
#: from the process's memory (``cmdline()``: its page tables, walked by drgn),
#: ``[comm]`` for a kernel thread. Its rows are stock psaux's (``-r quick``).
DRGN_PSAUX = """import drgn
from drgn.helpers.linux.mm import cmdline
from drgn.helpers.linux.pid import for_each_task

out = []
for t in for_each_task(prog):
    comm = t.comm.string_().decode(errors="replace")
    if t.mm:
        try:
            args = b" ".join(cmdline(t) or []).decode(errors="replace")
        except drgn.FaultError:
            args = "-"
    else:
        args = f"[{comm}]"
    out.append(f"{t.pid.value_()}\\t{t.real_parent.tgid.value_()}\\t{comm}\\t{args}")
print("\\n".join(out))
"""


def _status_kb(pid: int) -> dict[str, int]:
    """``VmHWM``/``RssAnon``/``RssFile``/``RssShmem`` of a live process, in kB ({} once it is gone)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as f:
            return {k: int(v.split()[0]) for k, _, v in (line.partition(":") for line in f)
                    if k in ("VmHWM", "RssAnon", "RssFile", "RssShmem") and v.split()}
    except (OSError, ValueError):
        return {}


def _run_rss(cmd: list[str], cwd: str | None = None) -> tuple[float, float, float, str]:
    """(seconds, peak RSS in MB, peak private memory in MB, stdout) of one command.

    Sampled from ``/proc/PID/status`` every few ms while it runs:
    - peak RSS is the kernel's high-water mark (``VmHWM``, the figure GNU
      time reports). For us it includes the guest-RAM pages read through the
      shared mapping of QEMU's RAM file (``RssShmem``): QEMU's memory, mapped
      into our page tables, which costs the host nothing.
    - private memory is the largest ``RssAnon + RssFile`` seen: what the
      command itself allocated (heap, libraries), to compare across tools.
    Raises on failure.
    """
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, cwd=cwd, stdin=subprocess.DEVNULL)
        hwm = private = 0
        while proc.poll() is None:
            st = _status_kb(proc.pid)
            if st:
                hwm = max(hwm, st.get("VmHWM", 0))
                private = max(private, st.get("RssAnon", 0) + st.get("RssFile", 0))
            time.sleep(0.003)
        secs = time.perf_counter() - t0
        out.seek(0)
        err.seek(0)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd[:6])}... failed: {err.read().decode(errors='replace')[-300:]}")
        return secs, hwm / 1024, private / 1024, out.read().decode(errors="replace")


def _median_run(cmd: list[str], runs: int, cwd: str | None = None) -> tuple[float, float, float, str]:
    samples, rss, private, out = [], 0.0, 0.0, ""
    for _ in range(runs):
        secs, peak, priv, out = _run_rss(cmd, cwd)
        samples.append(secs)
        rss, private = max(rss, peak), max(private, priv)
    return statistics.median(samples), rss, private, out


def _set_idle_tasks(entry: Any, n: int) -> None:
    """Exactly ``n`` extra idle processes in the guest (``sv-idle`` under distinct names)."""
    from .vm.console import vm_exec

    rc, out = vm_exec(entry, "killall sv-idle 2>/dev/null; pkill -f /tmp/sv-s 2>/dev/null; sleep 0.3; "
                      f"n={n}; i=0; while [ $i -lt $n ]; do i=$((i+1)); ln -sf /usr/bin/sv-idle /tmp/sv-s$i; "
                      "/tmp/sv-s$i & done; sleep 1; ls -d /proc/[0-9]* | wc -l", timeout=600)
    if rc != 0:
        raise RuntimeError(f"could not start {n} idle tasks in the guest: {out[-200:]!r}")


def bench_scale(vm: str, tasks: list[int], runs: int = 3, drgn_vmlinux: str | None = None,
                progress: Any = None) -> list[dict[str, Any]]:
    """Per task count: stock pslist/psaux and our psxview live, stock vol -f on a raw copy,
    drgn --qemu (when installed and given a debug vmlinux); side by side, VM paused."""
    from . import fidelity
    from .target import open_target

    say = progress or (lambda msg: None)
    entry = _vm_entry(vm, "bench scale")
    me = [sys.executable, "-m", "shadowvol", "-vm", vm, "-r", "json"]
    vol = shutil.which("vol", path=os.path.dirname(sys.executable)) or shutil.which("vol")
    drgn = shutil.which("drgn", path=os.path.dirname(sys.executable)) or shutil.which("drgn")
    rows: list[dict[str, Any]] = []
    was_running = _vm_running(entry.qmp)  # each size resumes the VM to start tasks, then pauses it

    try:
        for n in tasks:
            _set_vm_running(entry.qmp, True)
            say(f"{n} idle tasks: starting them in the guest")
            _set_idle_tasks(entry, n)
            _set_vm_running(entry.qmp, False)
            with tempfile.TemporaryDirectory(prefix="shadowvol-scale-", dir="/var/tmp") as tmp:
                _median_run(me + ["linux.pslist"], 1)  # warm: profile cache, kernel location
                count = 0
                for tool, plugin in (("shadowvol live", "linux.pslist"), ("shadowvol live", "linux.psaux"),
                                     ("shadowvol live", "linux.psxview")):
                    say(f"{n} idle tasks: {plugin} live")
                    secs, rss, priv, out = _median_run(me + [plugin], runs, cwd=tmp)
                    if plugin == "linux.pslist":
                        count = len(fidelity.flatten_rows(json.loads(out)))
                    rows.append({"tasks": count, "tool": tool, "plugin": plugin,
                                 "median_s": round(secs, 3), "rss_mb": round(rss),
                                 "private_mb": round(priv)})
                if vol:
                    t = open_target(vm=vm)
                    try:
                        raw = Path(tmp) / "guest.raw"
                        fidelity.raw_copy(t.memory, raw)
                        symdir = Path(tmp) / "symbols" / "linux"
                        symdir.mkdir(parents=True)
                        atomic_copy(t.profile_path, symdir / t.profile_path.name, mode=0o600)
                    finally:
                        t.close()
                    cmd = [vol, "-q", "-f", str(raw), "-s", str(symdir.parent), "-r", "json"]
                    _median_run(cmd + ["linux.pslist"], 1, cwd=tmp)  # warm vol's own caches
                    for plugin in ("linux.pslist", "linux.psaux"):
                        say(f"{n} idle tasks: stock vol -f {plugin} on the copy")
                        secs, rss, priv, _ = _median_run(cmd + [plugin], max(1, runs // 2), cwd=tmp)
                        rows.append({"tasks": count, "tool": "stock vol -f (raw copy)", "plugin": plugin,
                                     "median_s": round(secs, 3), "rss_mb": round(rss),
                                     "private_mb": round(priv)})
                if drgn and drgn_vmlinux:
                    for name, source in (("for_each_task", DRGN_TASKS), ("pslist's fields", DRGN_PSLIST),
                                         ("psaux's fields", DRGN_PSAUX)):
                        script = Path(tmp) / "drgn_script.py"
                        atomic_write(script, source.encode())
                        say(f"{n} idle tasks: drgn --qemu, {name}")
                        secs, rss, priv, _ = _median_run([drgn, "--qemu", entry.qmp, "-s", drgn_vmlinux,
                                                    "--no-default-symbols", str(script)], runs, cwd=tmp)
                        rows.append({"tasks": count, "tool": "drgn --qemu (debug vmlinux)",
                                     "plugin": name, "median_s": round(secs, 3), "rss_mb": round(rss),
                                     "private_mb": round(priv)})
                else:
                    rows.append({"tasks": count, "tool": "drgn --qemu", "plugin": "-",
                                 "median_s": "n/a", "rss_mb": "n/a", "private_mb": "n/a",
                                 "note": "drgn not installed" if not drgn else "no debug vmlinux (--vmlinux)"})
    finally:
        _set_vm_running(entry.qmp, True)
        try:
            _set_idle_tasks(entry, 0)
        finally:
            _set_vm_running(entry.qmp, was_running)
    return rows


#: Issue 12's targets for stock plugins live: (the fewest tasks it names, the
#: most seconds there), at 2,000 tasks (seconds, times faster than stock
#: ``vol -f``), and milliseconds per task.
SCALE_TARGETS = {"small": (56, 0.25), "large": (2000, 0.5, 20.0), "per_task_ms": 0.15}

#: Which drgn workload does the same work as a stock plugin (its rows).
_DRGN_SAME_WORK = {"linux.pslist": "pslist's fields", "linux.psaux": "psaux's fields"}


def summarize_scale(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Ratios from one :func:`bench_scale` run, measured side by side, per task
    count, for the stock plugins run live: times faster than stock ``vol -f``
    on the raw copy and than drgn doing the same work (above 1: we are
    faster), the cost of a task over the fewest tasks measured, and
    which of :data:`SCALE_TARGETS` the row meets."""
    def median(tasks: int, tool: str, plugin: str) -> float | None:
        value = next((r["median_s"] for r in rows if r["tasks"] == tasks and r["tool"] == tool
                      and r["plugin"] == plugin), None)
        return value if isinstance(value, (int, float)) and value > 0 else None

    sizes = sorted({r["tasks"] for r in rows if r["tool"] == "shadowvol live"})
    out = []
    for plugin in ("linux.pslist", "linux.psaux"):
        base = median(sizes[0], "shadowvol live", plugin) if sizes else None
        for n in sizes:
            ours = median(n, "shadowvol live", plugin)
            if ours is None:
                continue
            stock = median(n, "stock vol -f (raw copy)", plugin)
            drgn = median(n, "drgn --qemu (debug vmlinux)", _DRGN_SAME_WORK[plugin])
            per_task = (ours - base) * 1000 / (n - sizes[0]) if base is not None and n > sizes[0] else None
            out.append({"tasks": n, "plugin": plugin, "median_s": ours,
                        "x_stock_vol": round(stock / ours, 1) if stock else "n/a",
                        "x_drgn_same_work": round(drgn / ours, 2) if drgn else "n/a",
                        "per_task_ms": round(per_task, 3) if per_task is not None else "-",
                        "targets": _scale_targets_met(n, ours, stock, per_task)})
    return out


def _scale_targets_met(n: int, secs: float, stock: float | None, per_task_ms: float | None) -> str:
    """Issue 12's targets that apply at ``n`` tasks, each as ``met`` or ``missed``."""
    verdict = {True: "met", False: "missed"}
    parts = []
    fewest, small_s = SCALE_TARGETS["small"]
    many, large_s, times = SCALE_TARGETS["large"]
    if n <= fewest:
        parts.append(f"<={small_s} s {verdict[secs <= small_s]}")
    if n >= many:
        parts.append(f"<={large_s} s {verdict[secs <= large_s]}")
        if stock:
            parts.append(f">={times:g}x stock {verdict[stock / secs >= times]}")
    if per_task_ms is not None:
        limit = SCALE_TARGETS["per_task_ms"]
        parts.append(f"<={limit} ms/task {verdict[per_task_ms <= limit]}")
    return "; ".join(parts) or "-"


def _promote_members(roots: list[Any]) -> None:
    """Copy every member an object has read (``_concrete_members``; for a pointer,
    those of what it points to) into the object's own ``__dict__``, from ``roots``
    down: a later access is then a plain attribute lookup, as if volatility3's
    object model cost nothing. Only :func:`bench_floor` does this, on objects it
    built for itself."""
    from volatility3.framework.objects import Pointer

    seen: set[int] = set()
    todo = list(roots)
    while todo:
        obj = todo.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        owners = [obj]  # whose members obj answers for: itself, and what a pointer points to
        if isinstance(obj, Pointer):
            owners += (getattr(obj, "_cache", None) or {}).values()
            todo += owners[1:]
        members: dict[str, Any] = {}
        for owner in owners:
            members.update(getattr(owner, "_concrete_members", None) or {})
        # A name a class has (a property such as cred.uid, whose value is not
        # the member's) is looked up there first: left as it is.
        members = {k: v for k, v in members.items() if not any(hasattr(type(o), k) for o in owners)}
        obj.__dict__.update(members)
        todo += members.values()


def _cpu_median(fn: Any, runs: int) -> float:
    """Median CPU seconds of ``fn()``, each run alone: collected before, the
    collector off during it (the heap this process keeps is not the command's)."""
    import gc

    samples = []
    for _ in range(runs):
        gc.collect()
        gc.disable()
        try:
            t0 = time.process_time()
            fn()
            samples.append(time.process_time() - t0)
        finally:
            gc.enable()
    return statistics.median(samples)


def _floor_passes(target: Any, runs: int) -> tuple[int, float, float, float, float]:
    """``bench floor``'s passes 1-4 on an open target: (rows, seconds of each pass)."""
    import contextlib
    import io

    from volatility3.cli import text_renderer
    from volatility3.framework import renderers
    from volatility3.plugins.linux.pslist import PsList

    from . import volbridge
    from .run import RunHealth, run_plugin

    volbridge.quiet_volatility()

    def plugin_rendered() -> tuple[list, list]:
        target.new_epoch()
        grid = run_plugin(target, "linux.pslist", {}, health=RunHealth())
        rows: list = []
        with contextlib.redirect_stdout(io.StringIO()):
            text_renderer.QuickTextRenderer().render(grid)
        grid.visit(None, lambda node, acc: acc.append((node.path_depth - 1, node.values)) or acc, rows)
        return [(c.name, c.type) for c in grid.columns], rows

    columns, rows = plugin_rendered()
    plugin_s = _cpu_median(plugin_rendered, runs)
    target.new_epoch()
    ctx = volbridge.build_context(target.memory, target.kernel, target.location, target.isf,
                                  isf_url=target.profile_path.as_uri())
    tasks = list(PsList.list_tasks(ctx, volbridge.KERNEL_MODULE))
    if len(tasks) != len(rows):
        raise ShadowvolError(f"bench floor: {len(tasks)} tasks walked, {len(rows)} rows rendered")

    def per_task_calls() -> list:
        return [(PsList.get_task_fields(t), t.is_valid()) for t in tasks]

    cached = per_task_calls()
    cached_s = _cpu_median(per_task_calls, runs)
    _promote_members(tasks)
    free_s = _cpu_median(per_task_calls, runs)
    if per_task_calls() != cached:
        raise ShadowvolError("bench floor: the per-task calls changed their answer once members "
                             "were plain attributes")

    def render_rows() -> None:
        with contextlib.redirect_stdout(io.StringIO()):
            text_renderer.QuickTextRenderer().render(renderers.TreeGrid(columns, iter(rows)))

    return len(rows), plugin_s, cached_s, free_s, _cpu_median(render_rows, runs)


def bench_floor(vm: str, runs: int = 5) -> list[dict[str, Any]]:
    """What stock ``linux.pslist`` costs by itself, per task, with the guest as it is (issue 12).

    In one process, on the paused guest (a running VM is resumed at the end):
    1. the whole stock plugin, rendered (a new epoch each run);
    2. its per-task calls (``PsList.get_task_fields``, ``task_struct.is_valid``)
       on tasks whose members were already read, through our object model's cache;
    3. the same calls with every read member made a plain attribute
       (:func:`_promote_members`): member access at no cost, the floor of the
       stock code itself;
    4. the stock renderer over the rows the plugin yielded, recorded.
    Pass 3 must return the same fields as pass 2 (else this fails). The whole
    command is timed too, and ``floor`` projects it with the object model at no
    cost: whole - (1) + (3) + (4), where whole - (1) is the rest of the command
    (start-up, the profile, its garbage collection). Passes are CPU time, each
    alone (:func:`_cpu_median`). Stock code is called, never changed; the
    tasks' walk is left out of 2-4, so the floor is an underestimate.
    """
    from .target import open_target

    entry = _vm_entry(vm, "bench floor")
    was_running = _vm_running(entry.qmp)
    _set_vm_running(entry.qmp, False)
    try:
        me = [sys.executable, "-m", "shadowvol", "-vm", vm]
        _median_run(me + ["linux.pslist"], 1)  # warm: profile cache, kernel location
        whole, _, _, _ = _median_run(me + ["linux.pslist"], runs)
        target = open_target(vm=vm)
        try:
            n, plugin_s, cached_s, free_s, render_s = _floor_passes(target, runs)
        finally:
            target.close()
    finally:
        if was_running:
            _set_vm_running(entry.qmp, True)
    out = []
    for what, secs in (("whole command (shadowvol -vm, stock linux.pslist)", whole),
                       ("1. stock plugin + renderer, in process", plugin_s),
                       ("2. per-task calls, members read before (our cache)", cached_s),
                       ("3. per-task calls, members plain attributes (floor)", free_s),
                       ("4. stock renderer over the recorded rows", render_s),
                       ("rest of the command: whole - 1", whole - plugin_s),
                       ("floor: whole - 1 + 3 + 4", whole - plugin_s + free_s + render_s)):
        out.append({"tasks": n, "what": what, "median_s": round(secs, 3),
                    "per_task_us": round(secs / n * 1e6, 1) if n else "n/a"})
    return out


# -- bench watch, diff, profile-load (issue 13) ------------------------------

def _ms(samples: list[float]) -> float:
    return round(statistics.median(samples), 1)


def bench_watch(vm: str, tasks: list[int] | None = None, runs: int = 5, plugin: str = "linux.pslist",
                progress: Any = None) -> list[dict[str, Any]]:
    """Per task count and run state (running, paused): the median tick of ``watch``
    (one context per boot; wall and CPU ms, the first tick left out), a tick that
    builds a new context each time (as ``run_plugin`` does), and the whole
    ``shadowvol -vm NAME PLUGIN`` command, side by side.

    ``tasks``: idle processes to start in the guest first (None: as it is).
    The VM's run state is put back as it was.
    """
    import io

    from . import volbridge
    from .errors import ShadowvolError
    from .run import run_plugin
    from .target import open_target, qmp_endpoint
    from .watch import grid_rows, watch

    say = progress or (lambda msg: None)
    volbridge.quiet_volatility()
    qmp = qmp_endpoint(vm)
    if qmp is None:
        raise ShadowvolError(f"bench watch needs the VM's QMP socket ({vm} has none)")
    was_running = _vm_running(qmp)
    me = [sys.executable, "-m", "shadowvol", "-vm", vm, plugin]
    rows: list[dict[str, Any]] = []
    try:
        for n in (tasks if tasks is not None else [None]):
            if n is not None:
                _set_vm_running(qmp, True)
                say(f"{n} idle tasks: starting them in the guest")
                _set_idle_tasks(_vm_entry(vm, "bench watch --tasks"), n)
            for state in ("running", "paused"):
                _set_vm_running(qmp, state == "running")
                say(f"{n if n is not None else 'as is'}: {state}: watch ticks")
                costs: list[tuple[float, float]] = []
                out = io.StringIO()
                watch(vm, plugin, interval=0.2, count=runs + 1, out=out, err=io.StringIO(), costs=costs,
                      renderer="jsonl")
                wall, cpu = [c[0] for c in costs[1:]], [c[1] for c in costs[1:]]
                t = open_target(vm=vm)
                try:
                    t.new_epoch()
                    count = len(grid_rows(run_plugin(t, plugin, {})))  # also warms the per-process caches
                    say(f"{n if n is not None else 'as is'}: {state}: a new context per tick")
                    fresh_wall, fresh_cpu = [], []
                    for _ in range(runs):
                        t0, c0 = time.perf_counter(), time.process_time()
                        t.new_epoch()
                        grid_rows(run_plugin(t, plugin, {}))
                        fresh_wall.append((time.perf_counter() - t0) * 1000)
                        fresh_cpu.append((time.process_time() - c0) * 1000)
                finally:
                    t.close()
                say(f"{n if n is not None else 'as is'}: {state}: the whole command")
                _time_cmd(me, 1)
                cmd_s, _ = _time_cmd(me, runs)
                base = {"tasks": count, "vm": state, "plugin": plugin}
                rows.append({**base, "what": "watch tick (one context per boot)", "median_ms": _ms(wall),
                             "cpu_ms": _ms(cpu), "min_ms": round(min(wall), 1), "runs": len(wall)})
                rows.append({**base, "what": "tick with a new context (before)", "median_ms": _ms(fresh_wall),
                             "cpu_ms": _ms(fresh_cpu), "min_ms": round(min(fresh_wall), 1), "runs": runs})
                rows.append({**base, "what": f"shadowvol -vm NAME {plugin}", "median_ms": round(cmd_s * 1000, 1),
                             "cpu_ms": "", "min_ms": "", "runs": runs})
    finally:
        if tasks is not None:
            _set_vm_running(qmp, True)
            _set_idle_tasks(_vm_entry(vm, "bench watch --tasks"), 0)
        _set_vm_running(qmp, was_running)
    return rows


PROFILE_LOAD = """
import sys, time
from pathlib import Path
from shadowvol import profiles, symbols
path = Path(sys.argv[1])
t0, c0 = time.perf_counter(), time.process_time()
if sys.argv[2] == "fast":
    isf = profiles.load_profile(path)
    profiles.profile_addresses(isf)
else:
    isf = symbols.read_profile(path)
print((time.perf_counter() - t0) * 1000, (time.process_time() - c0) * 1000, len(isf["user_types"]))
"""


def bench_profile_load(vm: str, runs: int = 5) -> list[dict[str, Any]]:
    """Loading the VM's profile in a new process (as every ``shadowvol`` command does),
    warm page cache: through the lazy fast copy (``profiles.load_profile`` plus the
    symbol addresses every run takes), against parsing its ISF JSON."""
    from .target import open_target

    t = open_target(vm=vm)  # also makes sure the fast copy exists
    path = t.profile_path
    t.close()
    rows = []
    for how, label in (("fast", "load_profile (lazy fast copy) + profile_addresses"),
                       ("json", "parse the ISF JSON (.json.xz)")):
        walls, cpus, types = [], [], 0
        for _ in range(runs + 1):
            p = subprocess.run([sys.executable, "-c", PROFILE_LOAD, str(path), how], capture_output=True,
                               text=True, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
            if p.returncode != 0:
                raise RuntimeError(f"profile load failed: {p.stderr[-300:]}")
            wall, cpu, types = p.stdout.split()
            walls.append(float(wall))
            cpus.append(float(cpu))
        rows.append({"profile": path.name, "what": label, "types": int(types),
                     "median_ms": _ms(walls[1:]), "cpu_ms": _ms(cpus[1:]), "min_ms": round(min(walls[1:]), 1),
                     "runs": runs})
    return rows


def bench_diff(vm: str, runs: int = 5, workdir: str = "/var/tmp", progress: Any = None) -> list[dict[str, Any]]:
    """``shadowvol diff A B`` of two snapshots of the VM taken now (every kind, and
    processes + modules), as a user runs it: median wall time of the whole command
    and the CPU time it used (all its processes). The snapshots are removed after."""
    import resource

    say = progress or (lambda msg: None)
    me = [sys.executable, "-m", "shadowvol"]
    rows = []
    with tempfile.TemporaryDirectory(prefix="shadowvol-bench-diff-", dir=workdir) as tmp:
        for side in ("a", "b"):
            say(f"snapshot {side}")
            p = subprocess.run(me + ["snapshot", "-vm", vm, "-o", str(Path(tmp) / side), "-r", "json"],
                               capture_output=True, text=True)
            if p.returncode != 0:
                raise RuntimeError(f"snapshot failed: {p.stderr[-300:]}")
            size = json.loads(p.stdout).get("ram_bytes")
        for label, kinds in (("every kind", []), ("process,module", ["--kinds", "process,module"])):
            cmd = me + ["diff", str(Path(tmp) / "a"), str(Path(tmp) / "b"), "-r", "json"] + kinds
            walls, cpus = [], []
            for i in range(runs + 1):
                say(f"diff, {label}: run {i + 1}/{runs + 1}")
                before = resource.getrusage(resource.RUSAGE_CHILDREN)
                t0 = time.perf_counter()
                p = subprocess.run(cmd, capture_output=True, text=True)
                wall = time.perf_counter() - t0
                after = resource.getrusage(resource.RUSAGE_CHILDREN)
                if p.returncode != 0:
                    raise RuntimeError(f"diff failed: {p.stderr[-300:]}")
                if i:  # the first run warms the page cache and the profile's fast copy
                    walls.append(wall)
                    cpus.append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
            rows.append({"diff": label, "ram_mib": (size or 0) >> 20, "changes": len(json.loads(p.stdout)),
                         "median_s": round(statistics.median(walls), 2), "min_s": round(min(walls), 2),
                         "cpu_s": round(statistics.median(cpus), 2), "runs": runs})
    return rows
