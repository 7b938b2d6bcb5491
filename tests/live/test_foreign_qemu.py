"""The shadow backend on a QEMU whose RAM is plain anonymous memory (as a VM
started by someone else has it): found through QMP, read via /proc/PID/mem."""

from __future__ import annotations

import pytest

from conftest import guest_ps, pslist, same_comm
from shadowvol.vm import qemu
from shadowvol.vm.console import vm_exec

pytestmark = pytest.mark.live


@pytest.fixture(scope="module")
def anon(image):
    e = qemu.start_vm("anon1", image, memory="384M", anonymous_ram=True, stub=False)
    yield e
    qemu.stop_vm("anon1")


def test_anonymous_guest_has_no_ram_file(anon):
    assert anon.ram_file == ""
    assert b"memory-backend-file" not in open(f"/proc/{anon.pid}/cmdline", "rb").read()


@pytest.mark.parametrize("spec", ["qmp", "pid", "name"])
def test_pslist_through_qmp_and_pid_equals_guest_ps(anon, spec):
    def run(cmd: str) -> str:
        rc, out = vm_exec(anon, cmd)
        assert rc == 0
        return out.decode()

    target = {"qmp": f"qmp:{anon.qmp}", "pid": f"pid:{anon.pid}", "name": "anon1"}[spec]
    before = guest_ps(run)
    ours = pslist("-vm", target)
    after = guest_ps(run)
    stable = {pid: v for pid, v in before.items() if after.get(pid) == v}
    assert len(stable) > 30
    for pid, (ppid, comm) in stable.items():
        assert pid in ours and ours[pid][0] == ppid and same_comm(ours[pid][1], comm), pid
    assert set(ours) <= set(before) | set(after)


def test_bad_foreign_targets(anon):
    from conftest import run_cli

    for spec, needle in (("qmp:/nonexistent.sock", "does not exist"), ("pid:notanumber", "invalid pid"),
                         ("pid:1", "")):
        r = run_cli("-vm", spec, "linux.pslist")
        assert r.returncode != 0
        err = r.stderr.strip()
        assert len(err.splitlines()) == 1 and "Traceback" not in err and needle in err, err


@pytest.mark.parametrize("spec", ["qmp", "pid", "name"])
def test_target_keeps_the_endpoints_it_found(anon, spec):
    """pid: finds the QMP socket on QEMU's command line and keeps it: the kernel is then
    located from VMCOREINFO or CR3, never by scanning all of guest memory."""
    from shadowvol.target import open_target

    t = open_target(vm={"qmp": f"qmp:{anon.qmp}", "pid": f"pid:{anon.pid}", "name": "anon1"}[spec])
    try:
        assert t.endpoints.qmp == anon.qmp
        assert t.location.source != "scan", t.location
        assert (t.vm is not None) == (spec == "name")
        assert t.endpoints.gdb == (anon.gdb if spec == "name" else None)
        assert t.memory.metadata()["backend"] == "shadow-process"
    finally:
        t.close()
