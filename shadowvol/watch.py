"""``shadowvol watch``: run a plugin on a live VM every few seconds, print what changed.

One process: the kernel is located, the profile loaded and one volatility3
context built (:class:`~shadowvol.volbridge.BootContext`) once per boot of the
guest. Each tick is a new epoch of that context (translations, per-epoch
values, process layers and plugin configuration forgotten), and only rows that
appeared (``+``) or disappeared (``-``) since the previous tick are printed.

When the guest changes under it: a reboot (the vCPU's CR3 leads to a kernel
at another place) is said in one line and the kernel located again; a VM that
stops ends the watch (exit 0); a look smeared by the running guest (a walk
broke, or the plugin raised) is taken once more in a new epoch, then the
tick's changes are marked partial.
"""

from __future__ import annotations

import collections
import contextlib
import datetime
import gc
import json
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, TextIO

from .errors import ShadowvolError
from .textsafe import printable

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


def row_key(row: dict[str, Any]) -> Any:
    """A row's identity: its (column, value) pairs in column-name order (canonical JSON
    when a value is not hashable)."""
    try:
        key = tuple(sorted(row.items()))
        hash(key)
        return key
    except TypeError:
        return json.dumps(row, sort_keys=True, default=str)


def diff_rows(before: Iterable[dict[str, Any]], after: Iterable[dict[str, Any]],
              before_keys: list[Any] | None = None, after_keys: list[Any] | None = None
              ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(appeared, disappeared) between two lists of rows, as multisets, each in its list's order.
    Each row's :func:`row_key` is computed once (or given: the previous tick's)."""
    before, after = list(before), list(after)
    kb = before_keys if before_keys is not None else [row_key(r) for r in before]
    ka = after_keys if after_keys is not None else [row_key(r) for r in after]
    added = collections.Counter(ka)
    added.subtract(kb)
    gone = collections.Counter(kb)
    gone.subtract(ka)
    appeared, disappeared = [], []
    for row, k in zip(after, ka):
        if added[k] > 0:
            added[k] -= 1
            appeared.append(row)
    for row, k in zip(before, kb):
        if gone[k] > 0:
            gone[k] -= 1
            disappeared.append(row)
    return appeared, disappeared


@dataclass
class VMState:
    """What the hypervisor says at the start of a tick: is the VM there, and the
    CR3/CR4 of its first vCPU (None when the source has no monitor: ``pid:`` without
    a QMP socket)."""

    alive: bool
    registers: tuple[int, int] | None = None


def vm_state(target: Any) -> VMState:
    """The VM behind a live target now: alive (its QEMU runs), and its first vCPU's CR3 and
    CR4 through the target's own monitor (QMP, QMP through libvirt, the socket named on a
    ``pid:`` QEMU's command line), whatever ``-vm`` named it (~2 ms)."""
    if not target.alive():
        return VMState(False)
    return VMState(True, target.registers())


def hex_columns(grid: Any) -> set[str]:
    """Columns the plugin declares as hexadecimal (``format_hints.Hex``): text shows them as 0x..."""
    return {c.name for c in grid.columns if any(k.__name__ == "Hex" for k in getattr(c.type, "__mro__", ()))}


class _TickPause:
    """Pause a running VM for one tick, for at most ``limit_ms``: a timer resumes it
    if the plugin takes longer (then the tick saw a running guest for the rest).
    ``control``: the VM's :class:`~shadowvol.target.RunControl` (QMP, or libvirt)."""

    def __init__(self, control: Any, limit_ms: float) -> None:
        self.control, self.limit_ms = control, limit_ms
        self.was_running = False
        self.overran = False
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None

    def _resume(self, timed_out: bool) -> None:
        with self._lock:
            if not self.was_running:
                return
            self.was_running = False
            self.overran = timed_out
            self.control.resume()

    def __enter__(self) -> "_TickPause":
        self.was_running = self.control.pause()
        if self.was_running:
            self._timer = threading.Timer(self.limit_ms / 1000.0, self._resume, (True,))
            self._timer.daemon = True
            self._timer.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._resume(False)


def _emit(out: TextIO, renderer: str, change: str, tick: int, row: dict[str, Any], hexed: set[str],
          partial: bool = False) -> None:
    if renderer == "jsonl":
        out.write(json.dumps({**row, "change": change, "tick": tick, **({"partial": True} if partial else {})},
                             default=str) + "\n")
        return
    cells = ["" if v is None else hex(v) if k in hexed and isinstance(v, int) else printable(str(v))
             for k, v in row.items()]
    out.write(change + ("?" if partial else "") + " " + "\t".join(cells) + "\n")


