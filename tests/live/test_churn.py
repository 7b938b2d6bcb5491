"""Issue 5: a guest under process churn (fork/exit loop) never makes a plugin fail.

Runs pass --partial: on a running guest a walk can meet a task being unlinked;
shadowvol looks once more in a new epoch, and if the walk breaks again it says
so in one line (exit 3 without --partial, issue 9).
"""

from __future__ import annotations

import json

import pytest

from conftest import run_cli

pytestmark = pytest.mark.live

RUNS = 10
PLUGINS = ("linux.pslist", "linux.psxview", "linux.check_modules")
# Stock plugins that read more of each process (psaux: its argv in user memory).
STOCK = ("linux.pstree", "linux.psaux", "linux.lsmod", "linux.kmsg")


def _only_warnings(stderr: str) -> None:
    """A walk the running guest changed under us is retried once, then reported
    in one line (issue 9); --partial accepts it. Nothing else may be printed."""
    for line in stderr.splitlines():
        assert line.startswith("shadowvol: warning: a walk ran into unreadable memory"), stderr


@pytest.fixture
def churn(web01, guest):
    pid = int(guest("sv-forkexec 100000000 >/dev/null 2>&1 & echo $!").split()[-1])
    yield pid
    guest(f"kill {pid}; true", check=False)


def test_plugins_survive_fork_exit_churn(churn, guest):
    last_pid = lambda: int(guest("cat /proc/sys/kernel/ns_last_pid").strip())  # noqa: E731
    start = last_pid()
    for i in range(RUNS):
        for plugin in PLUGINS:
            r = run_cli("-vm", "web01", "-r", "json", "--partial", plugin)
            assert r.returncode == 0, f"run {i} of {plugin}: {r.stderr}"
            _only_warnings(r.stderr)
            rows = json.loads(r.stdout)
            assert rows, plugin
            if plugin == "linux.psxview":
                # Tasks born or reaped while we look are noted, never called hidden.
                assert not [row for row in rows if row["Hidden"]], rows
    assert last_pid() - start > RUNS, "no churn happened"
    assert guest(f"cat /proc/{churn}/comm").strip() == "sv-forkexec"


def test_stock_plugins_survive_fork_exit_churn(churn, guest):
    """Processes vanish mid-read; the stock plugins still finish, on both backends."""
    for i in range(3):
        for plugin in STOCK:
            for backend in ("shadow", "libvmi"):
                r = run_cli("-vm", "web01", "--backend", backend, "-r", "json", "--partial", plugin)
                assert r.returncode == 0, f"run {i} of {plugin} ({backend}): {r.stderr}"
                _only_warnings(r.stderr)
                assert json.loads(r.stdout), plugin

