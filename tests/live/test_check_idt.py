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