@dataclass
class Look:
    """One run of the plugin in one epoch: its rows, the columns shown in hex, and
    why the guest may have changed under it (a list walk that met unreadable memory)."""

    rows: list[dict[str, Any]]
    hexed: set[str]
    smear: str | None = None


def look_twice(look: Callable[[], Look], new_epoch: Callable[[], None]) -> tuple[Look | None, str | None]:
    """A tick: ``look()`` in a new epoch, and once more in another when the first was
    smeared by the running guest (it raised, or a walk broke). Returns the look and
    None when one was whole; else the last look that gave rows (or None) and why the
    tick is partial."""
    got: Look | None = None
    why: str | None = None
    for _ in range(2):
        new_epoch()
        try:
            this = look()
        except Exception as exc:  # noqa: BLE001 (a plugin failing on memory that changed under it)
            text = str(exc).splitlines()[0] if str(exc) else ""
            why = f"{type(exc).__name__}: {text}" if text else type(exc).__name__
            continue
        if this.smear is None:
            return this, None
        got, why = this, this.smear
    return got, why


class _Boot:
    """The target and the volatility3 context of one boot of the guest, reused tick after tick."""

    def __init__(self, target: Any) -> None:
        from . import profiles, volbridge

        self.target = target
        self.symbols = profiles.profile_addresses(target.isf)
        self.banner = profiles.profile_banner(target.isf)
        self.context = volbridge.BootContext(target.memory, target.kernel, target.location, target.isf,
                                             isf_url=target.profile_path.as_uri())

    def is_current(self, registers: tuple[int, int] | None) -> bool:
        """The guest still runs the kernel this context was built for.

        With the vCPU's registers: CR3 leads to a kernel at this DTB and KASLR
        shift. After a reboot the dead kernel's pages stay in RAM, banner and
        page tables included, until reused, so the banner read through the old
        DTB still matches; only the CPU says which kernel runs. Without
        registers (``pid:``), the banner read through the old DTB is all there is.
        """
        from . import kaslr

        loc, memory = self.target.location, self.target.memory
        if registers is None:
            return kaslr.verify_location(memory, loc, self.symbols, self.banner)
        now = kaslr.locate_from_registers(registers[0], registers[1], memory, self.symbols, self.banner)
        return now is not None and (now.dtb, now.virt_shift) == (loc.dtb, loc.virt_shift)

    def look(self, plugin_cls: type, options: dict[str, Any], pause: Callable[[], Any] | None) -> Look:
        """Run the plugin once in the current epoch, watching its walks for smear."""
        import contextlib

        from . import volbridge
        from .run import RunHealth

        health = RunHealth()
        health.watch_layer(self.context.context.layers[volbridge.KERNEL_LAYER])
        with pause() if pause is not None else contextlib.nullcontext():
            grid = self.context.construct(plugin_cls, options).run()
            volbridge.detach_rows(grid)  # rows kept for the next tick's diff hold values, not objects
            rows = grid_rows(grid)
        smear = health.broken_walks[0] if health.broken_walks else None
        return Look(rows, hex_columns(grid), smear)


def _relocate(vm: str, backend: str, connect: str | None, old: _Boot | None, state: VMState) -> _Boot:
    """The kernel found again after it moved: from the vCPU's registers with the same
    profile (never the per-boot cache, which the dead kernel's pages still satisfy), or,
    without registers, as at start."""
    import dataclasses

    from . import kaslr
    from .errors import ProfileError
    from .target import open_target

    if old is not None and state.registers is not None:
        t = old.target
        loc = kaslr.locate_from_registers(state.registers[0], state.registers[1], t.memory, old.symbols,
                                          old.banner)
        if loc is None:
            raise ProfileError("the vCPU's page tables lead to no kernel of this profile")
        return _Boot(dataclasses.replace(t, location=loc, warnings=[]))  # same source, monitor and memory
    new = _Boot(open_target(vm=vm, backend=backend, connect=connect))
    if old is not None:
        old.target.close()
    return new


