"""The LibVMI/DRAKVUF-style monitor: software breakpoints through the gdbstub.

This is the comparison path of ShadowMonitor (``shadowvol trace --backend
libvmi``): every event stops the VM, the host reads registers and guest
memory, then steps over the breakpoint and resumes it. Hook points in
kernel 6.1 (arguments per the SysV ABI, read at function entry):

================  =====================================  ======================
event             breakpoint                             what is read
================  =====================================  ======================
syscall           ``x64_sys_call(regs, nr)``             RSI = nr, RDI = pt_regs
switch            ``__switch_to(prev, next)``            RDI/RSI = task_struct *
fork              ``wake_up_new_task(p)``                RDI = the new task
exec              ``begin_new_exec(bprm)``               bprm->filename
exit              ``do_exit(code)``                      RDI = exit code
probe (``--at``)  any checked kernel instruction         RDI..R9
================  =====================================  ======================

The current task is the per-CPU ``current_task`` (``pcpu_hot.current_task``
from 6.2, commit 7443b296e699, is detected too) at the kernel GS base.
Guest memory is read through the shadow (mapped RAM) layer while the VM is
stopped; only the breakpoints go through the gdbstub.

Step-over follows QEMU 7.2's quirk (a plain ``c`` at a breakpoint stops again):
remove the breakpoint, single-step, re-insert, continue. Every breakpoint is
removed before detaching, on any exit path, so the guest keeps running. On
TCG the breakpoints live in QEMU's translator, not in guest memory, so the
guest (and the stub's code hashes) never see an int3.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable

from ..errors import ShadowvolError
from ..kernel_reader import kernel_of
from ..qemu.detach_guard import DetachGuard, guarded_attach, guarded_detach
from ..qemu.gdbstub import GdbError, GdbStub, stop_signal, stop_thread
from ..qemu.qmp import QMPClient
from .events import Event, syscall_names
from .points import TextSymbols, check_monitor_point

__all__ = ["BreakpointMonitor", "trace_breakpoints", "HOOKS", "Event"]

#: Event kind -> candidate functions (first found in the profile wins).
HOOKS: dict[str, tuple[str, ...]] = {
    "syscall": ("x64_sys_call", "do_syscall_64"),
    "switch": ("__switch_to",),
    "fork": ("wake_up_new_task",),
    "exec": ("begin_new_exec",),
    "exit": ("do_exit",),
}

_SYSCALL_ARGS = ("di", "si", "dx", "r10", "r8", "r9")
_PROBE_ARGS = ("rdi", "rsi", "rdx", "rcx", "r8", "r9")


def _make_event(**kw: Any) -> Event:
    """Build an Event, dropping fields the shadow tracer's type does not have."""
    fields = getattr(Event, "__dataclass_fields__", None)
    if fields is not None:
        kw = {k: v for k, v in kw.items() if k in fields}
    return Event(**kw)


