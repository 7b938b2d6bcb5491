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