class _Kernel:
    """The kernel watch reads, followed across reboots of the guest (one :class:`_Boot` each)."""

    def __init__(self, vm: str, backend: str, err: TextIO, connect: str | None = None) -> None:
        from .target import open_target

        self.vm, self.backend, self.connect, self.err = vm, backend, connect, err
        self.boot: _Boot | None = _Boot(open_target(vm=vm, backend=backend, connect=connect))
        self.last = self.boot  # the boot whose memory is closed at the end
        self.lost = False  # said that the kernel is gone, not yet that it is back
        self.was = 0  # the KASLR shift of the kernel that went away

    @property
    def target(self) -> Any:
        """The target of the boot read last: its source's monitor outlives a reboot."""
        return self.last.target

    def at(self, tick: int, state: VMState) -> _Boot | None:
        """The boot to read at this tick; None while no kernel is found (a reboot under way)."""
        if self.boot is not None and not self.boot.is_current(state.registers):
            self.err.write(f"shadowvol: tick {tick}: the kernel of {self.vm} is no longer at KASLR shift "
                           f"{self.boot.target.location.virt_shift:#x} (reboot?): locating it again\n")
            self.was, self.boot, self.lost = self.boot.target.location.virt_shift, None, True
        if self.boot is None:
            try:
                self.boot = self.last = _relocate(self.vm, self.backend, self.connect, self.last, state)
            except ShadowvolError as exc:  # still booting: try again next tick
                if self.lost:
                    self.err.write(f"shadowvol: tick {tick}: no kernel found yet ({exc})\n")
                    self.lost = False  # once per outage, not every tick
                return None
            self.lost = False
            self.err.write(f"shadowvol: tick {tick}: the guest rebooted: kernel located again (KASLR shift "
                           f"{self.was:#x} -> {self.boot.target.location.virt_shift:#x}), going on\n")
        return self.boot

    def close(self) -> None:
        if self.last is not None:
            self.last.target.close()


class _Changes:
    """What watch prints: the rows that appeared (+) or went (-) since the last whole tick."""

    def __init__(self, out: TextIO, renderer: str) -> None:
        self.out, self.renderer = out, renderer
        self.previous: list[dict[str, Any]] | None = None
        self.previous_keys: list[Any] = []
        self.header = False

    def show(self, tick: int, look: Look, partial: bool) -> None:
        """Print a tick's changes; a partial tick's are marked so, and it does not become the
        baseline: the next whole tick is compared with the last whole one."""
        rows = look.rows
        if self.renderer == "text" and not self.header and rows:
            self.out.write("  " + "\t".join(rows[0].keys()) + "\n")
            self.header = True
        keys = [row_key(r) for r in rows]
        if self.previous is not None:
            appeared, disappeared = diff_rows(self.previous, rows, self.previous_keys, keys)
            for row in disappeared:
                _emit(self.out, self.renderer, "-", tick, row, look.hexed, partial)
            for row in appeared:
                _emit(self.out, self.renderer, "+", tick, row, look.hexed, partial)
        self.out.flush()
        if not partial:
            self.previous, self.previous_keys = rows, keys


def _collect_tick(first: bool) -> None:
    """The tick's garbage, collected at the end of the tick (its cost is the tick's).

    A stock plugin's rows hold volatility3 objects (pslist's pid is an
    ``Integer`` whose vol leads to its task and every member read), so a
    tick's objects live until its grid is dropped, are promoted to the oldest
    GC generation meanwhile, and die there in parent/member cycles. Left to
    the cyclic GC, they waited for a full collection every ~7 ticks that also
    re-traversed the boot's context and profile: a 100-175 ms tick now and
    then, 58-61 ms per tick on average at 50 tasks. Here what lives as long as
    the boot is frozen after its first tick (``gc.freeze``: not traversed,
    still freed by reference counting), and each tick ends with a collection
    of the rest: 38-48 ms on average, 60 ms at most (same guest, same runs).
    """
    gc.collect()
    if first:
        gc.freeze()