class _StopReader:
    """What the tracer reads at a stop (the current task, a task's ids, ``pt_regs``, strings),
    through the one kernel reader on the target; offsets are read once, at the start of the trace."""

    def __init__(self, target: Any) -> None:
        self.k = k = kernel_of(target)
        self.off_pid = k.offsetof("task_struct", "pid")
        self.off_tgid = k.offsetof("task_struct", "tgid")
        self.off_comm = k.offsetof("task_struct", "comm")
        self.regs = {r: k.offsetof("pt_regs", r) for r in _SYSCALL_ARGS}
        self.pt_regs_size = k.sizeof("pt_regs")
        self.off_filename = (k.offsetof("linux_binprm", "filename")
                             if k.has_member("linux_binprm", "filename") else None)
        # Per-CPU current task: `current_task` (<= 6.1) or pcpu_hot.current_task (6.2+, commit
        # 7443b296e699 "x86/percpu: Move current_task to percpu hot section"). Per-CPU symbols are
        # linked at their offset in the per-CPU section, which KASLR does not move (raw_symbol).
        if k.raw_symbol("current_task") is not None:
            self.current_off = k.raw_symbol("current_task")
        elif k.raw_symbol("pcpu_hot") is not None and k.has_member("pcpu_hot", "current_task"):
            self.current_off = k.raw_symbol("pcpu_hot") + k.offsetof("pcpu_hot", "current_task")
        else:
            raise ShadowvolError("the profile has neither current_task nor pcpu_hot: cannot find the "
                                 "current task")
        # task_struct.state became __state in 5.14 (commit 2f064a59a11f "sched: Change task_struct::state").
        state = next((m for m in ("__state", "state") if k.has_member("task_struct", m)), None)
        self.off_state = k.offsetof("task_struct", state) if state else None
        self._names = syscall_names(target)  # read once, at the start of the trace

    def syscall_name(self, nr: int) -> str:
        return self._names.get(nr, f"syscall_{nr}")

    def u64(self, vaddr: int) -> int:
        return self.k.read_pointers(vaddr, 1)[0]

    def u32(self, vaddr: int) -> int:
        return int.from_bytes(self.k.read_exact(vaddr, 4), "little")

    def task(self, task: int) -> tuple[int, int, str]:
        """(pid, tgid, comm) of a ``struct task_struct *``."""
        read = self.k.read_exact
        pid = int.from_bytes(read(task + self.off_pid, 4), "little", signed=True)
        tgid = int.from_bytes(read(task + self.off_tgid, 4), "little", signed=True)
        comm = read(task + self.off_comm, 16).split(b"\0", 1)[0].decode(errors="replace")
        return pid, tgid, comm

    def current(self, gs_base: int) -> int:
        """``current`` (struct task_struct *) on the CPU whose kernel GS base is ``gs_base``."""
        return self.u64(gs_base + self.current_off)

    def syscall_args(self, regs: int) -> tuple[int, ...]:
        """The six syscall arguments in a ``struct pt_regs *``."""
        raw = self.k.read_exact(regs, self.pt_regs_size)
        return tuple(int.from_bytes(raw[self.regs[r]:self.regs[r] + 8], "little") for r in _SYSCALL_ARGS)

    def string(self, vaddr: int, limit: int = 256) -> str:
        data = self.k.read(vaddr, limit, pad=True) or b""
        return data.split(b"\0", 1)[0].decode(errors="replace")


@dataclass
class _Point:
    kind: str
    address: int
    name: str
    hits: int = 0


