"""The breakpoint (LibVMI/DRAKVUF-style) monitor on a live guest.

Events are compared with what the guest itself reports (the pid of a program
we start there); afterwards the guest must keep running normally.
"""

from __future__ import annotations

import pytest

from shadowvol.errors import ShadowvolError
from shadowvol.target import open_target
from shadowvol.trace.breakpoint import trace_breakpoints
from shadowvol.trace.points import MonitorPointError, check_monitor_point

GETPPID = 110  # x86-64


@pytest.fixture
def web01_target(web01):
    t = open_target(vm=web01.name)
    yield t
    t.close()


def _start_in_guest(guest, cmd: str, delay: float = 1.5) -> int:
    """Start ``cmd`` in the background after ``delay`` s, with a known pid (exec keeps it)."""
    out = guest(f"sh -c 'sleep {delay}; exec {cmd}' >/dev/null 2>&1 </dev/null & echo $!")
    return int(out.split()[-1])


def test_libvmi_sees_syscall_of_started_program(web01_target, guest):
    # The loop runs until killed, so it is still running whenever the monitor
    # has attached (the first attach of a session may take a while).
    pid = _start_in_guest(guest, "/usr/bin/sv-syscall-loop 4000000000", delay=0.2)
    seen = []

    def on_event(ev):
        if ev.pid == pid:
            seen.append(ev)

    try:
        stats = trace_breakpoints(web01_target, syscalls=True, duration=40.0, on_event=on_event,
                                  should_stop=lambda: sum(e.nr == GETPPID for e in seen) >= 5)
    finally:
        guest(f"kill {pid} 2>/dev/null; true")
    assert stats["events"] > 0
    hits = [e for e in seen if e.kind == "syscall" and e.nr == GETPPID]
    assert hits, f"no getppid from pid {pid}; saw {[(e.pid, e.comm, e.nr) for e in seen][:20]}"
    assert hits[0].name == "getppid"
    assert hits[0].tgid == pid
    assert hits[0].comm.startswith("sv-syscall-lo")


def test_guest_runs_after_detach(web01_target, guest):
    # Sched + proc + a probe on the syscall loop's own handler, while a loop runs.
    pid = _start_in_guest(guest, "/usr/bin/sv-syscall-loop 200", delay=0.5)
    kinds = set()
    stats = trace_breakpoints(web01_target, syscalls=True, sched=True, proc=True,
                              at=["__x64_sys_getppid"], duration=6.0,
                              on_event=lambda e: kinds.add(e.kind))
    assert "switch" in kinds and "syscall" in kinds, stats
    # Every breakpoint is gone: the guest runs programs to completion, at normal speed.
    out = guest("/usr/bin/sv-syscall-loop 20000; /usr/bin/sv-forkexec 5; echo ok")
    assert out.strip().endswith("ok")
    assert float(out.split()[0]) < 5.0, out
    guest(f"while kill -0 {pid} 2>/dev/null; do sleep 0.2; done", timeout=60)
    dmesg = guest("dmesg")
    for bad in ("int3", "Oops", "BUG:", "general protection", "traps:"):
        assert bad not in dmesg, dmesg[-2000:]


def test_breakpoints_removed_when_handler_raises(web01_target, guest):
    class Boom(Exception):
        pass

    def on_event(ev):
        raise Boom()

    with pytest.raises(Boom):
        trace_breakpoints(web01_target, syscalls=True, sched=True, duration=10.0, on_event=on_event)
    assert guest("/usr/bin/sv-syscall-loop 1000; echo ok").strip().endswith("ok")


def test_monitor_point_checks(web01):
    t = open_target(vm=web01.name)
    try:
        addr, warnings = check_monitor_point(t, "x64_sys_call")
        assert addr == t.symbol_address("x64_sys_call")
        assert warnings == []
        # The ftrace nop at function entry is 5 bytes long: +2 is inside it.
        assert t.kernel.read(addr, 5) == bytes.fromhex("0f1f440000")
        with pytest.raises(MonitorPointError, match="instruction boundary"):
            check_monitor_point(t, "x64_sys_call+2")
        with pytest.raises(MonitorPointError, match="outside kernel text"):
            check_monitor_point(t, "init_task")
        with pytest.raises(MonitorPointError, match="no symbol"):
            check_monitor_point(t, "no_such_function_xyz")
        # __x64_sys_getppid: nop5; push rbx; call ... -> a call at +6 gets a branch warning.
        _, warnings = check_monitor_point(t, "__x64_sys_getppid+6")
        assert any("branch" in w for w in warnings), warnings
    finally:
        t.close()


def test_nothing_to_trace_is_an_error(web01_target):
    with pytest.raises(ShadowvolError, match="nothing to trace"):
        trace_breakpoints(web01_target, syscalls=False, duration=1.0)


def test_a_paused_vm_is_refused_and_stays_paused(web01):
    """The trace resumes the guest at every stop and the detach leaves it running:
    on a paused VM it must refuse, before connecting, and leave the VM paused."""
    from conftest import run_cli

    from shadowvol.qemu.qmp import QMPClient

    with QMPClient(web01.qmp) as q:
        q.execute("stop")
    try:
        r = run_cli("trace", "-vm", web01.name, "--backend", "libvmi", "--duration", "1")
        with QMPClient(web01.qmp) as q:
            status = q.execute("query-status")
    finally:
        with QMPClient(web01.qmp) as q:
            q.execute("cont")
    assert r.returncode != 0, r.stdout
    assert r.stderr.strip().splitlines() == [
        f"shadowvol: error: vm:{web01.name} is not running (QEMU run state 'paused'): a breakpoint trace "
        "resumes the guest at every event, so it runs only on a running VM"], r.stderr
    assert status["status"] == "paused", status


@pytest.mark.parametrize("sig", ["TERM", "HUP"])
def test_sigterm_during_a_trace_removes_breakpoints_and_the_guest_runs_on(web01, guest, sig):
    """Python's default SIGTERM/SIGHUP ends the process without running ``finally``:
    the breakpoints stayed in QEMU and the next syscall stopped the VM for good
    (runstate ``debug``). The CLI turns them into an exception: exit 128+N, the
    breakpoints removed, the gdbstub detached, the guest running."""
    import signal
    import time

    from conftest import start_attached_trace

    from shadowvol.qemu.qmp import QMPClient

    proc = start_attached_trace(web01, guest)
    try:
        proc.send_signal(getattr(signal, f"SIG{sig}"))
        rc = proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err = proc.stderr.read().decode()
    states = []
    for _ in range(6):  # any syscall would stop at a breakpoint left behind
        time.sleep(0.5)
        with QMPClient(web01.qmp) as q:
            states.append(q.execute("query-status")["status"])
    if states[-1] != "running":  # keep the shared guest usable: a detach removes QEMU's breakpoints
        from shadowvol.qemu.gdbstub import GdbStub

        GdbStub(web01.gdb).close()
    assert rc == 128 + getattr(signal, f"SIG{sig}"), err
    assert "Traceback" not in err, err
    assert set(states) == {"running"}, states
    guest("killall sv-syscall-loop; true")
