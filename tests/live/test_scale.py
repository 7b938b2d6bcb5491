"""Issue 12: stock pslist with 1,000 more tasks equals the guest's ps, on both backends.

Timing belongs to ``shadowvol bench scale`` (side by side with stock vol and
drgn); here only the answer is checked, with the volatility3 adaptations of
volbridge in place.
"""

from __future__ import annotations

import pytest

from conftest import assert_pslist_is_guest_ps
from shadowvol import bench

pytestmark = pytest.mark.live

TASKS = 1000


@pytest.fixture(scope="module")
def crowded(web01, guest):
    bench._set_idle_tasks(web01, TASKS)
    yield web01
    bench._set_idle_tasks(web01, 0)


@pytest.mark.parametrize("backend", ["shadow", "libvmi"])
def test_pslist_at_1000_tasks_equals_guest_ps(crowded, guest, backend):
    ours = assert_pslist_is_guest_ps(guest, backend, "sv-s", TASKS)
    assert len(ours) >= TASKS + 40


def _rendered(grid) -> str:
    import contextlib
    import io

    from volatility3.cli import text_renderer

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        text_renderer.QuickTextRenderer().render(grid)
    return out.getvalue()


def _tasks_alive() -> int:
    import gc

    gc.collect()
    return sum(1 for o in gc.get_objects() if type(o).__name__ == "task_struct")


def test_rows_keep_plain_values_not_the_tasks(crowded):
    """run_plugin's grid (rows detached: volbridge.detach_rows) renders as the stock
    grid does, and once rendered keeps no task object alive; the stock grid keeps one
    for each row (the memory each row held at scale)."""
    from volatility3.framework import interfaces

    from shadowvol import volbridge
    from shadowvol.qemu.qmp import QMPClient
    from shadowvol.run import run_plugin
    from shadowvol.target import open_target

    with QMPClient(crowded.qmp) as q:
        q.execute("stop")
        t = open_target(vm=crowded.name)
        try:
            detached = run_plugin(t, "linux.pslist")
            text = _rendered(detached)
            cells: list = []
            detached.visit(None, lambda node, acc: acc.extend(node.values) or acc, cells)
            kept_detached = _tasks_alive()
            ctx = volbridge.build_context(t.memory, t.kernel, t.location, t.isf, isf_url=t.profile_path.as_uri())
            stock = volbridge.construct_plugin(ctx, volbridge.load_plugin("linux.pslist"), {}).run()
            assert _rendered(stock) == text
            kept_stock = _tasks_alive()
        finally:
            t.close()
            q.execute("cont")
    assert text.count("\tsv-s") == TASKS
    assert not any(isinstance(cell, interfaces.objects.ObjectInterface) for cell in cells)
    assert kept_detached < 10 and kept_stock >= kept_detached + TASKS


def test_a_watch_look_holds_no_tasks_while_its_rows_are_read(crowded, monkeypatch):
    """``watch`` keeps a look's rows for the next tick's diff, and reads them off
    the populated grid: the grid's rows hold values, so no task_struct is kept
    alive by them while they are read (stock rows kept one per task)."""
    from shadowvol import volbridge, watch
    from shadowvol.qemu.qmp import QMPClient
    from shadowvol.target import open_target

    alive: list[int] = []
    real_grid_rows = watch.grid_rows

    def counting_grid_rows(grid):
        rows = real_grid_rows(grid)  # the grid stays populated here
        alive.append(_tasks_alive())
        return rows

    monkeypatch.setattr(watch, "grid_rows", counting_grid_rows)
    with QMPClient(crowded.qmp) as q:
        q.execute("stop")
        t = open_target(vm=crowded.name)
        try:
            look = watch._Boot(t).look(volbridge.load_plugin("linux.pslist"), {}, pause=None)
        finally:
            t.close()
            q.execute("cont")
    assert sum(1 for row in look.rows if str(row["COMM"]).startswith("sv-s")) == TASKS
    assert alive and alive[0] < 10
