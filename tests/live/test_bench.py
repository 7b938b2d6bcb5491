"""``shadowvol bench reads`` on a live guest: each row says what it measured.

No timing is asserted (figures go in the README); what must hold is that the
rows name the interface each backend really read through, for a VM we
started (gdbstub) and for one reached through its QMP socket (``xp``), and
that the VM keeps running afterwards.
"""

from __future__ import annotations

import json

from conftest import run_cli
from shadowvol.qemu.qmp import QMPClient


def _rows(spec: str) -> list[dict]:
    r = run_cli("bench", "reads", "-vm", spec, "-r", "json", timeout=600)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def _running(qmp: str) -> bool:
    with QMPClient(qmp) as q:
        return bool(q.query("query-status").get("running"))


def test_bench_reads_rows_say_what_they_measure(web01):
    rows = _rows(web01.name)
    assert {(r["backend"], r["address_kind"], r["size"]) for r in rows} == {
        (b, k, s) for b in ("shadow", "libvmi") for k in ("physical", "kernel_virtual") for s in (4, 64, 4096)}
    through = {r["backend"]: r["reads_through"] for r in rows}
    assert through["shadow"].startswith("mmap of the guest RAM file")
    assert through["libvmi"].startswith("gdbstub 'm' packets")
    assert all(r["median_us"] > 0 for r in rows)
    assert _running(web01.qmp)  # the gdbstub detached: the VM runs again


def test_bench_reads_through_a_qmp_socket(web01):
    from shadowvol.bench import bench_reads

    # Few repeats: each xp is a QMP round trip (the labels are what is checked here).
    rows = bench_reads(f"qmp:{web01.qmp}", repeat_shadow=200, repeat_libvmi=5)
    through = {r["backend"]: r["reads_through"] for r in rows}
    assert through["libvmi"].startswith("QMP human-monitor-command xp")
    assert _running(web01.qmp)


def test_bench_floor_keeps_the_plugins_answer_and_the_vm_running(web01):
    """``bench floor`` (issue 12): the stock per-task calls, on tasks whose members
    were made plain attributes, must give the answer they gave through our object
    model, else the command fails; the VM it paused runs again."""
    r = run_cli("bench", "floor", "-vm", web01.name, "-r", "json", "--runs", "1", timeout=600)
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    labels = ("whole command", "1. ", "2. ", "3. ", "4. ", "rest of the command", "floor")
    assert len(rows) == len(labels) and all(row["what"].startswith(w) for row, w in zip(rows, labels))
    assert len({row["tasks"] for row in rows}) == 1 and rows[0]["tasks"] > 20
    assert all(row["median_s"] > 0 for row in rows[:5])
    assert _running(web01.qmp)
