"""The shadow tracer: events recorded inside the guest, read from its RAM.

The stub (``guest_stub/``) intercepts syscalls, context switches,
fork/exec/exit and kprobe monitor points inside the guest, with no VM exit,
and writes them to per-CPU rings in the shadow compartment. This module polls
those rings through the mapped guest RAM until the duration is over; it never
stops or writes to the guest.
"""

from __future__ import annotations

import gc
import os
import struct
import threading
import time
from collections import Counter, deque
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Callable

from ..errors import ShadowvolError
from .compartment import Compartment, CompartmentError, decode_record
from .events import Event, syscall_names
from .points import TextSymbols, check_monitor_point

__all__ = ["ShadowTracer", "trace_shadow", "wanted_kinds"]

_TYPE = struct.Struct("<H")
_KIND_TYPE = {"syscall": 1, "switch": 2, "fork": 3, "exec": 4, "exit": 5, "probe": 6}


def wanted_kinds(syscalls: bool, sched: bool, proc: bool, at: list[str] | None) -> set[str]:
    """Event kinds selected by the ``trace`` options."""
    kinds = set()
    if syscalls:
        kinds.add("syscall")
    if sched:
        kinds.add("switch")
    if proc:
        kinds.update(("fork", "exec", "exit"))
    if at:
        kinds.add("probe")
    return kinds


class ShadowTracer:
    """Reads a VM's shadow compartment: finds it, checks it, decodes new events."""

    def __init__(self, target: Any, kinds: set[str], at: list[str] | None = None,
                 from_start: bool = False) -> None:
        self.target = target
        self.kinds = kinds
        self.warnings: list[str] = []
        self.compartment = Compartment.open(target.memory, from_start=from_start)
        h = self.compartment.header
        sched = target.symbol_address("schedule") if target.has_symbol("schedule") else None
        if sched is not None and sched != h.ref_schedule:
            raise CompartmentError(
                f"the compartment at {h.paddr:#x} was made by another kernel (schedule at "
                f"{h.ref_schedule:#x}, the profile says {sched:#x})")
        missing = [k for k in kinds if k != "probe" and not h.hooks_active & (1 << (_KIND_TYPE[k] - 1))]
        if missing:
            raise CompartmentError(f"the stub does not record {', '.join(sorted(missing))} events "
                                   f"(loaded with events={h.event_mask:#x})")
        self.names = syscall_names(target)
        self.points: dict[int, str] = {}
        text = TextSymbols(target.isf)  # the tracer's own, for as long as it checks points
        for spec in at or ():
            self.points[self._arm_check(spec, text)] = spec
        self._types = {_KIND_TYPE[k] for k in kinds}
        self._drops0 = self.compartment.drops()

    def _arm_check(self, spec: str, text: TextSymbols) -> int:
        """Check ``spec`` with capstone and that the stub armed a kprobe there; its address."""
        addr, warns = check_monitor_point(self.target, spec, text)
        self.warnings.extend(warns)
        h = self.compartment.header
        armed = [p for p in h.points if p.addr == addr and p.status == 0]
        if not armed:
            have = ", ".join(f"{p.spec}={'armed' if p.status == 0 else p.status}" for p in h.points) or "none"
            raise CompartmentError(
                f"monitor point {spec} ({addr:#x}) is not armed in the stub (points: {have}); the "
                f"stub arms kprobes at load: start the VM with stub points, e.g. kernel parameter "
                f"shadow_stub.points={spec}")
        return addr

    def copy(self) -> list[tuple[bytes, int]]:
        """Copy the records published since the last call out of guest RAM (cheap)."""
        return self.compartment.read_raw()

    def decode(self, raw: list[tuple[bytes, int]]) -> list[Event]:
        """Decode copied records into events of the wanted kinds (the slow part)."""
        types, names, points = self._types, self.names, self.points
        out = []
        for buf, off in raw:
            if _TYPE.unpack_from(buf, off + 16)[0] in types:
                ev = decode_record(buf, off, names, points)
                if ev.kind == "probe" and points and ev.extra["address"] not in points:
                    continue
                out.append(ev)
        if len(self.compartment.readers) > 1:
            out.sort(key=lambda e: e.ts_ns)
        return out

    def poll(self) -> tuple[list[Event], int]:
        """Events of the wanted kinds recorded since the last poll, and the records read."""
        raw = self.copy()
        return self.decode(raw), len(raw)

    def lost(self) -> int:
        return self.compartment.lost()

    def drops(self) -> int:
        """Stub-side drops since this tracer started."""
        return self.compartment.drops() - self._drops0


def _stub_unavailable(target: Any) -> str | None:
    """Why a VM started by ``vm start`` has no stub: its image could not
    build or load it on that kernel (None when that is not the reason, or
    the target is not such a VM)."""
    from pathlib import Path

    from ..vm.image import Image

    entry = target.vm
    if entry is None:
        return None
    try:
        if entry.stub:  # asked for at boot: the guest's rcS says when insmod failed
            log = Path(entry.console_log).read_bytes()
            if b"shadowvol: the guest stub failed to load" in log:
                return (f"the guest stub is unavailable on kernel {entry.release}: it failed to "
                        f"load at boot (see {entry.console_log})")
            return None
        if not entry.image:
            return None
        return Image(entry.release, Path(entry.image)).stub_unavailable()
    except (ShadowvolError, OSError, ValueError):
        return None


