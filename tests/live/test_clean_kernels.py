"""No false positives: every forensic check is clean on each kernel package we
test besides the cloud 6.1 kernel of web01 (covered by each plugin's own
tests): the generic 6.1 flavour (linux-image-amd64) and the 6.12 cloud kernel
(linux-image-6.12-cloud-amd64: IBT endbr64 entries, call-depth and
runtime-constant patch sites, no paravirt patching), each with our guest
stub loaded and probing a syscall handler (its kprobe is reported as ours,
never a finding), and linux.check_text comparing the handlers with the
image the guest booted."""

from __future__ import annotations

import json

import pytest

from conftest import run_cli
from shadowvol.vm import qemu
from shadowvol.vm.image import build_image

pytestmark = pytest.mark.live

FLAVOURS = {"linux-image-amd64": "clean-generic", "linux-image-6.12-cloud-amd64": "clean-612cloud"}
CHECKS = ("linux.check_syscall", "linux.check_idt", "linux.check_modules", "linux.psxview",
          "linux.check_kprobes", "linux.check_ftrace", "linux.check_ebpf", "linux.check_text")


@pytest.fixture(scope="module", params=sorted(FLAVOURS))
def clean(request):
    img, _ = build_image(request.param)
    e = qemu.start_vm(FLAVOURS[request.param], img, memory="512M", stub=True,
                      stub_params={"points": "__x64_sys_getppid"})
    yield e
    qemu.stop_vm(e.name)


def rows(vm: str, plugin: str) -> list[dict]:
    r = run_cli("-vm", vm, "-r", "json", plugin)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_kernel_has_no_findings(clean):
    syscalls = rows(clean.name, "linux.check_syscall")
    assert len(syscalls) > 700 and not [r for r in syscalls if r["Hooked"]]
    idt = rows(clean.name, "linux.check_idt")
    assert len(idt) == 256 and not [r for r in idt if r["Hooked"]]
    mods = rows(clean.name, "linux.check_modules")
    assert not [r for r in mods if r["Hidden"]]
    tasks = rows(clean.name, "linux.psxview")
    assert len(tasks) > 30 and not [r for r in tasks if r["Hidden"]]
    assert all(r["task_list"] and r["pid_hash"] and r["task_scan"] for r in tasks)
    # the stub's probe sits on the handler's ftrace site: kernel text is the image's, byte for byte
    assert rows(clean.name, "linux.check_text") == []


def test_kernel_with_our_stub_has_no_findings_from_any_check(clean):
    probes = rows(clean.name, "linux.check_kprobes")
    assert [(r["Owner"], r["Ours"], r["Finding"]) for r in probes] == [("shadow_stub", True, False)]
    assert not [r for r in rows(clean.name, "linux.check_ftrace") if r["Finding"]]
    assert not [r for r in rows(clean.name, "linux.check_ebpf") if r["Finding"]]
    report = rows(clean.name, "linux.malware_report")
    assert [(r["Check"], r["Verdict"]) for r in report] == [(c, "clean") for c in CHECKS]
