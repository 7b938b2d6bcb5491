"""Issue 5: linux.psxview on live guests, against the guest's own /proc; rk_hideproc is caught."""

from __future__ import annotations

import json
import re
import struct
import sys

import pytest

from conftest import ROOT, run_cli

EXTRA = 40
VIEWS_EVERY_TASK_IS_IN = ("task_list", "pid_hash", "task_scan")


def psxview_module():
    from shadowvol.volbridge import load_plugin

    return sys.modules[load_plugin("linux.psxview").__module__]


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


# -- walkers on synthetic memory (bounded, cycle-detecting, partial not crash) --


class _FakeReader:
    """Just what the walkers use of KernelReader, over a dict of 8-byte words."""

    def __init__(self, words: dict[int, int]) -> None:
        self.words = words

    def is_kernel_pointer(self, v: int) -> bool:
        return v >= 0xFFFF800000000000 and v not in (0xDEAD000000000100, 0xDEAD000000000122)

    def u64(self, addr: int):
        return self.words.get(addr)

    def read(self, addr: int, n: int, pad: bool = False):
        if any(a not in self.words for a in range(addr, addr + n, 8)):
            return None
        return b"".join(struct.pack("<Q", self.words[a]) for a in range(addr, addr + n, 8))


K = 0xFFFF888000000000


@pytest.mark.parametrize("case", ["ok", "cycle", "bad", "poison", "unmapped", "bound"])
def test_list_walk_is_bounded_and_flags_partial(case):
    px = psxview_module()
    head, nodes = K, [K + 0x100 * i for i in range(1, 6)]
    chain = [head, *nodes, head]
    words = {a: b for a, b in zip(chain, chain[1:])}
    if case == "cycle":
        words[nodes[3]] = nodes[1]
    elif case == "bad":
        words[nodes[2]] = 0x1234
    elif case == "poison":
        words[nodes[2]] = 0xDEAD000000000100
    elif case == "unmapped":
        words[nodes[2]] = K + 0x9990
    view = px.View("t")
    got = list(px.list_for_each(_FakeReader(words), head, view, limit=3 if case == "bound" else 100))
    if case == "ok":
        assert got == nodes and view.partial == ""
    else:
        assert view.partial and set(got) <= set(nodes) and len(got) <= 5, (got, view.partial)


def test_xarray_walk_survives_a_cycle():
    px = psxview_module()
    r = _FakeReader({})

    class Offs:
        def offsetof(self, t, *p):
            return {("idr", "idr_rt"): 0, ("xarray", "xa_head"): 8, ("xa_node", "slots"): 40}[(t, *p)]

        def array_count(self, t, m):
            return 64

    node = K + 0x1000
    r.words[K + 8] = node | 2  # xa_head -> node
    for i in range(64):
        r.words[node + 40 + 8 * i] = 0
    r.words[node + 40] = K + 0x5000  # an entry
    r.words[node + 48] = node | 2  # a slot pointing back at its own node
    r.offsetof, r.array_count = Offs().offsetof, Offs().array_count
    view = px.View("pid_hash")
    assert list(px.idr_for_each(r, K, view)) == [K + 0x5000]
    assert "cycle" in view.partial


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
