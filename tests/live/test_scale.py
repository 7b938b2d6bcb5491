"""Issue 12: stock pslist with 1,000 more tasks equals the guest's ps, on both backends.

Timing belongs to ``shadowvol bench scale`` (side by side with stock vol and
drgn); here only the answer is checked, with the volatility3 adaptations of
volbridge in place.
"""

from __future__ import annotations

import pytest

from conftest import guest_ps, pslist, same_comm
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
    before = guest_ps(guest)
    ours = pslist("-vm", "web01", backend=backend)
    after = guest_ps(guest)
    stable = {pid: v for pid, v in before.items() if after.get(pid) == v}
    assert sum(1 for _, c in stable.values() if c.startswith("sv-s")) == TASKS
    missing = {pid: v for pid, v in stable.items() if pid not in ours}
    assert not missing, f"pslist misses {len(missing)} tasks, e.g. {list(missing.items())[:3]}"
    for pid, (ppid, comm) in stable.items():
        assert ours[pid][0] == ppid and same_comm(ours[pid][1], comm), (pid, ours[pid], (ppid, comm))
    assert set(ours) <= set(before) | set(after)
    assert len(ours) >= TASKS + 40
