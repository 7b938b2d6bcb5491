"""``shadowvol diff A B``: what changed between two moments, as kernel objects.

A and B are snapshot folders (``shadowvol snapshot``) or ``-vm NAME`` (the
live VM now). Each kind of object is listed by one plugin on each side
(:data:`KINDS`): processes (added, exited, changed comm/parent/uids) from
``linux.pslist``, modules (loaded, unloaded, moved) from ``linux.lsmod`` and
hidden ones from ``linux.hidden_modules``, ``sys_call_table``/``x64_sys_call``
targets and handler-entry hooks from ``linux.check_syscall``, IDT gates from
``linux.check_idt``, netfilter hooks, eBPF programs and ftrace hooks from the
stock plugins, and the sha256 of each kernel text page (:func:`kernel_text_rows`).
"""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Iterable

from .errors import ShadowvolError
from .textsafe import printable

__all__ = ["Kind", "KINDS", "kind_changes", "kernel_text_hashes", "name_text_rows", "kernel_text_rows",
           "process_changes", "module_changes", "diff_sides", "render_text"]

@dataclass(frozen=True)
class Kind:
    """One kind of kernel object: the plugin listing it, the columns naming one
    object (``key``), those shown as its identity, and those compared."""

    name: str
    plugin: str
    key: tuple[str, ...]
    ident: dict[str, str]
    fields: dict[str, str] = field(default_factory=dict)

    def key_of(self, row: dict[str, Any]) -> tuple[Any, ...]:
        return tuple(row.get(c) for c in self.key) if self.key else \
            tuple(sorted((k, str(v)) for k, v in row.items()))


KINDS: dict[str, Kind] = {k.name: k for k in (
    # A pid reused by a new process is a different process: pid + creation time.
    Kind("process", "linux.pslist", ("PID", "CREATION TIME"), {"PID": "pid", "COMM": "comm"},
         {"COMM": "comm", "PPID": "ppid", "UID": "uid", "EUID": "euid", "GID": "gid", "EGID": "egid"}),
    Kind("module", "linux.lsmod", ("Module Name",), {"Module Name": "name"},
         {"Offset": "offset", "Code Size": "size", "Taints": "taints"}),
    Kind("hidden_module", "linux.hidden_modules", ("Name", "Offset(V)"), {"Name": "name", "Offset(V)": "address"},
         {"Hidden": "hidden", "module_list": "in_list", "sysfs": "in_sysfs", "carve": "carved"}),
    Kind("syscall", "linux.check_syscall", ("Check", "Index"), {"Check": "check", "Index": "number",
                                                                "Syscall": "syscall"},
         {"Target": "target", "Symbol": "symbol", "Owner": "owner", "Hooked": "hooked"}),
    Kind("idt", "linux.check_idt", ("Index",), {"Index": "vector"},
         {"Address": "address", "Symbol": "symbol", "Owner": "owner", "Hooked": "hooked", "Present": "present",
          "Type": "type"}),
    Kind("netfilter", "linux.malware.netfilter.Netfilter", (),
         {"Proto": "proto", "Hook": "hook", "Priority": "priority", "Symbol": "symbol", "Module": "module"}),
    Kind("ebpf", "linux.ebpf", ("Address", "Tag"), {"Name": "name", "Type": "type", "Tag": "tag",
                                                    "Address": "address"}),
    # Read-only kernel text, page by page from _stext to _etext, named by the symbol at each page start.
    Kind("text", "", ("Offset",), {"Symbol": "symbol", "Offset": "offset"}, {"SHA256": "sha256"}),
    Kind("ftrace", "linux.tracing.ftrace.CheckFtrace", (), {"Callback": "callback", "Hooked symbols": "hooked",
                                                           "Module": "module"}),
)}
#: Kinds compared unless --kinds says otherwise.
DEFAULT_KINDS = ("process", "module", "hidden_module", "syscall", "idt", "netfilter", "ebpf", "ftrace", "text")


def _pick(row: dict[str, Any], fields: dict[str, str]) -> dict[str, Any]:
    return {name: row.get(col) for col, name in fields.items()}


def _sort_key(key: tuple[Any, ...]) -> tuple:
    return tuple((v is None, v if isinstance(v, (int, float)) else 0, str(v)) for v in key)


def kind_changes(kind: Kind, before: Iterable[dict[str, Any]], after: Iterable[dict[str, Any]]
                 ) -> list[dict[str, Any]]:
    """Change rows of one kind between two results of its plugin (rows as dicts of its columns)."""
    a = {kind.key_of(r): r for r in before}
    b = {kind.key_of(r): r for r in after}
    out = []
    for key in sorted(set(a) | set(b), key=_sort_key):
        ra, rb = a.get(key), b.get(key)
        ident = {name: (rb or ra).get(col) for col, name in kind.ident.items() if col in (rb or ra)}
        if ra is None:
            out.append({"kind": kind.name, "change": "added", **ident, "before": None,
                        "after": _pick(rb, kind.fields)})
        elif rb is None:
            out.append({"kind": kind.name, "change": "removed", **ident, "before": _pick(ra, kind.fields),
                        "after": None})
        else:
            va, vb = _pick(ra, kind.fields), _pick(rb, kind.fields)
            if va != vb:
                changed = [k for k in va if va[k] != vb[k]]
                out.append({"kind": kind.name, "change": "changed", **ident,
                            "before": {k: va[k] for k in changed}, "after": {k: vb[k] for k in changed}})
    return out


