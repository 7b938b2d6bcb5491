"""Issue 5: linux.psxview on live guests, against the guest's own /proc; rk_hideproc is caught."""

from __future__ import annotations

import json
import re

import pytest

from conftest import ROOT, run_cli

EXTRA = 40
VIEWS_EVERY_TASK_IS_IN = ("task_list", "pid_hash", "task_scan")


def guest_tasks(run) -> dict[int, str]:
    """pid -> comm of every task (threads too), from the guest's /proc."""
    out = run("for d in /proc/[0-9]*/task/[0-9]*; do read -r line < $d/stat 2>/dev/null && echo \"$line\"; done")
    tasks = {}
    for line in out.splitlines():
        m = re.match(r"(\d+) \((.*)\) ", line)
        if m:
            tasks[int(m.group(1))] = m.group(2)
    return tasks


def same_comm(task_comm: str, proc_comm: str) -> bool:
    """task->comm against /proc's name (kworkers add their workqueue; comm keeps 15 characters)."""
    return (proc_comm == task_comm or proc_comm.startswith(task_comm + "-")
            or (len(task_comm) == 15 and proc_comm.startswith(task_comm)))


def psxview(vm: str, *opts: str) -> list[dict]:
    r = run_cli("-vm", vm, "-r", "json", "linux.psxview", *opts)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


# -- live ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def busy(web01, guest):
    """web01 with EXTRA idle processes (distinct comms) and one always-runnable busy loop."""
    guest(f"rm -f /tmp/px.pids; for i in $(seq {EXTRA}); do ln -sf /usr/bin/sv-idle /tmp/sv-px$i; "
          "/tmp/sv-px$i >/dev/null 2>&1 & echo $! >> /tmp/px.pids; done; "
          "sv-syscall-loop 2000000000 >/dev/null 2>&1 & echo $! > /tmp/px.loop; sleep 0.5")
    yield int(guest("cat /tmp/px.loop").strip())
    guest("kill $(cat /tmp/px.pids /tmp/px.loop) 2>/dev/null; true", check=False)


@pytest.mark.live
def test_clean_guest_every_task_in_every_view(busy, guest):
    before = guest_tasks(guest)
    rows = psxview("web01")
    after = guest_tasks(guest)
    stable = {pid: c for pid, c in before.items() if after.get(pid) == c}
    assert len(stable) >= EXTRA + 20
    by_pid = {row["PID"]: row for row in rows}
    for pid, comm in stable.items():
        if pid == 0:
            continue
        row = by_pid.get(pid)
        assert row is not None, f"psxview misses {pid} {comm}"
        assert same_comm(row["COMM"], comm), (row, comm)
        assert all(row[v] for v in VIEWS_EVERY_TASK_IS_IN), row
    assert not [row for row in rows if row["Hidden"]]
    # Nothing invented: every task psxview reports existed in one of the guest's views.
    assert set(by_pid) <= set(before) | set(after)
    # The busy loop is always runnable: it is on a run queue (CFS tree or rq->curr).
    assert by_pid[busy]["runqueue"] is True
    assert sum(1 for row in rows if row["COMM"].startswith("sv-px")) == EXTRA


@pytest.fixture(scope="module")
def rk_vm(image):
    """A throw-away guest for the kit (it races fork/exit: never on the shared web01)."""
    from shadowvol.vm import qemu

    entry = qemu.start_vm("h4rk", image, memory="256M", stub=False)
    yield entry
    qemu.stop_vm("h4rk")


@pytest.mark.live
def test_rk_hideproc_is_caught_with_its_pid_and_comm(rk_vm, image):
    from shadowvol.vm.console import vm_cp, vm_exec
    from shadowvol.vm.kmod import build_module

    def run(cmd: str) -> str:
        rc, out = vm_exec(rk_vm, cmd, timeout=60)
        assert rc == 0, out
        return out.decode(errors="replace")

    vm_cp(rk_vm, build_module(image, ROOT / "tests/kits/rk_hideproc")[0], "/tmp/rk_hideproc.ko")
    pid = int(run("ln -sf /usr/bin/sv-idle /tmp/sv-secret; /tmp/sv-secret >/dev/null 2>&1 & echo $!").split()[-1])
    rows = psxview("h4rk")
    assert not [r for r in rows if r["Hidden"]]
    assert [r["COMM"] for r in rows if r["PID"] == pid and r["task_list"]] == ["sv-secret"]

    run(f"insmod /tmp/rk_hideproc.ko pid={pid}")
    assert run(f"cat /proc/{pid}/comm").strip() == "sv-secret"  # alive, still in the pid IDR
    pslist = run_cli("-vm", "h4rk", "-r", "json", "linux.pslist")
    assert pslist.returncode == 0 and pid not in {r["PID"] for r in json.loads(pslist.stdout)}
    rows = psxview("h4rk")
    hidden = [r for r in rows if r["Hidden"]]
    assert [(r["PID"], r["COMM"]) for r in hidden] == [(pid, "sv-secret")], hidden
    assert (hidden[0]["task_list"], hidden[0]["pid_hash"], hidden[0]["task_scan"]) == (False, True, True)
    only = psxview("h4rk", "--hidden-only")
    assert [(r["PID"], r["COMM"]) for r in only] == [(pid, "sv-secret")]

    run("rmmod rk_hideproc")  # relinks the task
    rows = psxview("h4rk")
    assert not [r for r in rows if r["Hidden"]]
    assert [r["task_list"] for r in rows if r["PID"] == pid] == [True]


@pytest.mark.live
def test_task_hidden_from_task_list_and_pid_hash_is_found_by_the_slab_scan(rk_vm, image):
    """rk_hideproc pidhash=1: the guest's own tools (kill, ps, /proc readdir) lose the task too."""
    from shadowvol.vm.console import vm_cp, vm_exec
    from shadowvol.vm.kmod import build_module

    def run(cmd: str, check: bool = True) -> str:
        rc, out = vm_exec(rk_vm, cmd, timeout=60)
        assert rc == 0 or not check, out
        return out.decode(errors="replace")

    vm_cp(rk_vm, build_module(image, ROOT / "tests/kits/rk_hideproc")[0], "/tmp/rk_hideproc.ko")
    pid = int(run("ln -sf /usr/bin/sv-idle /tmp/sv-ghost; /tmp/sv-ghost >/dev/null 2>&1 & echo $!").split()[-1])
    run(f"insmod /tmp/rk_hideproc.ko pid={pid} pidhash=1")
    try:
        assert "No such process" in run(f"kill -0 {pid}", check=False)  # the kit worked
        assert str(pid) not in run("ls /proc").split()
        assert "sv-ghost" not in run("ps -o pid,comm")
        rows = psxview("h4rk")
        hidden = [r for r in rows if r["Hidden"]]
        assert [(r["PID"], r["COMM"]) for r in hidden] == [(pid, "sv-ghost")], hidden
        assert (hidden[0]["task_list"], hidden[0]["pid_hash"], hidden[0]["task_scan"]) == (False, False, True)
        assert "not in pid hash" in hidden[0]["Notes"]
    finally:
        run("rmmod rk_hideproc")  # relinks the task and re-registers its pid
    run(f"kill -0 {pid}")  # it was alive all along
    assert not [r for r in psxview("h4rk") if r["Hidden"]]
    run(f"kill {pid}")
