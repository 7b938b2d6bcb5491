"""``bench scale``'s summary: ratios and issue 12's targets from one run's rows (synthetic)."""

from shadowvol.bench import SCALE_TARGETS, summarize_scale

LIVE, STOCK, DRGN = "shadowvol live", "stock vol -f (raw copy)", "drgn --qemu (debug vmlinux)"


def _rows(sizes: dict[int, dict[tuple[str, str], float | str]]) -> list[dict]:
    return [{"tasks": n, "tool": tool, "plugin": plugin, "median_s": secs, "rss_mb": 50}
            for n, cells in sizes.items() for (tool, plugin), secs in cells.items()]


def _one(summary: list[dict], n: int, plugin: str) -> dict:
    [row] = [r for r in summary if r["tasks"] == n and r["plugin"] == plugin]
    return row


def test_ratios_and_cost_per_task():
    rows = _rows({
        50: {(LIVE, "linux.pslist"): 0.2, (LIVE, "linux.psaux"): 0.25, (LIVE, "linux.psxview"): 0.3,
             (STOCK, "linux.pslist"): 4.0, (STOCK, "linux.psaux"): 5.0,
             (DRGN, "pslist's fields"): 0.4, (DRGN, "psaux's fields"): 0.5, (DRGN, "for_each_task"): 0.1},
        2050: {(LIVE, "linux.pslist"): 0.8, (LIVE, "linux.psaux"): 1.25, (LIVE, "linux.psxview"): 0.3,
               (STOCK, "linux.pslist"): 8.0, (STOCK, "linux.psaux"): 25.0,
               (DRGN, "pslist's fields"): 0.4, (DRGN, "psaux's fields"): 2.5, (DRGN, "for_each_task"): 0.1},
    })
    summary = summarize_scale(rows)
    assert [(r["tasks"], r["plugin"]) for r in summary] == [
        (50, "linux.pslist"), (2050, "linux.pslist"), (50, "linux.psaux"), (2050, "linux.psaux")]
    small, large = _one(summary, 50, "linux.pslist"), _one(summary, 2050, "linux.pslist")
    assert (small["x_stock_vol"], small["x_drgn_same_work"], small["per_task_ms"]) == (20.0, 2.0, "-")
    # each plugin against stock's run of the same plugin and drgn's same work, never for_each_task
    assert (large["x_stock_vol"], large["x_drgn_same_work"], large["per_task_ms"]) == (10.0, 0.5, 0.3)
    psaux = _one(summary, 2050, "linux.psaux")
    assert (psaux["x_stock_vol"], psaux["x_drgn_same_work"], psaux["per_task_ms"]) == (20.0, 2.0, 0.5)
    assert small["targets"] == f"<={SCALE_TARGETS['small'][1]} s met"
    assert large["targets"] == "<=0.5 s missed; >=20x stock missed; <=0.15 ms/task missed"
    assert psaux["targets"] == "<=0.5 s missed; >=20x stock met; <=0.15 ms/task missed"


def test_targets_met_at_their_bounds_and_missing_peers():
    rows = _rows({
        56: {(LIVE, "linux.pslist"): 0.25, (STOCK, "linux.pslist"): 2.0},
        500: {(LIVE, "linux.pslist"): 0.3},
        2056: {(LIVE, "linux.pslist"): 0.5, (STOCK, "linux.pslist"): 10.0,
               ("drgn --qemu", "-"): "n/a"},
    })
    summary = summarize_scale(rows)
    assert [r["plugin"] for r in summary] == ["linux.pslist"] * 3  # no psaux measured: no psaux rows
    assert _one(summary, 56, "linux.pslist")["targets"] == "<=0.25 s met"
    middle = _one(summary, 500, "linux.pslist")
    assert middle["x_stock_vol"] == "n/a" and middle["x_drgn_same_work"] == "n/a"
    assert middle["targets"] == "<=0.15 ms/task met"
    large = _one(summary, 2056, "linux.pslist")
    assert large["per_task_ms"] == 0.125 and large["x_stock_vol"] == 20.0
    assert large["targets"] == "<=0.5 s met; >=20x stock met; <=0.15 ms/task met"


def test_no_live_rows_no_summary():
    assert summarize_scale([]) == []
    assert summarize_scale(_rows({50: {(STOCK, "linux.pslist"): 3.0}})) == []