def process_changes(before: Iterable[dict[str, Any]], after: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Processes added, exited, or changed (comm, parent, uids/gids), from ``linux.pslist`` rows."""
    return kind_changes(KINDS["process"], before, after)


def module_changes(before: Iterable[dict[str, Any]], after: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Modules loaded, unloaded, or moved, from ``linux.lsmod`` rows."""
    return kind_changes(KINDS["module"], before, after)


def kernel_text_hashes(target: Any) -> list[dict[str, Any]]:
    """sha256 of each 4 KiB page of kernel text (``_stext`` to ``_etext``) read through the
    kernel's page tables, ``Offset`` from ``_stext`` (the same across KASLR slides).

    The text is mapped in a few physically contiguous runs: each run is read
    once and its pages hashed from a view of it (no read per page)."""
    import hashlib

    shift = target.location.virt_shift
    lo, hi = target.symbol_address("_stext") - shift, target.symbol_address("_etext") - shift
    digests: dict[int, str] = {}
    for vaddr, n, paddr in target.kernel.mapping(lo + shift, hi - lo, ignore_errors=True):
        try:
            data = memoryview(target.memory.read(paddr, n))
        except ShadowvolError:
            continue  # a frame outside the image: its pages stay "unmapped"
        first = vaddr - shift
        page = first & ~0xFFF
        while page < first + n:
            a, b = max(page, first), min(page + 0x1000, first + n)
            if a == max(page, lo) and b == min(page + 0x1000, hi):  # the whole (clipped) page is in this run
                digests[page] = hashlib.sha256(data[a - first:b - first]).hexdigest()
            page += 0x1000
    return [{"Offset": max(page, lo) - lo, "SHA256": digests.get(page, "unmapped")}
            for page in range(lo & ~0xFFF, hi, 0x1000)]


def name_text_rows(isf: Any, rows: list[dict[str, Any]], column: str = "Offset") -> None:
    """Set ``Symbol`` in text rows: the text symbol at or before the page start
    (``name+0xoff``), from the profile alone."""
    from .profiles import TextSymbols, profile_addresses

    lo = profile_addresses(isf)["_stext"]
    text = TextSymbols(isf)
    for row in rows:
        start = lo + row[column]
        enclosing = text.enclosing(start)
        row["Symbol"] = f"{enclosing[1]}+{start - enclosing[0]:#x}" if enclosing else f"{start:#x}"


def kernel_text_rows(target: Any) -> list[dict[str, Any]]:
    """:func:`kernel_text_hashes`, each page named by the text symbol at its start."""
    rows = kernel_text_hashes(target)
    name_text_rows(target.isf, rows)
    return [{"Offset": r["Offset"], "Symbol": r["Symbol"], "SHA256": r["SHA256"]} for r in rows]


def _side_rows(vm: str | None, dump: str | None, kinds: Iterable[str], connect: str | None = None
               ) -> tuple[dict[str, list[dict[str, Any]]], str]:
    """Each kind's plugin rows on one side, and its profile's path.

    One target, one epoch and one volatility3 context for all kinds: the
    symbol table's resolved types and its symbol index (built by the first
    plugin that looks a symbol up by address) serve the plugins after it.
    Text pages are hashed, not named (:func:`name_text_rows` names the
    changed ones afterwards)."""
    from . import volbridge
    from .target import open_target
    from .watch import grid_rows

    import gc

    # A side allocates ~100k objects that live as long as it (symbols, templates,
    # the index over them) and hardly any cycles: the collections they trigger only
    # re-traverse them (a third of a side's time; +5 MB peak RSS without them).
    collecting = gc.isenabled()
    gc.disable()
    target = open_target(vm=vm, dump=dump, connect=connect)
    try:
        boot = volbridge.BootContext(target.memory, target.kernel, target.location, target.isf,
                                     isf_url=target.profile_path.as_uri())
        out: dict[str, list[dict[str, Any]]] = {}
        for k in kinds:
            if k == "text":
                out[k] = kernel_text_hashes(target)
                continue
            boot.clear_plugin_state()
            out[k] = grid_rows(boot.construct(volbridge.load_plugin(KINDS[k].plugin), {}).run())
        return out, str(target.profile_path)
    finally:
        target.close()
        if collecting:
            gc.enable()


def _side_job(job: tuple[str | None, str | None, list[str], str | None]
              ) -> tuple[dict[str, list[dict[str, Any]]], str]:
    return _side_rows(*job)


def _both_sides(a: tuple[str | None, str | None], b: tuple[str | None, str | None], kinds: list[str],
                connect: str | None = None
                ) -> tuple[tuple[dict[str, list[dict[str, Any]]], str], tuple[dict[str, list[dict[str, Any]]], str]]:
    """Both sides' rows, the two sides in two processes when there are two CPUs (each side is CPU-bound)."""
    jobs = [(*a, kinds, connect), (*b, kinds, connect)]
    if (os.cpu_count() or 1) < 2:
        return _side_job(jobs[0]), _side_job(jobs[1])
    import concurrent.futures
    import multiprocessing

    with concurrent.futures.ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("fork")) as pool:
        ra, rb = pool.map(_side_job, jobs)
    return ra, rb