class BreakpointMonitor:
    """Breakpoints on a target's kernel through its gdbstub; :meth:`close` always removes them.

    The target (a :class:`shadowvol.target.Target`, opened and closed by the
    caller) gives the gdbstub endpoint and the guest memory read at each stop."""

    def __init__(self, target: Any) -> None:
        if target.endpoints.gdb is None:
            raise ShadowvolError(f"{target.description} has no gdbstub: breakpoints (--backend libvmi) "
                                 "need a VM started by 'shadowvol vm start', or a libvirt domain whose XML "
                                 "passes -gdb (<qemu:commandline>; shadowvol never adds one)")
        self.target = target
        self.k = _StopReader(self.target)
        self.points: dict[int, _Point] = {}
        self.warnings: list[str] = []
        self.stub: GdbStub | None = None
        self._inserted: set[int] = set()
        self._text = TextSymbols(self.target.isf)  # for checking monitor points; built on first use

    # -- set-up --------------------------------------------------------------

    def add_kind(self, kind: str) -> None:
        for name in HOOKS[kind]:
            if self.target.has_symbol(name):
                self._add(kind, self.target.symbol_address(name), name)
                return
        raise ShadowvolError(f"no hook for {kind} events: none of {', '.join(HOOKS[kind])} in the profile")

    def add_probe(self, point: str) -> None:
        addr, warnings = check_monitor_point(self.target, point, self._text)
        self.warnings += warnings
        self._add("probe", addr, point)

    def _add(self, kind: str, addr: int, name: str) -> None:
        if addr in self.points:
            raise ShadowvolError(f"two monitor points at {addr:#x} ({self.points[addr].name}, {name})")
        self.points[addr] = _Point(kind, addr, name)

    def attach(self) -> None:
        """Connect (halts the VM) and insert every breakpoint.

        A VM that is not running is refused before anything is touched: the
        trace resumes the guest after every stop, and the detach leaves it
        running, so a paused VM would not stay paused. (The gdbstub cannot
        tell: connecting pauses the VM either way; QMP says.)
        """
        qmp = self.target.endpoints.qmp
        if qmp is not None:
            with QMPClient(qmp) as q:
                running, state = q.run_state()
            if not running:
                why = ("; 'debug' is a stop at a breakpoint that a debugger left behind: attaching and "
                       "detaching one removes its breakpoints" if state == "debug" else "")
                raise ShadowvolError(
                    f"{self.target.description} is not running (QEMU run state {state!r}): a breakpoint "
                    f"trace resumes the guest at every event, so it runs only on a running VM{why}")
        # Our own process may die attached (SIGKILL): the guard then detaches for us.
        self.stub, self._guard = guarded_attach(self.target.endpoints.gdb)
        for addr in self.points:
            self.stub.insert_breakpoint(addr)
            self._inserted.add(addr)

    def close(self) -> None:
        """Stop the VM if running, remove every breakpoint, detach (the VM resumes)."""
        stub, self.stub = self.stub, None
        guard, self._guard = self._guard, None
        if stub is not None:
            try:
                if self._running:
                    try:
                        stub.interrupt(timeout=5.0)
                    except GdbError:
                        pass
                    self._running = False
                for addr in sorted(self._inserted):
                    try:
                        stub.remove_breakpoint(addr)
                    except GdbError:
                        pass
                self._inserted.clear()
            finally:
                guarded_detach(stub, guard)  # QEMU resumes the guest

    _running = False
    _guard: DetachGuard | None = None

    def __enter__(self) -> "BreakpointMonitor":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the event loop ------------------------------------------------------

    def run(self, duration: float, on_event: Callable[[Event], None],
            should_stop: Callable[[], bool] | None = None) -> dict[str, Any]:
        """Resume the guest and handle breakpoint hits for ``duration`` seconds (or until ``should_stop()``)."""
        assert self.stub is not None, "attach() first"
        stub = self.stub
        costs: list[int] = []
        events = 0
        t_start = time.monotonic()
        deadline = t_start + duration
        clock = time.perf_counter_ns
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            stub.cont(wait=False)
            self._running = True
            stop = None
            while stop is None:
                # Wait in slices so a `stop` request is seen while the guest runs.
                # A timed-out read keeps its partial packet in the client's buffer.
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (should_stop is not None and should_stop()):
                    break
                try:
                    stop = stub.wait_stop(timeout=min(remaining, 0.25))
                except GdbError as exc:
                    if "timed out" not in str(exc):
                        raise
            if stop is None:
                break  # close() interrupts the VM
            self._running = False
            t0 = clock()
            if stop_signal(stop) != 5:
                continue  # not a breakpoint (e.g. an interrupt we did not ask for)
            regs = stub.read_registers()
            rip = regs["rip"]
            point = self.points.get(rip)
            if point is None:
                continue  # a single-step trap of someone else; just resume
            thread = stop_thread(stop)  # QEMU's thread-id is the CPU index + 1 ("p1.2" with processes)
            cpu = int(thread.rpartition(".")[2], 16) - 1 if thread else 0
            # The guest ran since the last stop: translations cached then may be stale.
            # Each stop is one epoch; nothing else is cached across events (the syscall
            # names and text symbols are the tracer's own, read once at its start).
            self.target.new_epoch()
            try:
                ev = self._decode(point, regs, cpu)
            except ShadowvolError as exc:  # unreadable guest memory: count, keep going
                ev = None
                self.warnings.append(f"{point.name}: {exc}")
            # Step only the CPU that stopped: see GdbStub.step (SMP).
            stub.step_over_breakpoint(rip, thread=thread)
            costs.append(clock() - t0)
            point.hits += 1
            if ev is not None:
                events += 1
                on_event(ev)
        seconds = time.monotonic() - t_start
        return {
            "backend": "libvmi",
            "events": events,
            "seconds": round(seconds, 3),
            "events_per_s": round(events / seconds, 1) if seconds else 0.0,
            "handler_us_median": round(statistics.median(costs) / 1000, 1) if costs else None,
            "event_cost_us": round(seconds * 1e6 / events, 1) if events else None,
            "points": {p.name: p.hits for p in self.points.values()},
            "warnings": self.warnings[:20],
        }

    def _decode(self, point: _Point, regs: dict[str, int], cpu: int) -> Event:
        k = self.k
        now = time.time_ns()
        cur = k.current(regs["gs_base"])
        pid, tgid, comm = k.task(cur)
        base = dict(ts_ns=now, cpu=cpu, pid=pid, tgid=tgid, comm=comm)
        if point.kind == "syscall":
            nr = regs["rsi"] & 0xFFFFFFFF
            args = k.syscall_args(regs["rdi"])
            return _make_event(kind="syscall", nr=nr, name=k.syscall_name(nr), args=args, extra={}, **base)
        if point.kind == "switch":  # pid/comm are the previous task's, as in the shadow tracer
            ppid, ptgid, pcomm = k.task(regs["rdi"])
            npid, ntgid, ncomm = k.task(regs["rsi"])
            state = None
            if k.off_state is not None:
                state = k.u32(regs["rdi"] + k.off_state)
            return _make_event(kind="switch", ts_ns=now, cpu=cpu, pid=ppid, tgid=ptgid, comm=pcomm,
                               name="sched_switch",
                               extra={"prev_pid": ppid, "next_pid": npid, "next_tgid": ntgid,
                                      "next_comm": ncomm, "prev_state": state})
        if point.kind == "fork":  # wake_up_new_task runs in the parent (kernel_clone)
            cpid, ctgid, _ = k.task(regs["rdi"])
            return _make_event(kind="fork", name="fork", args=(cpid,),
                               extra={"parent_pid": pid, "child_pid": cpid, "child_tgid": ctgid}, **base)
        if point.kind == "exec":
            filename = ""
            if k.off_filename is not None:
                try:
                    filename = k.string(k.u64(regs["rdi"] + k.off_filename))
                except ShadowvolError:
                    pass
            return _make_event(kind="exec", name="exec", extra={"old_pid": pid, "filename": filename},
                               **base)
        if point.kind == "exit":
            code = regs["rdi"] & 0xFFFFFFFF
            return _make_event(kind="exit", name="exit", args=(code,),
                               extra={"code": code, "status": code >> 8 & 0xFF, "signal": code & 0x7F,
                                      "leader": pid == tgid}, **base)
        return _make_event(kind="probe", name=point.name, args=tuple(regs[r] for r in _PROBE_ARGS),
                           extra={"address": point.address, "ip": regs["rip"],
                                  "regs": {r: regs[r] for r in (*_PROBE_ARGS, "rsp", "rax")}}, **base)


def trace_breakpoints(target: Any, *, syscalls: bool = True, sched: bool = False, proc: bool = False,
                      at: list[str] | None = None, duration: float = 5.0,
                      on_event: Callable[[Event], None] = lambda e: None,
                      should_stop: Callable[[], bool] | None = None) -> dict[str, Any]:
    """Trace ``target`` (a :class:`shadowvol.target.Target`, opened and closed by the
    caller) with gdbstub breakpoints for ``duration`` seconds; returns statistics.

    ``should_stop`` (polled about every 0.25 s while the guest runs) ends the
    trace early. Every breakpoint is removed and the gdbstub detached on return, on error
    and on KeyboardInterrupt; the guest keeps running.
    """
    mon = BreakpointMonitor(target)
    try:
        if syscalls:
            mon.add_kind("syscall")
        if sched:
            mon.add_kind("switch")
        if proc:
            for kind in ("fork", "exec", "exit"):
                mon.add_kind(kind)
        for point in at or ():
            mon.add_probe(point)
        if not mon.points:
            raise ShadowvolError("nothing to trace: give --syscalls, --sched, --proc or --at SYMBOL")
        mon.attach()
        return mon.run(duration, on_event, should_stop)
    finally:
        mon.close()
