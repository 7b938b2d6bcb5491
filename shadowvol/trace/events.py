"""Traced events, shared by the shadow tracer and the breakpoint monitor.

An :class:`Event` is one guest event however it was intercepted: by the
in-guest stub (``guest_stub/``, read from the shadow compartment) or by a
gdbstub breakpoint (:mod:`shadowvol.trace.breakpoint`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import ShadowvolError
from ..textsafe import printable

__all__ = ["KINDS", "Event", "syscall_names", "format_event"]

#: Event kinds, in the stub's record-type order (type 1 = syscall ... 6 = probe).
KINDS = ("syscall", "switch", "fork", "exec", "exit", "probe")


@dataclass
class Event:
    """One traced event.

    ``pid``/``tgid``/``comm`` are those of the task the event is about (the
    previous task for a switch, the parent for a fork). ``ts_ns`` is the
    guest's CLOCK_MONOTONIC for the shadow backend (host time for libvmi).
    ``nr``/``name``/``args`` carry the syscall number, its name and its six
    arguments; ``name`` is the monitor point for probes. Kind-specific fields
    go in ``extra``.
    """

    kind: str
    ts_ns: int
    cpu: int
    pid: int
    tgid: int
    comm: str
    nr: int | None = None
    name: str | None = None
    args: tuple[int, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["args"] = list(self.args)
        return d


def syscall_names(target: Any) -> dict[int, str]:
    """Syscall number -> name, from the guest's ``sys_call_table`` and the ``__x64_sys_*`` symbols.

    Read from the guest on each call: a tracer calls it once, at its start,
    and keeps the result for its run (an explicit cache its owner holds;
    nothing is cached on the target).
    """
    by_addr = {addr: name[len("__x64_sys_"):] for name, addr in target.symbol_addresses("__x64_sys_")}
    names: dict[int, str] = {}
    if target.has_symbol("sys_call_table"):
        n = target.array_length("sys_call_table") or 451
        try:
            raw = target.kernel.read(target.symbol_address("sys_call_table"), 8 * n)
        except ShadowvolError:
            raw = b""
        for i in range(len(raw) // 8):
            name = by_addr.get(int.from_bytes(raw[8 * i:8 * i + 8], "little"))
            if name and name != "ni_syscall":
                names[i] = name
    return names


def _fmt_args(args: tuple[int, ...]) -> str:
    return ", ".join(f"{a:#x}" if a > 0xFFFF else str(a) for a in args)


def format_event(ev: Event) -> str:
    """One human-readable line: time, cpu, pid/tgid, comm, then the event."""
    head = f"{ev.ts_ns / 1e9:14.6f} {ev.cpu:>3} {ev.pid:>6}/{ev.tgid:<6} {ev.comm:<16}"
    x = ev.extra
    if ev.kind == "syscall":
        what = f"{ev.name or ev.nr}({_fmt_args(ev.args)})"
    elif ev.kind == "switch":
        what = (f"switch -> {x.get('next_pid')} {x.get('next_comm', '')} "
                f"(prev_state={x.get('prev_state')})")
    elif ev.kind == "fork":
        what = f"fork child={x.get('child_pid')}"
    elif ev.kind == "exec":
        what = f"exec {x.get('filename', '')!s}"
    elif ev.kind == "exit":
        what = f"exit code={x.get('code')}"
    else:
        what = f"probe {ev.name} ({_fmt_args(ev.args)})"
    return printable(f"{head} {what}")  # comm, filename: the guest's strings
