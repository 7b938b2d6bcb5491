"""The ``shadowvol`` command line.

The main job (``shadowvol.run``), then the commands::

    shadowvol -vm NAME [--backend shadow|libvmi] [-r pretty|json|csv] PLUGIN [ARGS]
    shadowvol -f DUMP [-r ...] PLUGIN [ARGS]
    shadowvol plugins
    shadowvol vm build|start|list|stop|exec|cp|banner ...
    shadowvol demo
    shadowvol profile build --vmlinuz FILE ...
    shadowvol stub build --kernel-package P -o shadow_stub.ko
    shadowvol bench reads|pslist -vm NAME
    shadowvol trace -vm NAME [--syscalls] [--sched] [--proc] [--at SYMBOL] [--duration S] [-r json]

Modules are imported only when their command runs: start-up time counts.
Errors meant for the user print as one line (``shadowvol: error: ...``) with a
non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import re
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import ShadowvolError, Terminated
from .safeio import short
from .textsafe import printable

SUBCOMMANDS = ("vm", "demo", "profile", "bench", "trace", "trace-check", "read", "plugins",
               "snapshot", "watch", "diff", "stub")


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def _progress():
    """A rich status spinner when stderr is a terminal, plain lines otherwise."""
    if sys.stderr.isatty():
        from rich.console import Console

        status = Console(stderr=True).status("")
        status.start()
        return (lambda msg: status.update(msg)), status.stop
    return (lambda msg: _say(f"... {msg}")), (lambda: None)


def cmd_vm_build(args: argparse.Namespace) -> int:
    from .vm.image import build_image

    update, stop = _progress()
    try:
        img, built = build_image(args.kernel_package, progress=update, force=args.force)
    finally:
        stop()
    print(f"{'built' if built else 'up to date'}: {img.release} ({img.root})")
    if img.stub_unavailable():
        print(img.stub_unavailable() + " (image and profile built without it)")
    return 0


def cmd_vm_start(args: argparse.Namespace) -> int:
    from .vm.image import find_image
    from .vm.qemu import parse_memory, start_vm
    from .vm.registry import validate_name

    validate_name(args.name)
    parse_memory(args.memory)
    if not 1 <= args.cpus <= 64:  # before "booting" is printed
        raise ShadowvolError(f"--cpus must be between 1 and 64, not {args.cpus}")
    stub_params = {}
    for kv in args.stub_param:
        key, sep, value = kv.partition("=")
        if not sep:
            raise ShadowvolError(f"--stub-param takes K=V, not {kv!r}")
        stub_params[key] = value
    img = find_image(args.image)
    update, stop = _progress()
    update(f"booting {args.name} ({img.release})")
    try:
        e = start_vm(args.name, img, memory=args.memory, cpus=args.cpus, kaslr=not args.no_kaslr,
                     accel=args.accel, stub=args.stub, timeout=args.timeout, cpu=args.cpu,
                     anonymous_ram=args.anonymous_ram, stub_params=stub_params or None)
    finally:
        stop()
    print(f"{e.name}: running (pid {e.pid}, {e.accel}, {e.memory_mb} MiB, kaslr "
          f"{'on' if e.kaslr else 'off'}, kernel {e.release})")
    return 0


def cmd_vm_list(args: argparse.Namespace) -> int:
    from .vm.qemu import vm_state
    from .vm.registry import list_vms

    rows = [(e.name, str(e.pid), vm_state(e), f"{e.memory_mb}M", e.release, e.accel,
             f"qmp={e.qmp} gdb={e.gdb} ctl={e.ctl} ram={e.ram_file}") for e in list_vms()]
    rows += _libvirt_rows(args.connect)
    head = ("NAME", "PID", "STATE", "MEMORY", "KERNEL", "ACCEL", "ENDPOINTS")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head) - 1)]
    for r in [head, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1])
    return 0


def _libvirt_rows(uri: str | None) -> list[tuple[str, ...]]:
    """libvirt domains for ``vm list``, marked read-only (we inspect them, libvirt runs them).
    Without the libvirt binding or a reachable libvirtd the list has only our VMs, and says
    why on stderr when a URI was asked for."""
    from .vm import libvirt

    try:
        doms = libvirt.list_domains(uri)
    except ShadowvolError as exc:
        if uri:
            raise
        _say(f"shadowvol: note: {exc}")
        return []
    return [(f"libvirt:{d['name']}", str(d["pid"] or "-"), d["state"], f"{d['memory_mb']}M", "-",
             d["type"] or "-", f"libvirt {uri or libvirt.DEFAULT_URI} (read-only) gdb={d['gdb'] or 'none'}"
             f" vmcoreinfo={'yes' if d['vmcoreinfo'] else 'no'}")
            for d in doms]


def cmd_vm_stop(args: argparse.Namespace) -> int:
    from .vm.qemu import stop_vm

    stop_vm(args.name)
    print(f"{args.name}: stopped")
    return 0


def cmd_vm_exec(args: argparse.Namespace) -> int:
    from .vm.console import vm_exec
    from .vm.registry import get_vm

    cmd = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not cmd:
        raise ShadowvolError("vm exec needs a command: shadowvol vm exec NAME -- CMD...")
    import shlex

    rc, out = vm_exec(get_vm(args.name), " ".join(cmd) if len(cmd) == 1 else shlex.join(cmd),
                      timeout=args.timeout)
    sys.stdout.buffer.write(out)
    sys.stdout.flush()
    return rc


def cmd_vm_cp(args: argparse.Namespace) -> int:
    from .vm.console import vm_cp
    from .vm.registry import get_vm

    n = vm_cp(get_vm(args.name), Path(args.host_file), args.guest_path)
    print(f"copied {n} bytes to {args.name}:{args.guest_path}")
    return 0


def cmd_vm_banner(args: argparse.Namespace) -> int:
    from .target import open_target

    t = open_target(vm=args.name)
    try:
        va = t.symbol_address("linux_banner")
        paddr = t.kernel.translate(va)[0]
        text = t.kernel.read(va, 512).split(b"\0")[0].decode(errors="replace").rstrip("\n")
    finally:
        t.close()
    print(f"{args.name}: linux_banner at {va:#x} (physical {paddr:#x}): {printable(text)}")
    return 0


def cmd_stub_build(args: argparse.Namespace) -> int:
    """Build the guest stub (guest_stub/) for a Debian kernel package, to copy into a guest
    that shadowvol did not boot (a libvirt domain): the guest loads it, trace reads it."""
    from .safeio import atomic_copy
    from .vm.image import _stub_dir, build_image
    from .vm.kmod import build_module

    src = _stub_dir()
    if src is None:
        raise ShadowvolError("the guest stub's source (guest_stub/) is not here: stub build runs "
                             "from a shadowvol source checkout")
    out = Path(args.output)
    if out.exists() and not out.is_file():
        raise ShadowvolError(f"{out} exists and is not a file")
    if not out.resolve().parent.is_dir():
        raise ShadowvolError(f"directory {out.resolve().parent} does not exist (-o FILE)")
    update, stop = _progress()
    try:
        update(f"kernel headers of {args.kernel_package}")
        img, _ = build_image(args.kernel_package, progress=update)
        update(f"building the stub for {img.release}")
        import tempfile

        with tempfile.TemporaryDirectory(prefix="shadowvol-stub-") as tmp:
            ko = build_module(img, src, out_dir=Path(tmp))[0]
            atomic_copy(ko, out, mode=0o644)
    finally:
        stop()
    print(f"built {out} for kernel {img.release}: copy it into the guest and load it with "
          f"'insmod shadow_stub.ko' (then: shadowvol trace -vm NAME ...)")
    return 0


def _add_stub_parser(sub: argparse._SubParsersAction) -> None:
    st = sub.add_parser("stub", help="the guest stub for guests shadowvol did not boot").add_subparsers(
        dest="stcmd", required=True)
    sb = st.add_parser("build", help="build shadow_stub.ko against a Debian kernel package's headers")
    sb.add_argument("--kernel-package", required=True, metavar="P",
                    help="the guest's kernel package, e.g. linux-image-6.1.0-57-cloud-amd64")
    sb.add_argument("-o", "--output", required=True, metavar="FILE", help="where to write the .ko")
    sb.set_defaults(func=cmd_stub_build)


def cmd_demo(args: argparse.Namespace) -> int:
    """Build the default image, boot web01 if needed, and list its processes from outside."""
    from .run import run_plugin_cli
    from .vm.image import build_image
    from .vm.qemu import start_vm
    from .vm.registry import get_vm

    update, stop = _progress()
    try:
        update("building the guest image")
        img, _ = build_image(progress=update)
        try:
            get_vm(args.name)
        except ShadowvolError:
            update(f"booting {args.name}")
            start_vm(args.name, img)
    finally:
        stop()
    cmd_vm_banner(args)
    return run_plugin_cli(["-vm", args.name, "linux.pslist"])


def _int(text: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None


def cmd_read(args: argparse.Namespace) -> int:
    """Hex dump of guest memory: kernel virtual by default, or physical."""
    from .target import open_target

    if not 0 < args.length <= 1 << 20:
        raise ShadowvolError("length must be between 1 and 1 MiB")
    t = open_target(vm=args.vm, dump=args.dump, backend=args.backend, profile=args.profile, connect=args.connect)
    try:
        data = t.memory.read(args.address, args.length) if args.physical else \
            t.kernel.read(args.address, args.length)
    finally:
        t.close()
    for off in range(0, len(data), 16):
        row = data[off:off + 16]
        text = "".join(chr(b) if 32 <= b < 127 else "." for b in row)
        print(f"{args.address + off:016x}  {row.hex(' '):<47}  {text}")
    return 0


def cmd_profile_build(args: argparse.Namespace) -> int:
    from . import profiles, symbols

    from .safeio import check_input

    if not (args.vmlinuz or args.vmlinux):
        raise ShadowvolError("profile build needs --vmlinuz FILE or --vmlinux FILE")
    # stat first: a FIFO or device would block or never end; --headers is a directory.
    for flag, f in (("--vmlinuz", args.vmlinuz), ("--vmlinux", args.vmlinux), ("--system-map", args.system_map)):
        if f:
            check_input(f, flag)
    if args.headers:
        check_input(args.headers, "--headers", directory=True)
    report = symbols.ProfileReport()
    isf = symbols.build_profile(vmlinuz=args.vmlinuz and Path(args.vmlinuz),
                                vmlinux=args.vmlinux and Path(args.vmlinux),
                                system_map=args.system_map and Path(args.system_map),
                                headers=args.headers and Path(args.headers), report=report)
    if args.output:
        out = symbols.write_profile(isf, Path(args.output))
    else:
        name = f"linux-{report.release or 'unknown'}"
        _refuse_degrading(profiles.store_dir() / f"{name}.json.xz", isf, args.force)
        out = profiles.write_profile(isf, name)
    print(f"{out}: {report.release}, {report.symbols} symbols ({report.symbol_source}), "
          f"{report.typed_symbols} typed, types from {report.type_source}")
    for note in report.notes:
        print(f"  note: {note}")
    return 0


def _refuse_degrading(stored: Path, isf: dict, force: bool) -> None:
    """``profile build`` into the store never replaces a profile with more
    typed symbols (e.g. one built with --headers) unless --force."""
    from . import profiles

    if force or not stored.exists():
        return
    try:
        old = profiles.typed_symbols(profiles.load_profile(stored))
    except ShadowvolError:
        return  # an unreadable stored profile is no loss
    new = profiles.typed_symbols(isf)
    lost = sorted(old - new)
    if len(new) < len(old) or lost:
        sample = ", ".join(lost[:5]) + (", ..." if len(lost) > 5 else "")
        raise ShadowvolError(
            f"the store's {stored.name} has {len(old)} typed symbols, this build {len(new)}: writing it would "
            f"lose the types of {len(lost)} ({sample}); use -o FILE to write it elsewhere, --headers DIR "
            "to type them, or --force to replace it")


def cmd_profile_diff(args: argparse.Namespace) -> int:
    """``profile diff A B``: exit 0 when B has everything of A (on the
    compared set), 1 when not."""
    import json

    from .symbols import diff

    a, b = diff.load_isf(args.a), diff.load_isf(args.b)
    only = diff.stock_scope(a, b) if args.stock else None
    result = diff.diff_profiles(a, b, only=only)
    if args.renderer == "json":
        print(json.dumps({"a": args.a, "b": args.b, **result.as_dict()}, indent=1))
    else:
        print(diff.render_text(result, args.a, args.b, limit=args.limit))
    return 0 if result.failures == 0 else 1


def cmd_plugins(args: argparse.Namespace) -> int:
    """Every plugin a run can use, stock and ours, with a one-line description (as ``vol -h``)."""
    import json as _json

    from . import fidelity, volbridge

    volbridge.quiet_volatility()
    ours = fidelity.our_plugins()
    shadowed = {p.name.rsplit(".", 1)[0] for p in ours}
    rows = [p for p in fidelity.stock_plugins() if p.name.rsplit(".", 1)[0] not in shadowed] + ours
    rows.sort(key=lambda p: p.name)
    if args.renderer == "json":
        print(_json.dumps([{"name": p.name, "origin": p.origin,
                            "description": p.description or p.error} for p in rows], indent=1))
        return 0
    width = max(len(p.name) for p in rows)
    for p in rows:
        text = p.description if not p.error else f"(unavailable: {p.error})"
        mark = "*" if p.origin == "shadowvol" else " "
        print(f"{p.name.ljust(width)} {mark} {text}")
    print(f"\n{len(rows)} plugins; * = shadowvol's own. Run one: shadowvol -vm NAME PLUGIN [options]")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from . import bench

    if args.what != "profiles" and not args.vm:
        raise ShadowvolError(f"bench {args.what} needs -vm NAME")
    if args.connect is not None and args.what not in ("sweep", "libvirt"):
        raise ShadowvolError(f"bench {args.what} does not take --connect (libvirt domains at the default "
                             "URI: -vm libvirt:NAME)")
    if not os.path.isdir(args.workdir):
        raise ShadowvolError(f"--workdir {args.workdir} is not a directory")
    if args.tasks is not None and not re.fullmatch(r"\d{1,6}(,\d{1,6})*", args.tasks):
        raise ShadowvolError(f"--tasks takes task counts separated by commas, e.g. 0,1000,2000 "
                             f"(got {short(args.tasks, 40)!r})")

    if args.what == "overhead":
        return cmd_bench_overhead(args)
    if args.what == "reads":
        rows = bench.bench_reads(args.vm)
        bench.render(rows, args.renderer)
        if args.renderer != "json":
            print()
            bench.render(bench.summarize_reads(rows), args.renderer)
    elif args.what in ("sweep", "profiles"):
        return cmd_bench_sweep(args)
    elif args.what == "libvirt":
        if not args.domain:
            raise ShadowvolError("bench libvirt needs --domain NAME (a libvirt domain) besides -vm NAME (ours)")
        bench.render(bench.bench_libvirt(args.vm, args.domain, runs=args.runs, connect=args.connect),
                     args.renderer)
    elif args.what == "scan":
        bench.render(bench.bench_scan(args.vm, runs=args.runs), args.renderer)
    elif args.what in ("watch", "diff", "profile-load"):
        return cmd_bench_issue13(args)
    elif args.what == "floor":
        bench.render(bench.bench_floor(args.vm, runs=args.runs), args.renderer)
    elif args.what == "scale":
        update, stop = _progress()
        try:
            tasks = [int(x) for x in (args.tasks or "0,500,1000,2000").split(",")]
            rows = bench.bench_scale(args.vm, tasks, runs=args.runs,
                                     drgn_vmlinux=args.vmlinux, progress=update)
        finally:
            stop()
        cols = list(dict.fromkeys(k for r in rows for k in r))
        bench.render([{c: r.get(c, "") for c in cols} for r in rows], args.renderer)
        summary = bench.summarize_scale(rows)
        if args.renderer != "json" and summary:
            print()
            bench.render(summary, args.renderer)
    else:
        bench.render(bench.bench_pslist(args.vm, runs=args.runs), args.renderer)
    return 0


def cmd_bench_issue13(args: argparse.Namespace) -> int:
    """bench watch (tick cost), diff (two snapshots), profile-load."""
    from . import bench

    update, stop = _progress()
    try:
        if args.what == "watch":
            tasks = None if args.tasks is None else [int(x) for x in args.tasks.split(",")]
            rows = bench.bench_watch(args.vm, tasks, runs=args.runs, progress=update)
        elif args.what == "diff":
            rows = bench.bench_diff(args.vm, runs=args.runs, workdir=args.workdir, progress=update)
        else:
            rows = bench.bench_profile_load(args.vm, runs=args.runs)
    finally:
        stop()
    bench.render(rows, args.renderer)
    return 0


def cmd_bench_sweep(args: argparse.Namespace) -> int:
    """Every stock Linux plugin live against stock vol -f on a raw copy (or, with -f and
    --reference/--candidate, stock vol with two profiles); exit 1 on any mismatch."""
    import tempfile

    from . import fidelity

    plugins = [p for p in (args.plugins or "").split(",") if p] or None
    update, stop = _progress()
    try:
        with tempfile.TemporaryDirectory(prefix="shadowvol-sweep-", dir=args.workdir) as tmp:
            if args.what == "profiles":
                if not (args.dump and args.reference and args.candidate):
                    raise ShadowvolError("bench profiles needs -f RAW --reference ISF --candidate ISF")
                rows = fidelity.sweep_profiles(Path(args.dump), Path(args.reference), Path(args.candidate),
                                               Path(tmp), plugins=plugins, progress=update)
                labels = ("candidate_s", "reference_s", "profiles give the same rows")
            else:
                rows = fidelity.sweep(args.vm, Path(tmp), plugins=plugins, backend=args.backend,
                                      progress=update, connect=args.connect)
                labels = ("live_s", "dump_s", "live = stock vol on the copy")
    finally:
        stop()
    return _render_sweep(rows, args.renderer, labels)


def _render_sweep(rows: list, renderer: str, labels: tuple[str, str, str]) -> int:
    import json as _json

    from . import bench

    if renderer == "json":
        print(_json.dumps([r.as_dict() for r in rows], indent=1))
    else:
        bench.render([{"plugin": r.plugin, labels[0]: r.live_s, labels[1]: r.dump_s,
                       "rows": r.live_rows if r.live_rows == r.dump_rows else f"{r.live_rows}/{r.dump_rows}",
                       "verdict": r.verdict,
                       "note": (r.live_error or r.dump_error or (r.only_live[:1] or [""])[0])[:90]}
                      for r in rows], "pretty")
        ok = sum(r.ok for r in rows)
        print(f"\n{ok}/{len(rows)} plugins: {labels[2]} "
              f"({sum(r.verdict == 'identical' for r in rows)} identical, "
              f"{sum(r.verdict == 'fails-as-stock' for r in rows)} fail alike)")
    return 0 if all(r.ok for r in rows) else 1


# -- bench overhead and trace-check (issue 4: breakpoint monitor, compartment integrity) --


def cmd_bench_overhead(args: argparse.Namespace) -> int:
    from . import bench

    rows = bench.bench_overhead(args.vm, runs=args.runs, libvmi_runs=args.libvmi_runs,
                                workloads=args.workload)
    if args.renderer == "json":
        bench.render(rows, "json")
        return 0
    cols = list(dict.fromkeys(k for r in rows for k in r))
    bench.render([{c: ("" if r.get(c) is None else r.get(c)) for c in cols} for r in rows], "pretty")
    print()
    bench.render(bench.summarize_event_cost(rows), "pretty")
    return 0


def cmd_trace_check(args: argparse.Namespace) -> int:
    """Verify the stub's code, hooks and rings from outside; exit 3 on tampering."""
    import json as _json

    from .integrity import check_integrity, render_report
    from .target import open_target

    target = open_target(vm=args.vm, profile=args.profile, connect=args.connect)
    try:
        rep = check_integrity(target)
    finally:
        target.close()
    if args.renderer == "json":
        print(_json.dumps(rep.to_json(), indent=1))
    else:
        print(render_report(rep))
    return 0 if rep.ok else 3


