"""A process killed while attached to the gdbstub must not leave a running VM stopped.

QEMU 7.2 keeps a dead debugger's breakpoints and its halt. Before the guard
(``shadowvol/qemu/detach_guard.py``), a SIGKILLed ``trace --backend libvmi``
left web01 in run state ``debug`` at its next system call, and a killed
libvmi-backend reader left it ``paused``, for good. The guard detaches for the
dead process; a VM that was paused before stays paused.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from conftest import run_cli, start_attached_trace

from shadowvol.qemu.gdbstub import GdbStub
from shadowvol.qemu.qmp import QMPClient

pytestmark = pytest.mark.live

#: Holds the libvmi backend's gdbstub session (VM halted while it is open) until killed.
HOLDER = """
import sys, time
from shadowvol.backends.libvmi import GdbPhysicalMemory
m = GdbPhysicalMemory(sys.argv[1], sys.argv[2])
print("attached", flush=True)
time.sleep(600)
"""


def _state(web01) -> str:
    with QMPClient(web01.qmp) as q:
        return q.execute("query-status")["status"]


def _states_after(web01, n: int = 6) -> list[str]:
    out = []
    for _ in range(n):
        time.sleep(0.5)
        out.append(_state(web01))
    return out


def _repair(web01, was: str) -> None:
    """Keep the shared guest usable whatever the outcome: a detach removes
    QEMU's breakpoints and resumes; then the VM is put back as it was."""
    if _state(web01) != was:
        GdbStub(web01.gdb).close()
        if was != "running":
            with QMPClient(web01.qmp) as q:
                q.execute("stop")


def _guards(web01) -> list[str]:
    out = subprocess.run(["pgrep", "-f", f"shadowvol.qemu.detach_guard {web01.gdb}"],
                         capture_output=True, text=True).stdout
    return out.split()


def test_sigkill_during_a_trace_the_guard_detaches_and_the_guest_runs_on(web01, guest):
    proc = start_attached_trace(web01, guest)
    try:
        proc.send_signal(signal.SIGKILL)  # no finally, no detach of its own
        assert proc.wait(60) == -signal.SIGKILL
        states = _states_after(web01)
        out = guest("echo alive", timeout=30)  # system calls: any breakpoint left would stop the VM
        states.append(_state(web01))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        _repair(web01, "running")
        guest("killall sv-syscall-loop; true", check=False, timeout=30)
    assert out.strip() == "alive"
    assert set(states[-4:]) == {"running"}, states
    assert not _guards(web01)  # the guard did its work and exited


@pytest.mark.parametrize("was", ["running", "paused"])
def test_a_killed_libvmi_reader_leaves_the_vm_as_it_was(web01, was):
    if was == "paused":
        with QMPClient(web01.qmp) as q:
            q.execute("stop")
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, web01.gdb, web01.qmp],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=os.environ.copy())
    try:
        assert proc.stdout.readline() == b"attached\n", proc.stderr.read().decode()
        attached = _state(web01)
        proc.kill()
        proc.wait(60)
        states = _states_after(web01)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        _repair(web01, was)
        if was == "paused":
            with QMPClient(web01.qmp) as q:
                q.execute("cont")
    assert attached == "paused"  # the gdbstub halts the VM while attached
    assert set(states[-4:]) == {was}, states
    assert not _guards(web01)


def test_a_clean_trace_leaves_no_guard_behind(web01):
    r = run_cli("trace", "-vm", web01.name, "--backend", "libvmi", "--syscalls", "--duration", "1")
    assert r.returncode == 0, r.stderr
    assert not _guards(web01)
    assert _state(web01) == "running"