def diff_sides(a: tuple[str | None, str | None], b: tuple[str | None, str | None],
               kinds: Iterable[str] = DEFAULT_KINDS, connect: str | None = None) -> list[dict[str, Any]]:
    """Change rows from side ``a`` to side ``b``; each side is ``(vm, dump)``, one of them set.
    ``connect``: the libvirt URI of a ``vm`` naming a libvirt domain."""
    kinds = list(kinds)
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise ShadowvolError(f"diff: unknown kind {unknown[0][:40]!r}: kinds are {', '.join(KINDS)}")
    from . import volbridge

    for k in kinds:  # imported once here, before the sides fork (capstone, stock plugin modules)
        if KINDS[k].plugin:
            volbridge.load_plugin(KINDS[k].plugin)
    (ra, _), (rb, profile_b) = _both_sides(a, b, kinds, connect)
    out: list[dict[str, Any]] = []
    for k in kinds:
        changes = kind_changes(KINDS[k], ra[k], rb[k])
        if k == "text" and changes:
            from pathlib import Path

            from . import profiles

            name_text_rows(profiles.load_profile(Path(profile_b)), changes, column="offset")
            changes = [{"kind": r["kind"], "change": r["change"], "symbol": r.pop("Symbol"), **{
                c: v for c, v in r.items() if c not in ("kind", "change")}} for r in changes]
        out += changes
    return out


_HEX = {"offset", "address", "target"}


def _values(d: dict[str, Any] | None) -> str:
    if not d:
        return "-"
    return " ".join(f"{k}={hex(v) if k in _HEX and isinstance(v, int) else v}" for k, v in d.items())


def render_text(rows: list[dict[str, Any]]) -> str:
    """One line per change: kind, change, identity, before -> after."""
    lines = []
    for r in rows:
        ident = " ".join(f"{k}={v}" for k, v in r.items() if k not in ("kind", "change", "before", "after"))
        if r["change"] == "added":
            what = _values(r["after"])
        elif r["change"] == "removed":
            what = _values(r["before"])
        else:
            what = f"{_values(r['before'])} -> {_values(r['after'])}"
        lines.append(printable(f"{r['kind']:<8} {r['change']:<8} {ident:<32} {what}"))
    return "\n".join(lines) + ("\n" if lines else "")


def cmd_diff(args: Any) -> int:
    from . import volbridge

    volbridge.quiet_volatility()
    sides: list[tuple[str | None, str | None]] = [(None, path) for path in args.sides]
    if args.vm:
        sides.append((args.vm, None))
    if len(sides) != 2:
        raise ShadowvolError("diff: give two sides: A B (snapshot folders), or A -vm NAME (the VM now)")
    t0 = time.perf_counter()
    if args.connect is not None and not args.vm:
        raise ShadowvolError("diff: --connect is the libvirt URI of -vm NAME; two snapshot folders need none")
    rows = diff_sides(sides[0], sides[1], [k for k in args.kinds.split(",") if k], connect=args.connect)
    if args.renderer == "json":
        print(json.dumps(rows, indent=1, default=str))
    else:
        sys.stdout.write(render_text(rows) or "no changes\n")
    if args.stats:
        print(f"shadowvol: diff took {(time.perf_counter() - t0) * 1000:.0f} ms", file=sys.stderr)
    return 0


def add_parser(sub: Any) -> None:
    """``shadowvol diff``."""
    from .target import add_source_options

    dp = sub.add_parser("diff", help="what changed between two snapshots (or a snapshot and the VM now)")
    dp.add_argument("sides", nargs="*", metavar="A B", help="snapshot folders")
    add_source_options(dp, dump=False, backend=False, profile=False, required=False)  # -vm: the VM now, as B
    dp.add_argument("--kinds", default=",".join(DEFAULT_KINDS),
                    help=f"comma-separated, of: {', '.join(KINDS)} (default: all)")
    dp.add_argument("-r", dest="renderer", default="text", choices=["text", "json"])
    dp.add_argument("--stats", action="store_true", help="time taken, on stderr")
    dp.set_defaults(func=cmd_diff)
