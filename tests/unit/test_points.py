"""Monitor-point checks and the explicit kernel-text symbol table, on a synthetic target."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from shadowvol.trace.points import MonitorPointError, TextSymbols, check_monitor_point

SHIFT = 0x1000_0000
STEXT = 0xFFFF_FFFF_8100_0000
CODE = bytes.fromhex("55" "4889e5" "e800000000" "c3") + b"\x90" * 32  # push; mov; call; ret


def _target() -> SimpleNamespace:
    isf = {"symbols": {"_stext": {"address": STEXT}, "_etext": {"address": STEXT + 0x1000},
                       "f": {"address": STEXT + 0x10}, "g": {"address": STEXT + 0x20},
                       "init_task": {"address": STEXT + 0x2000}, "nosym": {}}}

    class Kernel:
        def read(self, addr: int, length: int) -> bytes:
            off = addr - (STEXT + 0x10 + SHIFT)
            data = CODE[max(off, 0):]
            return data[:length].ljust(length, b"\x90")

    return SimpleNamespace(isf=isf, kernel=Kernel(), location=SimpleNamespace(virt_shift=SHIFT))


def test_text_symbols_enclosing() -> None:
    text = TextSymbols(_target().isf)
    assert text.enclosing(STEXT + 0x15) == (STEXT + 0x10, "f")
    assert text.enclosing(STEXT + 0x20) == (STEXT + 0x20, "g")
    assert text.enclosing(STEXT - 1) is None
    assert "init_task" not in text._names  # outside [_stext, _etext)


def test_check_monitor_point_shares_one_table() -> None:
    t = _target()
    text = TextSymbols(t.isf)
    addr, warnings = check_monitor_point(t, "f+1", text)
    assert addr == STEXT + 0x11 + SHIFT and warnings == []
    _, warnings = check_monitor_point(t, "f+4", text)
    assert warnings and "branch instruction" in warnings[0]
    with pytest.raises(MonitorPointError, match="instruction boundary"):
        check_monitor_point(t, "f+2", text)
    with pytest.raises(MonitorPointError, match="outside kernel text"):
        check_monitor_point(t, "init_task")
    assert not [k for k in vars(t) if k.startswith("_")]  # nothing hung on the target
