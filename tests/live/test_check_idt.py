"""Issue 5: linux.check_idt on a live guest, against the guest's own /proc/kallsyms."""

from __future__ import annotations

import json

import pytest

from conftest import run_cli

pytestmark = pytest.mark.live


@pytest.fixture(scope="module")
def idt(web01) -> list[dict]:
    r = run_cli("-vm", "web01", "-r", "json", "linux.check_idt")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


@pytest.fixture(scope="module")
def kallsyms(guest) -> dict[str, int]:
    syms = {}
    for line in guest("grep -E ' (asm_exc_\\w+|irq_entries_start)$' /proc/kallsyms").splitlines():
        parts = line.split()
        if len(parts) == 3:
            syms.setdefault(parts[2], int(parts[0], 16))
    return syms


def test_clean_guest_has_no_hooked_gates(idt) -> None:
    assert [g["Index"] for g in idt] == list(range(256))
    assert [g for g in idt if g["Hooked"]] == []
    assert all(g["Present"] for g in idt)
    assert {g["Owner"] for g in idt} <= {"kernel", "kernel-init"}


def test_handlers_match_guest_kallsyms(idt, kallsyms) -> None:
    gates = {g["Index"]: g for g in idt}
    for vec, name in ((0, "asm_exc_divide_error"), (3, "asm_exc_int3"), (13, "asm_exc_general_protection"),
                      (14, "asm_exc_page_fault"), (2, "asm_exc_nmi")):
        assert gates[vec]["Address"] == kallsyms[name], vec
        assert gates[vec]["Symbol"] == name
        assert gates[vec]["Owner"] == "kernel"
    # Device vectors go through irq_entries_start, 8 bytes per vector (idt_setup_apic_and_irq_gates).
    irq = [g for g in idt if g["Symbol"].startswith("irq_entries_start")]
    assert len(irq) > 100
    for g in irq:
        assert g["Address"] == kallsyms["irq_entries_start"] + 8 * (g["Index"] - 32)


def test_exceptions_without_a_handler_keep_the_early_one(idt, kallsyms) -> None:
    """Reserved exception vectors point into early_idt_handler_array (freed init text): not a hook."""
    early = [g for g in idt if g["Owner"] == "kernel-init"]
    for g in early:
        assert g["Index"] < 32
        assert g["Symbol"].startswith("early_idt_handler_array")
        assert not g["Hooked"]


# Issue 14: an IDT hook whose module hides from the module list and sysfs is still named.

@pytest.fixture(scope="module")
def idt_ghost(image):
    """A throw-away guest (rk_idtghost cannot be unloaded) with the kit copied in."""
    from conftest import ROOT
    from shadowvol.vm import qemu
    from shadowvol.vm.console import vm_cp, vm_exec
    from shadowvol.vm.kmod import build_module

    entry = qemu.start_vm("idt14", image, memory="512M")

    def run(cmd: str) -> str:
        rc, out = vm_exec(entry, cmd, timeout=120.0)
        assert rc == 0, f"guest command {cmd!r} failed ({rc}): {out.decode(errors='replace')}"
        return out.decode(errors="replace")

    vm_cp(entry, build_module(image, ROOT / "tests/kits/rk_idtghost")[0], "/tmp/rk_idtghost.ko")
    yield entry.name, run
    qemu.stop_vm(entry.name)


def _rows(vm: str, plugin: str) -> list[dict]:
    r = run_cli("-vm", vm, "-r", "json", plugin)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_idt_hook_of_a_hidden_module_names_the_culprit(idt_ghost) -> None:
    import re

    vm, run = idt_ghost
    before = _rows(vm, "linux.check_idt")
    assert [g for g in before if g["Hooked"]] == []
    run("insmod /tmp/rk_idtghost.ko")
    said = re.search(r"rk_idtghost: vector (0x[0-9a-f]+) -> ([0-9a-f]+), int \$0x80 answered (\d+), hidden",
                     run("dmesg | grep rk_idtghost:"))
    vector, stub, answer = int(said.group(1), 16), int(said.group(2), 16), int(said.group(3))
    assert answer == 1337  # the kit works: its stub answered the interrupt
    assert "Call Trace" not in run("dmesg")  # and the kernel did not complain (an unpatched return thunk...)
    assert "rk_idtghost" not in run("cat /proc/modules") and "rk_idtghost" not in run("ls /sys/module")  # hidden
    after = _rows(vm, "linux.check_idt")
    hooked = [g for g in after if g["Hooked"]]
    assert [(g["Index"], g["Address"], g["Owner"], g["Symbol"]) for g in hooked] == \
        [(vector, stub, "hidden:rk_idtghost", "rk_idt_stub [hidden:rk_idtghost]")]
    assert [g for g in after if g["Index"] != vector] == [g for g in before if g["Index"] != vector]
    report = _rows(vm, "linux.malware_report")
    found = {(r["Check"], r["Culprit"]) for r in report if r["Verdict"] == "FINDING"}
    assert found == {("linux.check_idt", "hidden:rk_idtghost"), ("linux.check_modules", "hidden:rk_idtghost")}, report