def watch(vm: str, plugin: str, options: dict[str, Any] | None = None, interval: float = 2.0,
          count: int | None = None, renderer: str = "text", backend: str = "shadow",
          out: TextIO = sys.stdout, err: TextIO = sys.stderr, stats: bool = False,
          pause_ms: float | None = None, costs: list[tuple[float, float]] | None = None,
          connect: str | None = None) -> int:
    """Run ``plugin`` on ``vm`` every ``interval`` s (``count`` ticks, or until the VM stops).

    With ``pause_ms``, a running VM is paused during each tick for at most that long.
    ``costs`` (if given) gets each whole tick's (wall, CPU) time in ms, from its VM
    check to its output (``shadowvol bench watch``). ``connect``: the libvirt URI of a
    ``-vm`` naming a libvirt domain."""
    from . import volbridge

    plugin_cls = volbridge.load_plugin(plugin)
    options = options or {}
    kernel = _Kernel(vm, backend, err, connect)
    with contextlib.ExitStack() as held:
        held.callback(kernel.close)
        held.callback(gc.unfreeze)  # what the ticks froze is the GC's again once watch returns
        control = None
        if pause_ms is not None:
            from .target import vm_run_control

            control = held.enter_context(vm_run_control(vm, connect))
        return _ticks(kernel, plugin_cls, options, interval, count, _Changes(out, renderer), err,
                      stats, pause_ms, control, costs)


def _ticks(kernel: _Kernel, plugin_cls: type, options: dict[str, Any], interval: float, count: int | None,
           changes: _Changes, err: TextIO, stats: bool, pause_ms: float | None, control: Any,
           costs: list[tuple[float, float]] | None) -> int:
    """The watch loop (see :func:`watch`)."""
    vm = kernel.vm
    if kernel.target.registers() is None:
        err.write(f"shadowvol: {vm} gives no vCPU registers (no QMP socket): a guest reboot is seen only "
                  "once the old kernel's banner is overwritten\n")
    pauses: list[_TickPause] = []

    def pause() -> _TickPause:
        pauses.append(_TickPause(control, pause_ms))
        return pauses[-1]

    def stopped(tick: int) -> int:
        err.write(f"shadowvol: VM {vm} has stopped: watch ends after {tick} ticks\n")
        return 0

    tick = 0
    collected_for: _Boot | None = None
    next_at = time.monotonic()
    while count is None or tick < count:
        time.sleep(max(0.0, next_at - time.monotonic()))
        next_at = max(next_at + interval, time.monotonic())
        t0, c0 = time.perf_counter(), time.process_time()
        state = vm_state(kernel.target)
        if not state.alive:
            return stopped(tick)
        boot = kernel.at(tick, state)
        if boot is None:
            tick += 1
            continue
        pauses.clear()
        result, partial = look_twice(lambda: boot.look(plugin_cls, options, pause if pause_ms else None),
                                     boot.context.new_epoch)
        if any(p.overran for p in pauses):
            err.write(f"shadowvol: tick {tick}: longer than --pause-ms {pause_ms:g}, "
                      "the VM ran again before the tick ended\n")
        if result is None:
            if not kernel.target.alive():
                return stopped(tick)
            err.write(f"shadowvol: tick {tick}: partial, the plugin failed twice ({partial})\n")
            tick += 1
            continue
        changes.show(tick, result, partial is not None)
        _collect_tick(first=boot is not collected_for)
        collected_for = boot
        cost_ms = (time.perf_counter() - t0) * 1000.0
        if costs is not None:
            costs.append((cost_ms, (time.process_time() - c0) * 1000.0))
        if partial is not None:
            err.write(f"shadowvol: tick {tick}: partial, smeared twice by the running guest ({partial}); "
                      "its changes are marked partial\n")
        if stats:
            err.write(f"shadowvol: tick {tick}: {len(result.rows)} rows, {cost_ms:.1f} ms\n")
        tick += 1
    return 0


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
                 renderer=args.renderer, backend=args.backend, stats=args.stats, pause_ms=args.pause_ms,
                 connect=args.connect)


def add_parser(sub: Any) -> None:
    """``shadowvol watch``."""
    import argparse

    from .target import add_source_options

    wp = sub.add_parser("watch", help="run a plugin every few seconds, print rows that appear (+) or go (-)")
    add_source_options(wp, dump=False, profile=False)
    wp.add_argument("--interval", type=float, default=2.0, help="seconds between ticks (default 2)")
    wp.add_argument("--count", type=int, help="stop after N ticks (the first is the baseline)")
    wp.add_argument("-r", dest="renderer", default="text", choices=["text", "jsonl"])
    wp.add_argument("--pause-ms", type=float, metavar="N",
                    help="pause a running VM during each tick, for at most N ms (a consistent view)")
    wp.add_argument("--stats", action="store_true", help="rows and cost of each tick, on stderr")
    wp.add_argument("plugin")
    wp.add_argument("args", nargs=argparse.REMAINDER, help="plugin options")
    wp.set_defaults(func=cmd_watch)
