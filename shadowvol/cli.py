"""The ``shadowvol`` command line.

    shadowvol vm build|start|list|stop|exec|cp|banner ...
    shadowvol demo
    shadowvol profile build --vmlinuz FILE ...
    shadowvol bench reads|pslist -vm NAME
    shadowvol -vm NAME [--backend shadow|libvmi] [-r pretty|json|csv] PLUGIN [ARGS]
    shadowvol -f DUMP [-r ...] PLUGIN [ARGS]

Modules are imported only when their command runs: start-up time counts.
Errors meant for the user print as one line (``shadowvol: error: ...``) with a
non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .errors import ShadowvolError

SUBCOMMANDS = ("vm", "demo", "profile", "bench", "trace")


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
    return 0


def cmd_vm_start(args: argparse.Namespace) -> int:
    from .vm.image import find_image
    from .vm.qemu import parse_memory, start_vm
    from .vm.registry import validate_name

    validate_name(args.name)
    parse_memory(args.memory)
    img = find_image(args.image)
    update, stop = _progress()
    update(f"booting {args.name} ({img.release})")
    try:
        e = start_vm(args.name, img, memory=args.memory, cpus=args.cpus, kaslr=not args.no_kaslr,
                     accel=args.accel, stub=args.stub, timeout=args.timeout, cpu=args.cpu)
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
    head = ("NAME", "PID", "STATE", "MEMORY", "KERNEL", "ACCEL", "ENDPOINTS")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head) - 1)]
    for r in [head, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1])
    return 0


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
    from .vm.registry import get_vm
    from .banner import find_banners

    e = get_vm(args.name)
    found = find_banners(e.ram_file)
    if not found:
        raise ShadowvolError(f"no Linux banner found in {args.name}'s memory")
    paddr, text = found[0]
    print(f"{args.name}: banner at physical {paddr:#x}: {text}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Build the default image, boot web01 if needed, and show what its memory holds."""
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
    return cmd_vm_banner(args)


def cmd_profile_build(args: argparse.Namespace) -> int:
    from . import profiles, symbols

    if not (args.vmlinuz or args.vmlinux):
        raise ShadowvolError("profile build needs --vmlinuz FILE or --vmlinux FILE")
    for f in (args.vmlinuz, args.vmlinux, args.system_map, args.headers):
        if f and not Path(f).exists():
            raise ShadowvolError(f"{f} does not exist")
    report = symbols.ProfileReport()
    isf = symbols.build_profile(vmlinuz=args.vmlinuz and Path(args.vmlinuz),
                                vmlinux=args.vmlinux and Path(args.vmlinux),
                                system_map=args.system_map and Path(args.system_map),
                                headers=args.headers and Path(args.headers), report=report)
    if args.output:
        out = symbols.write_profile(isf, Path(args.output))
    else:
        out = profiles.write_profile(isf, f"linux-{report.release or 'unknown'}")
    print(f"{out}: {report.release}, {report.symbols} symbols ({report.symbol_source}), "
          f"{report.typed_symbols} typed, types from {report.type_source}")
    for note in report.notes:
        print(f"  note: {note}")
    return 0


def cmd_bench(args: argparse.Namespace) -> int:
    from . import bench

    if args.what == "reads":
        rows = bench.bench_reads(args.vm)
        bench.render(rows, args.renderer)
        if args.renderer != "json":
            print()
            bench.render(bench.summarize_reads(rows), args.renderer)
    else:
        bench.render(bench.bench_pslist(args.vm, runs=args.runs), args.renderer)
    return 0


def _describe(exc: Exception) -> str:
    """One line for an exception that is not a ShadowvolError."""
    mod = type(exc).__module__ or ""
    if mod.startswith("volatility3"):
        name = type(exc).__name__
        if name in ("InvalidAddressException", "PagedInvalidAddressException"):
            return f"invalid address {getattr(exc, 'invalid_address', 0):#x} in layer {exc.layer_name}"
        return f"volatility3 {name}: {str(exc).splitlines()[0] if str(exc) else ''}"
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"internal error: {type(exc).__name__}: {text}"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="shadowvol", description="Introspect live Linux VMs.")
    sub = p.add_subparsers(dest="cmd", required=True)
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
    s.add_argument("--cpu", help="QEMU CPU model (TCG default: max,la57=off; 'max' gives 5-level paging)")
    s.add_argument("--stub", dest="stub", action="store_true", default=None,
                   help="load the guest stub (default: when the image has it)")
    s.add_argument("--no-stub", dest="stub", action="store_false")
    s.add_argument("--timeout", type=float, default=120.0)
    s.set_defaults(func=cmd_vm_start)
    vm.add_parser("list", help="list running guests").set_defaults(func=cmd_vm_list)
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
    pr = sub.add_parser("profile", help="symbol profiles (ISF)").add_subparsers(dest="prcmd", required=True)
    pb = pr.add_parser("build", help="build an ISF from a kernel image, no debug package needed")
    pb.add_argument("--vmlinuz", help="compressed kernel (types from .BTF, symbols from kallsyms)")
    pb.add_argument("--vmlinux", help="ELF kernel (DWARF when present)")
    pb.add_argument("--system-map", help="symbols from a System.map instead")
    pb.add_argument("--headers", help="extracted linux-headers, to type global variables")
    pb.add_argument("-o", "--output", help="write here (.json or .json.xz) instead of the store")
    pb.set_defaults(func=cmd_profile_build)
    be = sub.add_parser("bench", help="benchmarks: read latency, end-to-end pslist")
    be.add_argument("what", choices=["reads", "pslist"])
    be.add_argument("-vm", dest="vm", default="web01")
    be.add_argument("-r", dest="renderer", default="pretty", choices=["pretty", "json"])
    be.add_argument("--runs", type=int, default=3)
    be.set_defaults(func=cmd_bench)
    d = sub.add_parser("demo", help="build and boot web01, then read its memory")
    d.add_argument("name", nargs="?", default="web01")
    d.set_defaults(func=cmd_demo)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] not in SUBCOMMANDS and not argv[0] in ("-h", "--help"):
            from .run import run_plugin_cli

            return run_plugin_cli(argv)
        args = build_parser().parse_args(argv)
        return int(args.func(args) or 0)
    except ShadowvolError as exc:
        print(f"shadowvol: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        return 1
    except Exception as exc:  # a bug or a volatility3 failure: still one line
        if os.environ.get("SHADOWVOL_DEBUG"):
            raise
        print(f"shadowvol: error: {_describe(exc)} (SHADOWVOL_DEBUG=1 shows the traceback)",
              file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
