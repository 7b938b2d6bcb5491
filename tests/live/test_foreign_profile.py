"""Issue 10: a profile from the guest's own memory on a QEMU started by hand:
plain RAM, ``-kernel/-initrd``, no vmcoreinfo device, and an empty profile
store. Free RAM holds a stale copy of the kernel's .BTF (same size, no banner
where kallsyms puts it); every candidate is validated and the next tried."""

from __future__ import annotations

import pytest

from conftest import guest_ps, pslist, same_comm
from shadowvol.vm import qemu
from shadowvol.vm.console import vm_exec

pytestmark = pytest.mark.live


@pytest.fixture(scope="module")
def hand(image):
    import kvm_module.machine as machine

    plain = machine.qemu_command

    def without_vmcoreinfo(m):
        cmd = plain(m)
        i = cmd.index("vmcoreinfo")
        assert cmd[i - 1] == "-device"
        return cmd[:i - 1] + cmd[i + 1:]

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(machine, "qemu_command", without_vmcoreinfo)
        e = qemu.start_vm("hand1", image, memory="384M", anonymous_ram=True, stub=False)
    yield e
    qemu.stop_vm("hand1")


def test_pslist_from_guest_memory_profile_equals_guest_ps(hand, tmp_path, monkeypatch):
    cmdline = open(f"/proc/{hand.pid}/cmdline", "rb").read()
    assert b"vmcoreinfo" not in cmdline and b"memory-backend-file" not in cmdline
    store = tmp_path / "profiles"
    store.mkdir()
    monkeypatch.setenv("SHADOWVOL_PROFILE_DIR", str(store))

    def run(cmd: str) -> str:
        rc, out = vm_exec(hand, cmd)
        assert rc == 0
        return out.decode()

    before = guest_ps(run)
    ours = pslist("-vm", f"qmp:{hand.qmp}")
    after = guest_ps(run)
    assert [p.name for p in store.glob("guest-*.json.xz")], "the profile was built from guest memory"
    stable = {pid: v for pid, v in before.items() if after.get(pid) == v}
    assert len(stable) > 30
    for pid, (ppid, comm) in stable.items():
        assert pid in ours and ours[pid][0] == ppid and same_comm(ours[pid][1], comm), pid
    assert set(ours) <= set(before) | set(after)
