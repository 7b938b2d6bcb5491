"""``shadowvol watch``: run a plugin on a live VM every few seconds, print what changed.

One process: the kernel is located and the profile loaded once. Each tick is
a new epoch (the translation cache is invalidated and run_plugin builds a new
volatility3 context), and only rows that appeared (``+``) or disappeared
(``-``) since the previous tick are printed.
"""

from __future__ import annotations

import collections
import datetime
import json
import os
import sys
import threading
import time
from typing import Any, Iterable, TextIO

from .errors import ShadowvolError, VMError

__all__ = ["grid_rows", "hex_columns", "row_key", "diff_rows", "watch"]


def _plain(value: Any) -> Any:
    """A renderer cell as JSON: ints (Hex included), text, None for absent values."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    if isinstance(value, (bytes, bytearray)):
        return bytes(value).hex()
    if isinstance(value, (datetime.datetime, datetime.date)):
        return value.isoformat()
    if any(c.__name__ == "BaseAbsentValue" for c in type(value).__mro__):
        return None  # UnreadableValue, NotApplicableValue, NotAvailableValue (as the JSON renderer)
    return str(value)


def grid_rows(grid: Any) -> list[dict[str, Any]]:
    """The rows of a populated TreeGrid, each a dict of column name -> JSON value."""
    names = [c.name for c in grid.columns]
    rows: list[dict[str, Any]] = []

    def visit(node: Any, acc: list) -> list:
        acc.append({n: _plain(v) for n, v in zip(names, node.values)})
        return acc

    grid.populate(visit, rows)
    return rows


def row_key(row: dict[str, Any]) -> str:
    """A row's identity: its fields as canonical JSON."""
    return json.dumps(row, sort_keys=True, default=str)


