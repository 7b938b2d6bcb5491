"""Shared fixtures: the guest image and a live web01 guest, booted once per session.

Live tests run against real QEMU guests built from Debian packages. The run
directory (registry, sockets, RAM files) is private to the test session, so a
user's own VMs are never touched; the image cache is shared.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


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
