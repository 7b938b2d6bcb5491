"""Issue 5: linux.check_modules / linux.hidden_modules against the guest's /proc/modules and
/sys/module; rk_hidemod is caught by name."""

from __future__ import annotations

import json

import pytest

from conftest import ROOT, run_cli

pytestmark = pytest.mark.live


def plugin_rows(vm: str, plugin: str) -> list[dict]:
    r = run_cli("-vm", vm, "-r", "json", plugin)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def loadable_in_sysfs(run) -> set[str]:
    """Loadable modules in /sys/module (only those have an initstate)."""
    return set(run("for m in /sys/module/*; do [ -e $m/initstate ] && echo ${m##*/}; done; true").split())


def test_clean_guest_no_hidden_module(web01, guest, image):
    from shadowvol.vm.console import vm_cp
    from shadowvol.vm.kmod import build_module

    vm_cp(web01, build_module(image, ROOT / "tests/kits/hello")[0], "/tmp/sv_hello.ko")
    guest("lsmod | grep -q sv_hello || insmod /tmp/sv_hello.ko")
    rows = plugin_rows("web01", "linux.check_modules")
    theirs = {line.split()[0] for line in guest("cat /proc/modules").splitlines()}
    assert "sv_hello" in theirs
    assert {r["Name"] for r in rows if r["module_list"]} == theirs
    assert {r["Name"] for r in rows if r["sysfs"]} == loadable_in_sysfs(guest) == theirs
    for r in rows:
        assert r["module_list"] and r["sysfs"] and r["carve"] and not r["Hidden"], r
    assert plugin_rows("web01", "linux.hidden_modules") == []


@pytest.fixture(scope="module")
def rk_vm(image):
    """A throw-away guest: rk_hidemod cannot be unloaded."""
    from shadowvol.vm import qemu

    entry = qemu.start_vm("h4rkm", image, memory="256M", stub=False)
    yield entry
    qemu.stop_vm("h4rkm")


def test_rk_hidemod_is_caught_by_name(rk_vm, image):
    from shadowvol.vm.console import vm_cp, vm_exec
    from shadowvol.vm.kmod import build_module

    def run(cmd: str) -> str:
        rc, out = vm_exec(rk_vm, cmd, timeout=60)
        assert rc == 0, out
        return out.decode(errors="replace")

    assert not [r for r in plugin_rows("h4rkm", "linux.check_modules") if r["Hidden"]]
    vm_cp(rk_vm, build_module(image, ROOT / "tests/kits/rk_hidemod")[0], "/tmp/rk_hidemod.ko")
    run("insmod /tmp/rk_hidemod.ko")
    assert "rk_hidemod" not in run("cat /proc/modules")  # the kit worked...
    assert "rk_hidemod" in loadable_in_sysfs(run)  # ...and kept its kobject
    rows = plugin_rows("h4rkm", "linux.check_modules")
    hidden = [r for r in rows if r["Hidden"]]
    assert [r["Name"] for r in hidden] == ["rk_hidemod"], rows
    assert (hidden[0]["module_list"], hidden[0]["sysfs"], hidden[0]["carve"]) == (False, True, True)
    theirs = {line.split()[0] for line in run("cat /proc/modules").splitlines()}
    assert {r["Name"] for r in rows if not r["Hidden"]} == theirs
    assert [r["Name"] for r in plugin_rows("h4rkm", "linux.hidden_modules")] == ["rk_hidemod"]
