"""Issue 4: the in-guest stub and the shadow tracer, on a live guest.

The guest runs a known program; the trace read from the shadow compartment
(guest RAM, from outside) must show its syscalls, fork/exec/exit, with the pid
the guest itself reports. The stub's own VM (h5trace) is booted with a
monitor point and a small ring option for the overflow test.
"""

from __future__ import annotations

import json
import re
import threading
import time

import pytest

from conftest import run_cli
from shadowvol.trace.compartment import Compartment, CompartmentError, find_compartment, find_compartments
from shadowvol.trace.shadow import trace_shadow
from shadowvol.vm import qemu
from shadowvol.vm.console import vm_exec

pytestmark = pytest.mark.live

SYS_GETPPID = 110
SYS_UNAME = 63


@pytest.fixture(scope="module")
def stubvm(image, private_run_dir):
    """A guest booted with the stub and a monitor point on __x64_sys_getppid."""
    entry = qemu.start_vm("h5trace", image, stub=True, stub_params={"points": "__x64_sys_getppid"})
    yield entry
    qemu.stop_vm("h5trace")


@pytest.fixture(scope="module")
def target(stubvm):
    from shadowvol.target import open_target

    t = open_target(vm=stubvm.name)
    yield t
    t.close()


def sh(entry, cmd: str, timeout: float = 120.0) -> str:
    rc, out = vm_exec(entry, cmd, timeout=timeout)
    assert rc == 0, f"guest command {cmd!r} failed ({rc}): {out!r}"
    return out.decode(errors="replace")


def traced(entry, target, cmd: str, **kw) -> tuple[list, dict, str]:
    """Run ``cmd`` in the guest while tracing; (events, stats, command output)."""
    evs: list = []
    stats: dict = {}
    started = threading.Event()
    done = threading.Event()

    def run() -> None:
        stats.update(trace_shadow(target, duration=120, on_event=evs.append,
                                  should_stop=done.is_set, **kw))

    th = threading.Thread(target=run)
    th.start()
    time.sleep(0.5)  # the tracer starts at the rings' current heads
    started.set()
    try:
        out = sh(entry, cmd)
        time.sleep(0.6)
    finally:
        done.set()
        th.join(30)
    return evs, stats, out


def test_compartment_found_and_valid(stubvm, target):
    t0 = time.monotonic()
    h = find_compartment(target.memory)
    assert time.monotonic() - t0 < 1.0
    assert h.nr_rings == stubvm.cpus and h.ring_records >= 16 and h.hooks_active & 0x1F == 0x1F
    assert h.ref_schedule == target.symbol_address("schedule")
    mods = sh(stubvm, "cat /proc/modules")
    assert "shadow_stub" in mods
    assert [p.spec for p in h.points] == ["__x64_sys_getppid"] and h.points[0].status == 0


def test_syscall_of_a_known_program_with_its_pid(stubvm, target):
    # The shell prints its own pid, then execs a program doing getppid() 3 times.
    evs, stats, out = traced(stubvm, target, "echo pid=$$; exec sv-syscall-loop 3", syscalls=True)
    pid = int(out.split("pid=")[1].split()[0])
    mine = [e for e in evs if e.pid == pid and e.kind == "syscall"]
    assert any(e.nr == SYS_GETPPID and e.name == "getppid" and e.comm == "sv-syscall-loop" for e in mine), \
        [(e.comm, e.name) for e in mine][:40]
    # (busybox sh itself calls getppid once, before the exec)
    assert sum(e.nr == SYS_GETPPID and e.comm == "sv-syscall-loop" for e in mine) == 3
    assert stats["lost"] == 0 and stats["stub_drops"] == 0


def test_fork_exec_exit_in_order(stubvm, target):
    evs, stats, out = traced(stubvm, target, "sv-syscall-loop 1; echo parent=$$", syscalls=False, proc=True)
    parent = int(out.split("parent=")[1].split()[0])
    forks = [e for e in evs if e.kind == "fork" and e.pid == parent]
    assert forks, [(e.kind, e.pid, e.comm) for e in evs]
    child = forks[-1].extra["child_pid"]
    seq = [(e.kind, e.extra.get("filename")) for e in evs if e.pid == child or
           (e.kind == "fork" and e.extra["child_pid"] == child)]
    kinds = [k for k, _ in seq]
    assert kinds[:3] == ["fork", "exec", "exit"], seq
    assert seq[1][1] == "/usr/bin/sv-syscall-loop"
    exit_ev = next(e for e in evs if e.kind == "exit" and e.pid == child)
    assert exit_ev.comm == "sv-syscall-loop" and exit_ev.extra["status"] == 0


def test_monitor_point_kprobe(stubvm, target):
    evs, _, out = traced(stubvm, target, "echo pid=$$; exec sv-syscall-loop 5", syscalls=False,
                         at=["__x64_sys_getppid"])
    pid = int(out.split("pid=")[1].split()[0])
    hits = [e for e in evs if e.kind == "probe" and e.pid == pid and e.comm == "sv-syscall-loop"]
    assert len(hits) == 5 and all(e.name == "__x64_sys_getppid" for e in hits)


