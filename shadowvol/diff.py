"""``shadowvol diff A B``: what changed between two moments, as kernel objects.

A and B are snapshot folders (``shadowvol snapshot``) or ``-vm NAME`` (the
live VM now). Compared so far: processes (added, exited, changed uid/euid,
comm, parent) from ``linux.pslist``, and modules (loaded, unloaded, moved)
from ``linux.lsmod``.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any, Iterable

from .errors import ShadowvolError

__all__ = ["process_changes", "module_changes", "diff_sides", "render_text"]

#: pslist columns compared for a process that exists on both sides.
PROCESS_FIELDS = {"COMM": "comm", "PPID": "ppid", "UID": "uid", "EUID": "euid", "GID": "gid", "EGID": "egid"}
MODULE_FIELDS = {"Offset": "offset", "Code Size": "size", "Taints": "taints"}


def _process_key(row: dict[str, Any]) -> tuple[Any, Any]:
    # A pid reused by a new process is a different process: pid + creation time.
    return row.get("PID"), row.get("CREATION TIME")


def _pick(row: dict[str, Any], fields: dict[str, str]) -> dict[str, Any]:
    return {name: row.get(col) for col, name in fields.items()}


def process_changes(before: Iterable[dict[str, Any]], after: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Change rows between two ``linux.pslist`` results (rows as dicts of its columns)."""
    a = {_process_key(r): r for r in before}
    b = {_process_key(r): r for r in after}
    out = []
    for key in sorted(set(a) | set(b), key=lambda k: (k[0] is None, k[0] or 0, str(k[1]))):
        ra, rb = a.get(key), b.get(key)
        ident = {"pid": key[0], "comm": (rb or ra).get("COMM")}
        if ra is None:
            out.append({"kind": "process", "change": "added", **ident, "before": None,
                        "after": _pick(rb, PROCESS_FIELDS)})
        elif rb is None:
            out.append({"kind": "process", "change": "removed", **ident, "before": _pick(ra, PROCESS_FIELDS),
                        "after": None})
        else:
            va, vb = _pick(ra, PROCESS_FIELDS), _pick(rb, PROCESS_FIELDS)
            if va != vb:
                changed = [k for k in va if va[k] != vb[k]]
                out.append({"kind": "process", "change": "changed", **ident,
                            "before": {k: va[k] for k in changed}, "after": {k: vb[k] for k in changed}})
    return out


def module_changes(before: Iterable[dict[str, Any]], after: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Change rows between two ``linux.lsmod`` results."""
    a = {r.get("Module Name"): r for r in before}
    b = {r.get("Module Name"): r for r in after}
    out = []
    for name in sorted(set(a) | set(b), key=str):
        ra, rb = a.get(name), b.get(name)
        if ra is None:
            out.append({"kind": "module", "change": "added", "name": name, "before": None,
                        "after": _pick(rb, MODULE_FIELDS)})
        elif rb is None:
            out.append({"kind": "module", "change": "removed", "name": name,
                        "before": _pick(ra, MODULE_FIELDS), "after": None})
        else:
            va, vb = _pick(ra, MODULE_FIELDS), _pick(rb, MODULE_FIELDS)
            if va != vb:
                changed = [k for k in va if va[k] != vb[k]]
                out.append({"kind": "module", "change": "changed", "name": name,
                            "before": {k: va[k] for k in changed}, "after": {k: vb[k] for k in changed}})
    return out


KINDS = {"process": ("linux.pslist", process_changes), "module": ("linux.lsmod", module_changes)}


def _side_rows(vm: str | None, dump: str | None) -> dict[str, list[dict[str, Any]]]:
    """Each kind's plugin rows on one side (one target, one epoch)."""
    from .run import run_plugin
    from .target import open_target
    from .watch import grid_rows

    target = open_target(vm=vm, dump=dump)
    try:
        return {kind: grid_rows(run_plugin(target, plugin, {})) for kind, (plugin, _) in KINDS.items()}
    finally:
        target.close()


def diff_sides(a: tuple[str | None, str | None], b: tuple[str | None, str | None]) -> list[dict[str, Any]]:
    """Change rows from side ``a`` to side ``b``; each side is ``(vm, dump)``, one of them set."""
    ra, rb = _side_rows(*a), _side_rows(*b)
    out: list[dict[str, Any]] = []
    for kind, (_, compare) in KINDS.items():
        out += compare(ra[kind], rb[kind])
    return out


def _values(d: dict[str, Any] | None) -> str:
    if not d:
        return "-"
    return " ".join(f"{k}={hex(v) if k == 'offset' and isinstance(v, int) else v}" for k, v in d.items())


def render_text(rows: list[dict[str, Any]]) -> str:
    """One line per change: kind, change, identity, before -> after."""
    lines = []
    for r in rows:
        ident = f"pid={r['pid']} comm={r['comm']}" if r["kind"] == "process" else f"name={r['name']}"
        if r["change"] == "added":
            what = _values(r["after"])
        elif r["change"] == "removed":
            what = _values(r["before"])
        else:
            what = f"{_values(r['before'])} -> {_values(r['after'])}"
        lines.append(f"{r['kind']:<8} {r['change']:<8} {ident:<32} {what}")
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
    rows = diff_sides(sides[0], sides[1])
    if args.renderer == "json":
        print(json.dumps(rows, indent=1, default=str))
    else:
        sys.stdout.write(render_text(rows) or "no changes\n")
    if args.stats:
        print(f"shadowvol: diff took {(time.perf_counter() - t0) * 1000:.0f} ms", file=sys.stderr)
    return 0


def add_parser(sub: Any) -> None:
    """``shadowvol diff``."""
    dp = sub.add_parser("diff", help="what changed between two snapshots (or a snapshot and the VM now)")
    dp.add_argument("sides", nargs="*", metavar="A B", help="snapshot folders")
    dp.add_argument("-vm", dest="vm", help="the live VM now as the second side (A -vm NAME)")
    dp.add_argument("-r", dest="renderer", default="text", choices=["text", "json"])
    dp.add_argument("--stats", action="store_true", help="time taken, on stderr")
    dp.set_defaults(func=cmd_diff)