def diff_rows(before: Iterable[dict[str, Any]], after: Iterable[dict[str, Any]]
              ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(appeared, disappeared) between two lists of rows, as multisets, each in its list's order."""
    before, after = list(before), list(after)
    a = collections.Counter(row_key(r) for r in before)
    b = collections.Counter(row_key(r) for r in after)
    added, gone = b - a, a - b
    appeared, disappeared = [], []
    for row in after:
        k = row_key(row)
        if added[k] > 0:
            added[k] -= 1
            appeared.append(row)
    for row in before:
        k = row_key(row)
        if gone[k] > 0:
            gone[k] -= 1
            disappeared.append(row)
    return appeared, disappeared


def _vm_alive(vm: str) -> bool:
    """The VM behind ``-vm SPEC`` still exists (its QEMU answers QMP, or its pid lives)."""
    from .qemu.qmp import QMPClient
    from .target import qmp_endpoint

    if vm.startswith("pid:"):
        try:
            os.kill(int(vm[4:]), 0)
            return True
        except (OSError, ValueError):
            return False
    try:
        qmp = qmp_endpoint(vm)
        if qmp is None:
            return True
        with QMPClient(qmp, timeout=2.0) as q:
            q.execute("query-status")
        return True
    except (VMError, OSError):
        return False


def hex_columns(grid: Any) -> set[str]:
    """Columns the plugin declares as hexadecimal (``format_hints.Hex``): text shows them as 0x..."""
    return {c.name for c in grid.columns if any(k.__name__ == "Hex" for k in getattr(c.type, "__mro__", ()))}


class _TickPause:
    """Pause a running VM for one tick, for at most ``limit_ms``: a timer resumes it
    if the plugin takes longer (then the tick saw a running guest for the rest)."""

    def __init__(self, qmp: str, limit_ms: float) -> None:
        self.qmp, self.limit_ms = qmp, limit_ms
        self.was_running = False
        self.overran = False
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None

    def _resume(self, timed_out: bool) -> None:
        from .qemu.qmp import QMPClient

        with self._lock:
            if not self.was_running:
                return
            self.was_running = False
            self.overran = timed_out
            with QMPClient(self.qmp, timeout=5.0) as q:
                q.execute("cont")

    def __enter__(self) -> "_TickPause":
        from .qemu.qmp import QMPClient

        with QMPClient(self.qmp, timeout=5.0) as q:
            self.was_running = bool(q.execute("query-status").get("running"))
            if self.was_running:
                q.execute("stop")
        if self.was_running:
            self._timer = threading.Timer(self.limit_ms / 1000.0, self._resume, (True,))
            self._timer.daemon = True
            self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._resume(False)


def _emit(out: TextIO, renderer: str, change: str, tick: int, row: dict[str, Any], hexed: set[str]) -> None:
    if renderer == "jsonl":
        out.write(json.dumps({**row, "change": change, "tick": tick}, default=str) + "\n")
        return
    cells = ["" if v is None else hex(v) if k in hexed and isinstance(v, int) else str(v) for k, v in row.items()]
    out.write(change + " " + "\t".join(cells) + "\n")


def watch(vm: str, plugin: str, options: dict[str, Any] | None = None, interval: float = 2.0,
          count: int | None = None, renderer: str = "text", backend: str = "shadow",
          out: TextIO = sys.stdout, err: TextIO = sys.stderr, stats: bool = False,
          pause_ms: float | None = None) -> int:
    """Run ``plugin`` on ``vm`` every ``interval`` s (``count`` ticks, or until the VM stops).

    With ``pause_ms``, a running VM is paused during each tick for at most that long."""
    from . import kaslr, profiles
    from .run import run_plugin
    from .target import open_target

    qmp = None
    if pause_ms is not None:
        from .target import qmp_endpoint

        qmp = qmp_endpoint(vm)
        if qmp is None:
            raise ShadowvolError(f"watch: --pause-ms needs the VM's QMP socket ({vm} has none)")
    target: Any = open_target(vm=vm, backend=backend)
    try:
        symbols = profiles.profile_addresses(target.isf)
        banner = profiles.profile_banner(target.isf)
        previous: list[dict[str, Any]] | None = None
        header = False
        tick = 0
        next_at = time.monotonic()
        while count is None or tick < count:
            delay = next_at - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            next_at = max(next_at + interval, time.monotonic())
            if not _vm_alive(vm):
                err.write(f"shadowvol: VM {vm} has stopped: watch ends after {tick} ticks\n")
                return 0
            t0 = time.perf_counter()
            if target is not None:
                target.new_epoch()
                if not kaslr.verify_location(target.memory, target.location, symbols, banner):
                    target.close()
                    target = None
                    err.write(f"shadowvol: the kernel of {vm} moved (reboot?): locating it again\n")
            if target is None:
                try:
                    target = open_target(vm=vm, backend=backend)
                except ShadowvolError as exc:  # still booting: try again next tick
                    err.write(f"shadowvol: tick {tick}: no kernel found yet ({exc})\n")
                    tick += 1
                    continue
                symbols = profiles.profile_addresses(target.isf)
                banner = profiles.profile_banner(target.isf)
                err.write(f"shadowvol: tick {tick}: kernel located again\n")
            rows, partial = None, None
            for attempt in range(2):  # a read smeared by the running guest: retried once
                try:
                    if pause_ms is None:
                        grid = run_plugin(target, plugin, options or {})
                        rows, hexed = grid_rows(grid), hex_columns(grid)
                    else:
                        with _TickPause(qmp, pause_ms) as pause:
                            grid = run_plugin(target, plugin, options or {})
                            rows, hexed = grid_rows(grid), hex_columns(grid)
                        if pause.overran:
                            err.write(f"shadowvol: tick {tick}: longer than --pause-ms {pause_ms:g}, "
                                      "the VM ran again before the tick ended\n")
                    break
                except Exception as exc:  # noqa: BLE001 (a plugin failure on changing memory)
                    if not _vm_alive(vm):
                        err.write(f"shadowvol: VM {vm} has stopped: watch ends after {tick} ticks\n")
                        return 0
                    partial = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
                    target.new_epoch()
            cost_ms = (time.perf_counter() - t0) * 1000.0
            if rows is None:
                err.write(f"shadowvol: tick {tick}: partial, the plugin failed twice ({partial})\n")
                tick += 1
                continue
            if renderer == "text" and not header and rows:
                out.write("  " + "\t".join(rows[0].keys()) + "\n")
                header = True
            if previous is not None:
                appeared, disappeared = diff_rows(previous, rows)
                for row in disappeared:
                    _emit(out, renderer, "-", tick, row, hexed)
                for row in appeared:
                    _emit(out, renderer, "+", tick, row, hexed)
            out.flush()
            if stats:
                err.write(f"shadowvol: tick {tick}: {len(rows)} rows, {cost_ms:.1f} ms\n")
            previous = rows
            tick += 1
        return 0
    finally:
        if target is not None:
            target.close()


def cmd_watch(args: Any) -> int:
    from . import volbridge
    from .run import _plugin_parser

    volbridge.quiet_volatility()
    plugin_cls = volbridge.load_plugin(args.plugin)
    options = {k: v for k, v in vars(_plugin_parser(plugin_cls, args.plugin).parse_args(args.args)).items()
               if v is not None}
    if args.interval <= 0 or (args.count is not None and args.count < 1) or \
            (args.pause_ms is not None and args.pause_ms <= 0):
        raise ShadowvolError("watch: --interval and --pause-ms must be > 0, --count >= 1")
    return watch(args.vm, args.plugin, options, interval=args.interval, count=args.count,
                 renderer=args.renderer, backend=args.backend, stats=args.stats, pause_ms=args.pause_ms)


def add_parser(sub: Any) -> None:
    """``shadowvol watch``."""
    import argparse

    wp = sub.add_parser("watch", help="run a plugin every few seconds, print rows that appear (+) or go (-)")
    wp.add_argument("-vm", dest="vm", required=True, help="VM name, qmp:/path/qmp.sock or pid:NNN")
    wp.add_argument("--interval", type=float, default=2.0, help="seconds between ticks (default 2)")
    wp.add_argument("--count", type=int, help="stop after N ticks (the first is the baseline)")
    wp.add_argument("-r", dest="renderer", default="text", choices=["text", "jsonl"])
    wp.add_argument("--backend", default="shadow", choices=["shadow", "libvmi"])
    wp.add_argument("--pause-ms", type=float, metavar="N",
                    help="pause a running VM during each tick, for at most N ms (a consistent view)")
    wp.add_argument("--stats", action="store_true", help="rows and cost of each tick, on stderr")
    wp.add_argument("plugin")
    wp.add_argument("args", nargs=argparse.REMAINDER, help="plugin options")
    wp.set_defaults(func=cmd_watch)