def test_unarmed_or_bad_monitor_point_is_refused(stubvm, target):
    with pytest.raises(CompartmentError, match="not armed"):
        trace_shadow(target, at=["__x64_sys_getpid"], duration=0.1)
    from shadowvol.trace.points import MonitorPointError

    with pytest.raises(MonitorPointError, match="instruction boundary"):
        trace_shadow(target, at=["__x64_sys_getppid+1"], duration=0.1)


def test_cli_trace_json(stubvm):
    box: dict = {}
    th = threading.Thread(target=lambda: box.update(r=run_cli("trace", "-vm", stubvm.name, "--syscalls",
                                                                "--duration", "12", "-r", "json")))
    th.start()
    time.sleep(1)
    # uname runs well after the CLI's start-up (profile load, compartment scan)
    out = sh(stubvm, "echo pid=$$; sleep 6; exec uname -r")
    th.join(60)
    r = box["r"]
    assert r.returncode == 0, r.stderr
    pid = int(out.split("pid=")[1].split()[0])
    evs = [json.loads(line) for line in r.stdout.splitlines()]
    assert any(e["pid"] == pid and e["nr"] == SYS_UNAME and e["name"] == "newuname" for e in evs)
    assert "lost 0" in r.stderr


def test_cli_bad_input_is_one_line(stubvm):
    r = run_cli("trace", "-vm", stubvm.name, "--duration", "0")
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "duration" in r.stderr
    r = run_cli("trace", "-vm", "h5nosuchvm")
    assert r.returncode == 1 and r.stderr.startswith("shadowvol: error:")


def test_no_silent_loss_at_syscall_loop_rate(stubvm, target):
    """Every getppid the loop makes is delivered once or counted as lost.

    Whether the host keeps up (zero loss) depends on the host's CPU; that is
    a benchmark figure (``shadowvol bench overhead``). What must hold on any
    host: no event is invented or duplicated, none disappears silently.
    """
    n = 200_000
    evs_count = {"getppid": 0}

    def count(e) -> None:
        if e.nr == SYS_GETPPID and e.comm == "sv-syscall-loop":
            evs_count["getppid"] += 1

    evs: list = []
    stats: dict = {}
    done = threading.Event()
    th = threading.Thread(target=lambda: stats.update(trace_shadow(
        target, syscalls=True, sched=True, duration=300, on_event=count,
        should_stop=done.is_set)))
    th.start()
    time.sleep(0.5)
    secs = float(sh(stubvm, f"sv-syscall-loop {n}").split()[-1])
    time.sleep(0.6)
    done.set()
    th.join(120)
    print(f"getppid loop: {n / secs:.0f} syscalls/s in the guest; trace {stats}")
    assert evs_count["getppid"] <= n
    assert evs_count["getppid"] + stats["lost"] >= n
    if stats["lost"] == 0:
        assert evs_count["getppid"] == n


def test_ring_overflow_is_reported(stubvm, target):
    # Reload the stub with a 64-record ring, read it once, let a burst lap it.
    sh(stubvm, "rmmod shadow_stub && insmod /lib/shadowvol/shadow_stub.ko ring_records=64")
    try:
        comp = Compartment.open(target.memory)
        assert comp.header.ring_records == 64
        sh(stubvm, "sv-syscall-loop 5000")
        comp.read_raw()
        assert comp.lost() >= 5000 - 64
        box: dict = {}
        th = threading.Thread(target=lambda: box.update(r=run_cli("trace", "-vm", stubvm.name,
                                                                    "--duration", "6")))
        th.start()
        time.sleep(4)
        sh(stubvm, "sv-syscall-loop 20000")
        th.join(60)
        r = box["r"]
        assert r.returncode == 0, r.stderr
        lost = int(re.search(r"lost (\d+)", r.stderr).group(1))
        assert lost > 0, r.stderr
    finally:
        sh(stubvm, "rmmod shadow_stub; insmod /lib/shadowvol/shadow_stub.ko points=__x64_sys_getppid")


def test_stub_unloads_cleanly(stubvm, target):
    h = find_compartment(target.memory)
    comp = Compartment.open(target.memory, h)
    assert comp.alive()
    sh(stubvm, "rmmod shadow_stub")
    try:
        assert not comp.alive()
        assert all(x.paddr != h.paddr for x in find_compartments(target.memory))
        assert "shadow_stub" not in sh(stubvm, "cat /proc/modules")
        assert sh(stubvm, "sv-syscall-loop 1000 >/dev/null && echo ok").strip() == "ok"
        with pytest.raises(CompartmentError, match="stub is not loaded"):
            find_compartment(target.memory)
    finally:
        sh(stubvm, "insmod /lib/shadowvol/shadow_stub.ko points=__x64_sys_getppid")
    assert find_compartment(target.memory).nonce != h.nonce


def test_web01_has_the_stub_by_default(web01, guest):
    assert web01.stub
    assert "shadow_stub" in guest("cat /proc/modules")
