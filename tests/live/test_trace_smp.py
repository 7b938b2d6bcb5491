"""Tracing a 2-vCPU guest: one ring per CPU in the compartment; the breakpoint
monitor handles stops on either vCPU and leaves the guest healthy."""

from __future__ import annotations

import collections
import time

import pytest

from shadowvol.trace.breakpoint import trace_breakpoints
from shadowvol.trace.shadow import trace_shadow
from shadowvol.vm import qemu
from shadowvol.vm.console import vm_exec

pytestmark = pytest.mark.live

N = 200_000


@pytest.fixture(scope="module")
def smp(image):
    e = qemu.start_vm("smp2", image, cpus=2, stub=True)
    yield e
    qemu.stop_vm("smp2")


def sh(vm, cmd: str, timeout: float = 120.0) -> str:
    rc, out = vm_exec(vm, cmd, timeout=timeout)
    assert rc == 0, out
    return out.decode()


def trace_getppid_loops(vm, tracer, command: str, key: str) -> tuple[collections.Counter, dict, str]:
    """Run ``tracer`` (trace_shadow or trace_breakpoints) on ``vm`` while ``command``
    runs in the guest; count the getppid calls of sv-syscall-loop by ``key`` (an
    Event field). Returns the counts, the tracer's statistics and the command's output."""
    import threading

    from shadowvol.target import open_target

    counts: collections.Counter = collections.Counter()
    stats: dict = {}
    done = threading.Event()

    def count(e) -> None:
        if e.kind == "syscall" and e.name == "getppid" and e.comm == "sv-syscall-loop":
            counts[getattr(e, key)] += 1

    target = open_target(vm=vm.name)  # opened here: the trace must start before the loops
    th = threading.Thread(target=lambda: stats.update(tracer(
        target, syscalls=True, duration=300, on_event=count, should_stop=done.is_set)))
    th.start()
    time.sleep(1.0)
    try:
        out = sh(vm, command, timeout=240)
    finally:
        done.set()
        th.join(120)
        target.close()
    assert not th.is_alive(), "the tracer did not stop"
    return counts, stats, out


def test_each_cpu_ring_delivers_its_loop(smp):
    per_cpu, stats, _ = trace_getppid_loops(
        smp, trace_shadow, f"taskset -c 0 sv-syscall-loop {N} & taskset -c 1 sv-syscall-loop {N} & wait", "cpu")
    print(dict(per_cpu), {k: stats[k] for k in ("events", "records", "lost", "stub_drops", "polls")})
    assert stats["compartment"]["rings"] == 2
    assert set(per_cpu) == {0, 1}
    for cpu in (0, 1):  # delivered once each, or counted as lost: never invented, never silent
        assert per_cpu[cpu] <= N
    assert sum(per_cpu.values()) + stats["lost"] >= 2 * N
    if stats["lost"] == 0:
        assert per_cpu == {0: N, 1: N}


def test_breakpoints_on_both_vcpus_then_guest_healthy(smp, monkeypatch):
    """Both vCPUs hit breakpoints; each step-over moves the CPU that stopped off its
    breakpoint, and the VM runs after the detach.

    With a plain ``s`` every CPU ran during a step, another CPU's breakpoint could
    stop the VM first, and the stepping CPU kept QEMU's single-step flag: after
    the detach it stopped the VM again (runstate ``debug``) with nobody attached;
    and a CPU left on its breakpoint reported the same call twice.
    """
    from shadowvol.qemu.gdbstub import GdbStub
    from shadowvol.qemu.qmp import QMPClient
    from shadowvol.target import open_target

    steps: list[tuple[str | None, int, int]] = []  # (thread, breakpoint, its RIP after the step-over)
    stock_step_over = GdbStub.step_over_breakpoint

    def step_over_breakpoint(self, addr, kind=1, thread=None):
        reply = stock_step_over(self, addr, kind, thread)
        steps.append((thread, addr, self.read_register("rip", thread) if thread else addr))
        return reply

    monkeypatch.setattr(GdbStub, "step_over_breakpoint", step_over_breakpoint)
    sh(smp, "taskset -c 0 sv-syscall-loop 4000000000 >/dev/null 2>&1 & "
            "taskset -c 1 sv-syscall-loop 4000000000 >/dev/null 2>&1 & true")
    cpus = collections.Counter()
    target = open_target(vm=smp.name)
    try:
        trace_breakpoints(target, syscalls=True, sched=True, duration=5.0,
                          on_event=lambda e: cpus.update([e.cpu]) if e.comm == "sv-syscall-loop" else None)
    finally:
        target.close()
        time.sleep(0.5)  # a CPU left single-stepping stops the VM within an instruction
        with QMPClient(smp.qmp) as q:
            status = q.execute("query-status")
        if not status["running"]:
            with QMPClient(smp.qmp) as q:
                q.execute("cont")  # leave the shared guest usable for the next test
        sh(smp, "killall sv-syscall-loop; true")
    assert status["running"], status
    stuck = [(t, hex(a)) for t, a, rip in steps if rip == a]
    assert steps and not stuck, f"{len(stuck)} of {len(steps)} step-overs left the CPU on its breakpoint: {stuck[:5]}"
    assert cpus[0] > 0 and cpus[1] > 0
    assert float(sh(smp, "sv-syscall-loop 100000").split()[-1]) < 5.0
    dmesg = sh(smp, "dmesg")
    for bad in ("int3", "Oops", "BUG:", "traps:"):
        assert bad not in dmesg, dmesg[-2000:]


def test_breakpoint_events_on_both_vcpus_are_exact(smp):
    """Two loops, one pinned to each vCPU, each make exactly ``n`` getppid calls:
    the breakpoint monitor reports each call once, with the pid the guest gave
    the loop. A step over one CPU's breakpoint that let the other CPU run could
    report a call twice (the stepped CPU stopped again at the re-inserted
    breakpoint) or, on a lost stop, not at all."""
    n = 150
    per_pid, stats, out = trace_getppid_loops(
        smp, trace_breakpoints, f"taskset -c 0 sv-syscall-loop {n} >/dev/null & a=$!; "
                                f"taskset -c 1 sv-syscall-loop {n} >/dev/null & b=$!; wait; echo $a $b", "pid")
    pids = [int(p) for p in out.split()[-2:]]
    print(dict(per_pid), pids, {k: stats.get(k) for k in ("events", "seconds", "warnings")})
    assert {p: per_pid[p] for p in pids} == {p: n for p in pids}
    assert set(per_pid) == set(pids)