def _add_trace_check_parsers(sub: argparse._SubParsersAction, bench_parser: argparse.ArgumentParser) -> None:
    bench_parser.add_argument("--libvmi-runs", type=int, default=1, help="bench overhead: breakpoint runs")
    bench_parser.add_argument("--workload", action="append",
                              help="bench overhead: only these (getppid, forkexec, filecopy, gzip, httpd)")
    from .target import add_source_options

    tc = sub.add_parser("trace-check", help="verify the guest stub's code, hooks and rings from outside")
    add_source_options(tc, dump=False, backend=False)
    tc.add_argument("-r", dest="renderer", default="pretty", choices=["pretty", "json"])
    tc.set_defaults(func=cmd_trace_check)


def cmd_trace(args: argparse.Namespace) -> int:
    """Stream guest events: the stub's rings (shadow) or gdbstub breakpoints (libvmi)."""
    import json

    from .trace.events import Event, format_event

    if not args.duration > 0:
        raise ShadowvolError(f"--duration must be positive, not {args.duration}")
    syscalls, sched, proc = args.syscalls, args.sched, args.proc
    if not (syscalls or sched or proc or args.at):
        syscalls = True
    if args.backend == "libvmi":
        try:
            from .trace.breakpoint import trace_breakpoints as tracer
        except ImportError as exc:
            raise ShadowvolError(f"the libvmi (breakpoint) backend is not available: {exc}") from None
    else:
        from .trace.shadow import trace_shadow as tracer
    out = sys.stdout
    header = [args.renderer == "pretty"]  # printed before the first event, not before an error

    def on_event(ev: Event) -> None:
        if args.pid is not None and ev.pid != args.pid and ev.tgid != args.pid:
            return
        if args.comm is not None and ev.comm != args.comm:
            return
        if header[0]:
            header[0] = False
            out.write(f"{'TIME':>14} {'CPU':>3} {'PID':>6}/{'TGID':<6} {'COMM':<16} EVENT\n")
        if args.renderer == "json":
            out.write(json.dumps(ev.to_json()) + "\n")
        else:
            out.write(format_event(ev) + "\n")

    from .target import open_target

    # Both tracers read guest memory through the shadow layer; --backend picks how
    # events are intercepted (the stub's rings, or gdbstub breakpoints).
    target = open_target(vm=args.vm, profile=args.profile, connect=args.connect)
    try:
        stats = tracer(target, syscalls=syscalls, sched=sched, proc=proc, at=args.at or None,
                       duration=args.duration, on_event=on_event)
    finally:
        target.close()
    out.flush()
    for w in stats.get("warnings", []):
        _say(f"shadowvol: warning: {w}")
    lost, drops = stats.get("lost", 0), stats.get("stub_drops", 0)
    _say(f"shadowvol: trace ({stats.get('backend', args.backend)}): {stats.get('events', 0)} events in "
         f"{stats.get('seconds', 0)} s ({stats.get('events_per_s', 0)}/s), lost {lost} (ring overwritten "
         f"before read), stub drops {drops}")
    _say("shadowvol: trace stats: " + json.dumps(stats))
    return 0


