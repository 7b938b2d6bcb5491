"""Shared fixtures: the guest image and a live web01 guest, booted once per session.

Live tests run against real QEMU guests built from Debian packages. The run
directory (registry, sockets, RAM files) is private to the test session, so a
user's own VMs are never touched; the image cache is shared.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from hypothesis import settings as hypothesis_settings

ROOT = Path(__file__).resolve().parents[1]

# Property tests draw new inputs on every run but keep no example database in the checkout
# (.hypothesis/): nothing is remembered between runs, and a failure prints the example
# (and a reproduction blob) to pin with @example.
hypothesis_settings.register_profile("shadowvol", database=None, print_blob=True)
hypothesis_settings.load_profile("shadowvol")


@pytest.fixture(scope="session", autouse=True)
def private_run_dir():
    with tempfile.TemporaryDirectory(prefix="svtest-run-") as run, \
            tempfile.TemporaryDirectory(prefix="svtest-", dir="/dev/shm") as shm:
        os.environ["SHADOWVOL_RUN"] = run
        os.environ["SHADOWVOL_SHM"] = shm
        yield Path(run)
        from shadowvol.vm import registry, qemu

        for e in registry.list_vms():
            qemu.stop_vm(e.name)


@pytest.fixture(scope="session")
def image():
    from shadowvol.vm.image import build_image

    img, _ = build_image()
    return img


@pytest.fixture(scope="session")
def web01(image, private_run_dir):
    """A running guest with KASLR on (the default), shared by the session."""
    from shadowvol.vm import qemu

    entry = qemu.start_vm("web01", image)
    yield entry
    qemu.stop_vm("web01")


@pytest.fixture(scope="session")
def guest(web01):
    """Run a shell command in web01; returns its output (asserts status 0)."""
    from shadowvol.vm.console import vm_exec

    def run(cmd: str, check: bool = True, timeout: float = 120.0) -> str:
        rc, out = vm_exec(web01, cmd, timeout=timeout)
        if check:
            assert rc == 0, f"guest command {cmd!r} failed ({rc}): {out.decode(errors='replace')}"
        return out.decode(errors="replace")

    return run


def run_cli(*args: str, timeout: float = 300.0) -> subprocess.CompletedProcess:
    """Run the shadowvol CLI as a user would, in the test's environment."""
    return subprocess.run([sys.executable, "-m", "shadowvol", *args], capture_output=True,
                          text=True, timeout=timeout, env=os.environ.copy())


def start_attached_trace(web01, guest) -> subprocess.Popen:
    """``shadowvol trace --backend libvmi --syscalls`` on web01 in a new process,
    returned once it has printed events (attached, breakpoints in); a syscall
    loop in the guest fills its block-buffered pipe. The caller kills the loop."""
    guest("sv-syscall-loop 4000000000 >/dev/null 2>&1 </dev/null & true")
    proc = subprocess.Popen([sys.executable, "-m", "shadowvol", "trace", "-vm", web01.name, "--backend",
                             "libvmi", "--syscalls", "--duration", "120"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=os.environ.copy())
    if not proc.stdout.readline():
        proc.kill()
        proc.wait()
        raise AssertionError(f"the trace printed no event: {proc.stderr.read().decode()}")
    return proc


def guest_ps(guest) -> dict[int, tuple[int, str]]:
    """pid -> (ppid, comm) from the guest's own /proc/PID/stat."""
    out = guest("for d in /proc/[0-9]*; do read -r line < $d/stat 2>/dev/null && echo \"$line\"; done")
    procs = {}
    for line in out.splitlines():
        m = re.match(r"(\d+) \((.*)\) \S+ (\d+)", line)
        if m:
            procs[int(m.group(1))] = (int(m.group(3)), m.group(2))
    return procs


def pslist(*extra: str, backend: str = "shadow") -> dict[int, tuple[int, str]]:
    r = run_cli(*extra, "--backend", backend, "-r", "json", "linux.pslist")
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)
    return {row["PID"]: (row["PPID"], row["COMM"]) for row in rows}


def same_comm(task_comm: str, proc_comm: str) -> bool:
    """task->comm (what memory holds) against /proc/PID/stat's name.

    /proc shows kworkers as "kworker/0:1-events" (task->comm plus the
    workqueue) and kthreads by their full name, of which task->comm keeps
    the first TASK_COMM_LEN - 1 = 15 characters.
    """
    return (proc_comm == task_comm or proc_comm.startswith(task_comm + "-")
            or (len(task_comm) == 15 and proc_comm.startswith(task_comm)))


def assert_pslist_is_guest_ps(guest, backend: str, comm_prefix: str, expected: int,
                              vm: str = "web01") -> dict[int, tuple[int, str]]:
    """pslist (live, ``backend``) against the guest's own /proc, read before and after.

    Every task stable across both reads must be listed with its ppid and comm;
    nothing may be invented; exactly ``expected`` stable tasks have a comm
    starting with ``comm_prefix``. Returns pslist's rows.
    """
    before = guest_ps(guest)
    ours = pslist("-vm", vm, backend=backend)
    after = guest_ps(guest)
    stable = {pid: v for pid, v in before.items() if after.get(pid) == v}
    assert sum(1 for _, c in stable.values() if c.startswith(comm_prefix)) == expected
    missing = {pid: v for pid, v in stable.items() if pid not in ours}
    assert not missing, f"pslist misses {len(missing)} tasks, e.g. {list(missing.items())[:3]}"
    for pid, (ppid, comm) in stable.items():
        assert ours[pid][0] == ppid and same_comm(ours[pid][1], comm), (pid, ours[pid], (ppid, comm))
    assert set(ours) <= set(before) | set(after)
    return ours