@contextmanager
def _quiet_poller(nice: int) -> Iterator[None]:
    """The polling thread runs ``nice`` steps below normal priority and without the
    garbage collector (a full collection over many live events can pause us for
    longer than a ring lasts); both are restored on exit."""
    gc_was_on = gc.isenabled()
    tid = threading.get_native_id()
    prio_was = os.getpriority(os.PRIO_PROCESS, tid)
    gc.disable()
    if nice:
        os.setpriority(os.PRIO_PROCESS, tid, min(19, prio_was + nice))
    try:
        yield
    finally:
        if gc_was_on:
            gc.enable()
        try:
            os.setpriority(os.PRIO_PROCESS, tid, prio_was)
        except PermissionError:  # raising priority back needs CAP_SYS_NICE
            pass


class _Drain:
    """Copies records out of the rings as fast as the guest writes them and decodes
    them in between, in bounded slices (copying is cheap, decoding is slow)."""

    def __init__(self, tracer: ShadowTracer, on_event: Callable[[Event], None]) -> None:
        self.tracer = tracer
        self.on_event = on_event
        self.counts: Counter[str] = Counter()
        self.backlog: deque[tuple[bytes, int]] = deque()
        self.records = self.polls = 0
        self.stub_gone = False

    def copy(self) -> int:
        raw = self.tracer.copy()
        self.polls += 1
        self.records += len(raw)
        self.backlog.extend(raw)
        return len(raw)

    def deliver(self, budget_s: float | None) -> None:
        """Decode copied records, for at most ``budget_s`` (None: all of them)."""
        end = None if budget_s is None else time.monotonic() + budget_s
        while self.backlog:
            batch = [self.backlog.popleft() for _ in range(min(256, len(self.backlog)))]
            for ev in self.tracer.decode(batch):
                self.counts[ev.kind] += 1
                self.on_event(ev)
            if end is not None and time.monotonic() >= end:
                return

    def run(self, duration: float, should_stop: Callable[[], bool] | None, interval: float,
            decode_slice: float) -> float:
        """Poll until ``duration`` is over, the stub is gone or ``should_stop()``; the seconds polled."""
        t0 = time.monotonic()
        deadline, next_check = t0 + duration, t0 + 0.25
        while True:
            copied = self.copy()
            now = time.monotonic()
            if now >= deadline:
                break
            if now >= next_check:
                next_check = now + 0.25
                if not self.tracer.compartment.alive():
                    self.stub_gone = True
                    self.tracer.warnings.append("the stub was unloaded during the trace")
                    break
                if should_stop is not None and should_stop():
                    break
            if self.backlog:
                self.deliver(decode_slice)
            elif not copied:
                time.sleep(interval)
        return time.monotonic() - t0


def _open_tracer(target: Any, kinds: set[str], at: list[str] | None, from_start: bool) -> ShadowTracer:
    """A tracer on ``target``'s compartment; a missing stub says why when the VM's image knows."""
    if not kinds:
        raise ShadowvolError("nothing to trace: give --syscalls, --sched, --proc or --at SYMBOL")
    try:
        return ShadowTracer(target, kinds, at, from_start=from_start)
    except CompartmentError as exc:
        why = _stub_unavailable(target)
        if why is None:
            raise
        raise CompartmentError(f"{why}; use --backend libvmi (breakpoints) on this VM") from exc


def trace_shadow(target: Any, *, syscalls: bool = True, sched: bool = False, proc: bool = False,
                 at: list[str] | None = None, duration: float = 5.0,
                 on_event: Callable[[Event], None] = lambda e: None,
                 should_stop: Callable[[], bool] | None = None, interval: float = 0.0005,
                 decode_slice: float = 0.002, from_start: bool = False,
                 nice: int = 10) -> dict[str, Any]:
    """Trace ``target`` (a :class:`shadowvol.target.Target`, opened and closed by the
    caller) from its shadow compartment for ``duration`` seconds; returns statistics.

    Same call shape as :func:`shadowvol.trace.breakpoint.trace_breakpoints`.
    ``interval`` is the idle sleep between empty polls, ``decode_slice`` the
    time spent decoding between two copies; ``from_start`` also delivers the
    records already in the rings. Records are copied out of guest RAM as fast
    as the guest writes them and decoded in between, so ``on_event`` may
    still be called after the duration has passed. The polling thread runs
    ``nice`` steps below normal priority: on a host with few cores, decoding
    must not take CPU time from the guest's vCPU threads (the monitor's cost
    would show up as guest slowdown).
    """
    tr = _open_tracer(target, wanted_kinds(syscalls, sched, proc, at), at, from_start)
    drain = _Drain(tr, on_event)
    with _quiet_poller(nice):
        seconds = drain.run(duration, should_stop, interval, decode_slice)
        lost = tr.lost()
        drops = 0 if drain.stub_gone else tr.drops()
        drain.deliver(None)
    h = tr.compartment.header
    events, records = sum(drain.counts.values()), drain.records
    return {
        "backend": "shadow",
        "events": events,
        "records": records,
        "seconds": round(seconds, 3),
        "events_per_s": round(events / seconds, 1) if seconds else 0.0,
        "records_per_s": round(records / seconds, 1) if seconds else 0.0,
        "kinds": dict(drain.counts),
        "lost": lost,
        "stub_drops": drops,
        "polls": drain.polls,
        "compartment": {"paddr": h.paddr, "rings": h.nr_rings, "ring_records": h.ring_records},
        "warnings": tr.warnings[:20],
    }