def _add_trace_parser(sub: argparse._SubParsersAction) -> None:
    from .target import add_source_options

    tr = sub.add_parser("trace", help="stream guest events (syscalls, switches, fork/exec/exit, probes)")
    add_source_options(tr, dump=False, backend_help="shadow: the in-guest stub's rings; libvmi: gdbstub "
                       "breakpoints (guest memory is read through the shadow layer either way)")
    tr.add_argument("--syscalls", action="store_true", help="system call entries (the default)")
    tr.add_argument("--sched", action="store_true", help="context switches")
    tr.add_argument("--proc", action="store_true", help="fork, exec and exit")
    tr.add_argument("--at", action="append", metavar="SYMBOL",
                    help="monitor point SYMBOL[+OFF] or 0xADDR (repeatable)")
    tr.add_argument("--duration", type=float, default=5.0, help="seconds (default 5)")
    tr.add_argument("--pid", type=int, help="only events of this pid or tgid")
    tr.add_argument("--comm", help="only events of tasks with this comm")
    tr.add_argument("-r", dest="renderer", default="pretty", choices=["pretty", "json"])
    tr.set_defaults(func=cmd_trace)


def _describe(exc: Exception) -> str:
    """One line for an exception that is not a ShadowvolError."""
    mod = type(exc).__module__ or ""
    if mod.startswith("volatility3"):
        name = type(exc).__name__
        if name in ("InvalidAddressException", "PagedInvalidAddressException"):
            return f"invalid address {getattr(exc, 'invalid_address', 0):#x} in layer {exc.layer_name}"
        return f"volatility3 {name}: {str(exc).splitlines()[0] if str(exc) else ''}"
    text = str(exc).splitlines()[0] if str(exc) else ""
    tb, innermost, plugin = exc.__traceback__, None, None
    marker = f"{os.sep}volatility3{os.sep}"
    while tb is not None:  # whose code failed? the innermost frame, and the stock plugin's
        path = tb.tb_frame.f_code.co_filename
        innermost = path if marker in path else None
        if marker in path and f"{os.sep}plugins{os.sep}" in path:
            plugin = f"{path.split(marker, 1)[1]}:{tb.tb_lineno}"
        tb = tb.tb_next
    if innermost:
        # A stock plugin's own failure (e.g. linux.sockscan on kernels it does not support).
        return f"error inside volatility3 ({plugin or innermost.split(marker, 1)[1]}): {type(exc).__name__}: {text}"
    return f"internal error: {type(exc).__name__}: {text}"


