"""No false positives: every forensic check is clean on each kernel package we
test (the cloud kernel's web01 is covered by each plugin's own tests; this
boots the generic flavour, linux-image-amd64), with our guest stub loaded
and probing a syscall handler (its kprobe is reported as ours, never a
finding)."""

from __future__ import annotations

import json

import pytest

from conftest import run_cli
from shadowvol.vm import qemu
from shadowvol.vm.image import build_image

pytestmark = pytest.mark.live


@pytest.fixture(scope="module")
def generic():
    img, _ = build_image("linux-image-amd64")
    e = qemu.start_vm("clean-generic", img, memory="512M", stub=True,
                      stub_params={"points": "__x64_sys_getppid"})
    yield e
    qemu.stop_vm("clean-generic")


def rows(vm: str, plugin: str) -> list[dict]:
    r = run_cli("-vm", vm, "-r", "json", plugin)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_generic_kernel_has_no_findings(generic):
    syscalls = rows(generic.name, "linux.check_syscall")
    assert len(syscalls) > 700 and not [r for r in syscalls if r["Hooked"]]
    idt = rows(generic.name, "linux.check_idt")
    assert len(idt) == 256 and not [r for r in idt if r["Hooked"]]
    mods = rows(generic.name, "linux.check_modules")
    assert not [r for r in mods if r["Hidden"]]
    tasks = rows(generic.name, "linux.psxview")
    assert len(tasks) > 30 and not [r for r in tasks if r["Hidden"]]
    assert all(r["task_list"] and r["pid_hash"] and r["task_scan"] for r in tasks)


def test_generic_kernel_with_our_stub_has_no_findings_from_any_check(generic):
    probes = rows(generic.name, "linux.check_kprobes")
    assert [(r["Owner"], r["Ours"], r["Finding"]) for r in probes] == [("shadow_stub", True, False)]
    assert not [r for r in rows(generic.name, "linux.check_ftrace") if r["Finding"]]
    assert not [r for r in rows(generic.name, "linux.check_ebpf") if r["Finding"]]
    report = rows(generic.name, "linux.malware_report")
    assert [(r["Check"], r["Verdict"]) for r in report] == [
        (c, "clean") for c in ("linux.check_syscall", "linux.check_idt", "linux.check_modules", "linux.psxview",
                               "linux.check_kprobes", "linux.check_ftrace", "linux.check_ebpf", "linux.check_text")]
