"""Host-side integrity checks of the guest stub, against a kit that tampers with it.

Uses its own guest (h6x, stub loaded), because the kit damages the stub.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from shadowvol.integrity import check_integrity, find_module, ko_text_layout, stub_ko_path
from shadowvol.target import open_target

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def stubvm(image, private_run_dir):
    from shadowvol.vm import qemu

    assert image.manifest.get("stub") and stub_ko_path(image.release).exists(), \
        "the image has no guest stub (shadowvol vm build builds guest_stub/)"
    entry = qemu.start_vm("h6x", image, stub=True)
    yield entry
    qemu.stop_vm("h6x")


@pytest.fixture(scope="module")
def kit(image):
    from shadowvol.vm.kmod import build_module

    return build_module(image, ROOT / "tests" / "kits" / "rk_stubtamper")[0]


def _sh(entry, cmd: str, check: bool = True) -> str:
    from shadowvol.vm.console import vm_exec

    rc, out = vm_exec(entry, cmd, timeout=60)
    text = out.decode(errors="replace")
    assert rc == 0 or not check, f"{cmd!r} failed ({rc}): {text}"
    return text


def check(entry):
    """``shadowvol trace-check -vm NAME`` as a function: open the target, check, close."""
    t = open_target(vm=entry.name)
    try:
        return check_integrity(t)
    finally:
        t.close()


def _statuses(rep) -> dict[str, str]:
    return {f.check: f.status for f in rep.findings}


def test_intact_stub_passes(stubvm):
    rep = check(stubvm)
    assert rep.ok, rep.to_json()
    st = _statuses(rep)
    assert st["code.ko"] == "ok" and st["hook.sys_enter"] == "ok" and st["rings"] == "ok"
    assert rep.facts["code_bytes_compared"] > 100
    rep2 = check(stubvm)  # trust-on-first-use: now compares against the first sight
    assert rep2.ok and "unchanged" in next(f.detail for f in rep2.findings if f.check == "code.tofu")


def test_foreign_probe_before_stub_detected(stubvm, kit):
    from shadowvol.vm.console import vm_cp

    vm_cp(stubvm, kit, "/tmp/rk_stubtamper.ko")
    _sh(stubvm, "insmod /tmp/rk_stubtamper.ko mode=probe")
    rep = check(stubvm)
    assert not rep.ok
    f = next(f for f in rep.findings if f.check == "hook.sys_enter")
    assert f.status == "TAMPERED" and "foreign" in f.detail and "rk_stubtamper" in f.detail, f
    _sh(stubvm, "rmmod rk_stubtamper")
    assert check(stubvm).ok


def test_unhooked_stub_detected(stubvm, kit):
    _sh(stubvm, "insmod /tmp/rk_stubtamper.ko mode=unhook")
    rep = check(stubvm)
    f = next(f for f in rep.findings if f.check == "hook.sys_enter")
    assert f.status == "TAMPERED" and "not registered" in f.detail, f
    _sh(stubvm, "rmmod rk_stubtamper")


def test_code_byte_patch_detected(stubvm, image):
    # A byte the loader never rewrites, inside the stub's exit function (cold code).
    ko = ko_text_layout(stub_ko_path(image.release))
    t = open_target(vm=stubvm.name)
    try:
        mod = find_module(t, "shadow_stub")
    finally:
        t.close()
    off = next(o for o, n in ko.symbols.items() if n == "cleanup_module")
    sec = next(name for name, (base, data) in ko.sections.items() if base <= off < base + len(data))
    base = ko.sections[sec][0]
    i = next(i for i in range(off - base + 8, len(ko.masks[sec])) if not ko.masks[sec][i])
    addr = mod.core_base + base + i
    _sh(stubvm, f"insmod /tmp/rk_stubtamper.ko mode=code addr={addr}")
    rep = check(stubvm)
    st = _statuses(rep)
    assert st["code.ko"] == "TAMPERED" and st["code.tofu"] == "TAMPERED", rep.to_json()
    assert "cleanup_module" in next(f.detail for f in rep.findings if f.check == "code.ko")


def test_cli_reports_tampering(stubvm):
    import json

    from tests.conftest import run_cli

    p = run_cli("trace-check", "-vm", stubvm.name, "-r", "json")
    assert p.returncode == 3, p.stderr
    assert json.loads(p.stdout)["ok"] is False