class _OneLineParser(argparse.ArgumentParser):
    """argparse, but usage errors are one-line ShadowvolErrors (exit 1, no usage dump)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise ShadowvolError(f"{self.prog}: {message}")


MAIN_JOB = """\
usage: shadowvol (-vm SPEC | -f DUMP) [options] PLUGIN [plugin options]
       shadowvol plugins
       shadowvol COMMAND ...

Look into live Linux VMs from the outside, in the style of Volatility 3.

The main job: run a Volatility 3 plugin (stock, or ours) on a live VM or a dump.

  shadowvol -vm NAME PLUGIN       a VM: NAME (shadowvol vm list), qmp:/path/qmp.sock or pid:NNN
  shadowvol -f DUMP PLUGIN        a raw, LiME or QEMU dump-guest-memory ELF file
  shadowvol plugins               every plugin, stock and ours, one line each

  e.g. shadowvol -vm web01 linux.pslist
       shadowvol -vm web01 -r json linux.check_syscall
       shadowvol -vm web01 linux.psaux --pid 1      (plugin options after PLUGIN)

"""


class _MainParser(_OneLineParser):
    """The top-level parser: its help shows the main job (a plugin run) first, then the commands."""

    def format_usage(self) -> str:
        return MAIN_JOB.split("\n\n", 1)[0] + "\n"

    def format_help(self) -> str:
        from .run import _top_parser

        run = _top_parser()
        fmt = run._get_formatter()
        fmt.start_section("options of a plugin run (before PLUGIN)")
        fmt.add_arguments([a for a in run._actions if a.option_strings and a.dest != "help"])
        fmt.end_section()
        commands = super().format_help().split("\n\n", 1)[1]  # without argparse's own usage line
        return MAIN_JOB + fmt.format_help() + "\n" + commands


def _add_vm_parser(sub: argparse._SubParsersAction) -> None:
    vm = sub.add_parser("vm", help="build, boot and drive test guests").add_subparsers(
        dest="vmcmd", required=True)
    b = vm.add_parser("build", help="build a guest image from Debian packages")
    b.add_argument("--kernel-package", default="linux-image-cloud-amd64")
    b.add_argument("--force", action="store_true", help="rebuild even if up to date")
    b.set_defaults(func=cmd_vm_build)
    s = vm.add_parser("start", help="boot a guest")
    s.add_argument("name")
    s.add_argument("--image", help="kernel release or package of a built image")
    s.add_argument("--memory", default="512M")
    s.add_argument("--cpus", type=int, default=1)
    s.add_argument("--no-kaslr", action="store_true")
    s.add_argument("--accel", default="auto", choices=["auto", "kvm", "tcg"])
    s.add_argument("--stub-param", action="append", default=[], metavar="K=V",
                   help="guest stub module parameter, e.g. points=__x64_sys_getppid (repeatable)")
    s.add_argument("--anonymous-ram", action="store_true",
                   help="plain QEMU RAM (no shared file), like a VM someone else started")
    s.add_argument("--cpu", help="QEMU CPU model (TCG default: max,la57=off; 'max' gives 5-level paging)")
    s.add_argument("--stub", dest="stub", action="store_true", default=None,
                   help="load the guest stub (default: whenever the image has it)")
    s.add_argument("--no-stub", dest="stub", action="store_false", help="boot without the guest stub")
    s.add_argument("--timeout", type=float, default=120.0)
    s.set_defaults(func=cmd_vm_start)
    vl = vm.add_parser("list", help="list running guests (ours, then libvirt's, read-only)")
    vl.add_argument("--connect", metavar="URI", help="libvirt URI (default qemu:///system)")
    vl.set_defaults(func=cmd_vm_list)
    st = vm.add_parser("stop", help="stop a guest and remove its files")
    st.add_argument("name")
    st.set_defaults(func=cmd_vm_stop)
    ex = vm.add_parser("exec", help="run a command in the guest (tests and demos only)")
    ex.add_argument("name")
    ex.add_argument("--timeout", type=float, default=120.0)
    ex.add_argument("command", nargs=argparse.REMAINDER)
    ex.set_defaults(func=cmd_vm_exec)
    cp = vm.add_parser("cp", help="copy a file into the guest (tests and demos only)")
    cp.add_argument("name")
    cp.add_argument("host_file")
    cp.add_argument("guest_path")
    cp.set_defaults(func=cmd_vm_cp)
    bn = vm.add_parser("banner", help="print the kernel banner found in guest RAM")
    bn.add_argument("name")
    bn.set_defaults(func=cmd_vm_banner)


def build_parser() -> argparse.ArgumentParser:
    p = _MainParser(prog="shadowvol", usage=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="cmd", required=True, title="commands", metavar="COMMAND",
                           prog="shadowvol", parser_class=_OneLineParser)
    _add_vm_parser(sub)
    pr = sub.add_parser("profile", help="symbol profiles (ISF)").add_subparsers(dest="prcmd", required=True)
    pb = pr.add_parser("build", help="build an ISF from a kernel image, no debug package needed")
    pb.add_argument("--vmlinuz", help="compressed kernel (types from .BTF, symbols from kallsyms)")
    pb.add_argument("--vmlinux", help="ELF kernel (DWARF when present)")
    pb.add_argument("--system-map", help="symbols from a System.map instead")
    pb.add_argument("--headers", help="extracted linux-headers, to type global variables")
    pb.add_argument("-o", "--output", help="write here (.json or .json.xz) instead of the store")
    pb.add_argument("--force", action="store_true",
                    help="replace a stored profile even if it has more typed symbols")
    pb.set_defaults(func=cmd_profile_build)
    pd = pr.add_parser("diff", help="compare two ISF profiles on what plugins use (A: reference)")
    pd.add_argument("a", help="reference profile (.json, .json.xz), e.g. from DWARF")
    pd.add_argument("b", help="profile to check against it")
    pd.add_argument("--stock", action="store_true",
                    help="only the types and symbols stock volatility3 Linux plugins reference")
    pd.add_argument("-r", dest="renderer", default="text", choices=["text", "json"])
    pd.add_argument("--limit", type=int, default=40, help="differences listed per category (text)")
    pd.set_defaults(func=cmd_profile_diff)
    from .target import add_source_options

    rd = sub.add_parser("read", help="hex dump of guest memory (kernel virtual, or --physical)")
    add_source_options(rd)
    rd.add_argument("--physical", action="store_true")
    rd.add_argument("address", type=_int)
    rd.add_argument("length", type=_int, nargs="?", default=64)
    rd.set_defaults(func=cmd_read)
    pl = sub.add_parser("plugins", help="list every plugin (stock volatility3 and ours)")
    pl.add_argument("-r", dest="renderer", default="pretty", choices=["pretty", "json"])
    pl.set_defaults(func=cmd_plugins)
    be = sub.add_parser("bench", help="benchmarks: read latency, end-to-end pslist, plugin sweep")
    be.add_argument("what", choices=["reads", "pslist", "overhead", "sweep", "scan", "scale", "floor", "profiles",
                                     "watch", "diff", "profile-load", "libvirt"])
    be.add_argument("--reference", help="profiles: the reference ISF (e.g. from DWARF)")
    be.add_argument("--candidate", help="profiles: the ISF checked against it (e.g. zero-config)")
    be.add_argument("--tasks", default=None,
                    help="scale (default 0,500,1000,2000), watch (default: the guest as it is): "
                         "idle tasks to add, per step")
    be.add_argument("--vmlinux", help="scale: debug vmlinux for drgn --qemu (from linux-image-*-dbg)")
    add_source_options(be, required=False, profile=False, backend_help="sweep: the backend of the live runs")
    be.add_argument("--domain", help="libvirt: the libvirt domain timed against -vm (one of ours)")
    be.add_argument("--plugins", help="sweep: comma-separated plugins (default: every stock Linux plugin)")
    be.add_argument("--workdir", default="/var/tmp", help="sweep: where the raw copy is written")
    be.add_argument("-r", dest="renderer", default="pretty", choices=["pretty", "json"])
    be.add_argument("--runs", type=int, default=3)
    be.set_defaults(func=cmd_bench)
    _add_trace_check_parsers(sub, be)
    _add_trace_parser(sub)
    from . import diff, snapshot, watch

    snapshot.add_parser(sub)
    watch.add_parser(sub)
    diff.add_parser(sub)
    _add_stub_parser(sub)
    d = sub.add_parser("demo", help="build and boot web01, then list its processes from outside")
    d.add_argument("name", nargs="?", default="web01")
    d.set_defaults(func=cmd_demo)
    return p


def entry() -> None:
    """The ``shadowvol`` command: :func:`main`, then an exit without the heap's teardown.

    A plugin run leaves every volatility3 object it built alive until exit
    (one per member read: ~300,000 at 2,000 tasks), and the interpreter
    frees them one by one as it finalizes: 0.57 s of pslist's 1.75 s there.
    Once the output is flushed and the exit handlers have run (logging,
    temporary directories, weakref finalizers: everything ``atexit`` holds),
    what is left is memory, which the kernel takes back at once. Anything
    unusual (other threads still running, an output that will not flush)
    leaves through the normal ``sys.exit``. volatility3's log lines go
    through :func:`~shadowvol.run.printable_volatility_log` in this process.
    """
    import atexit
    import threading

    from .run import printable_volatility_log

    printable_volatility_log()
    rc = main()
    if threading.active_count() != 1:
        sys.exit(rc)
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except OSError:
        sys.exit(rc)  # Python reports a closed pipe at exit as it always does
    atexit._run_exitfuncs()
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except OSError:
        rc = rc or 1
    os._exit(rc)


@contextmanager
def terminate_as_exception() -> Iterator[None]:
    """Turn SIGTERM and SIGHUP into :class:`Terminated` for the block (main thread
    only; the handlers before are restored after it). Python's default for them
    ends the process at once, skipping every ``finally``: a ``timeout 10 shadowvol
    trace --backend libvmi`` then left the VM stopped at a breakpoint for good.
    A second signal during the clean-up is ignored (SIGKILL still ends us)."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return

    signals = (signal.SIGTERM, signal.SIGHUP)

    def handler(signum: int, frame: object) -> None:
        for s in signals:
            signal.signal(s, signal.SIG_IGN)
        raise Terminated(signum)

    before = {s: signal.signal(s, handler) for s in signals}
    try:
        yield
    finally:
        for s, h in before.items():
            signal.signal(s, h)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        with terminate_as_exception():
            return _main(argv)
    except Terminated as exc:
        return 128 + exc.signum


def _main(argv: list[str]) -> int:
    try:
        if not argv:
            sys.stderr.write(build_parser().format_usage() + "'shadowvol --help' says more.\n")
            return 1
        if argv and not argv[0].startswith("-") and argv[0] not in SUBCOMMANDS:
            from .safeio import short

            raise ShadowvolError(
                f"unknown command {short(argv[0], 40)!r}: commands are {', '.join(SUBCOMMANDS)}; "
                "a plugin runs as 'shadowvol -vm NAME PLUGIN' or 'shadowvol -f DUMP PLUGIN'")
        if argv and argv[0] not in SUBCOMMANDS and not argv[0] in ("-h", "--help"):
            from .run import run_plugin_cli

            return run_plugin_cli(argv)
        args = build_parser().parse_args(argv)
        return int(args.func(args) or 0)
    except ShadowvolError as exc:
        print(f"shadowvol: error: {printable(str(exc), layout=True)}", file=sys.stderr)  # may quote the guest
        return getattr(exc, "exit_code", 1)  # 3: an incomplete input (TruncatedError)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 1
    except Exception as exc:  # a bug or a volatility3 failure: still one line
        if os.environ.get("SHADOWVOL_DEBUG"):
            raise
        print(f"shadowvol: error: {printable(_describe(exc), layout=True)} "
              "(SHADOWVOL_DEBUG=1 shows the traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
