"""Monitor-point checks and the explicit kernel-text symbol table, on a synthetic target."""

from __future__ import annotations

from pathlib import Path

import pytest

from shadowvol.kaslr import KernelLocation
from shadowvol.target import Target
from shadowvol.trace.points import MonitorPointError, TextSymbols, check_monitor_point

SHIFT = 0x1000_0000
STEXT = 0xFFFF_FFFF_8100_0000
CODE = bytes.fromhex("55" "4889e5" "e800000000" "c3") + b"\x90" * 32  # push; mov; call; ret


class _Kernel:
    """Kernel-virtual reads of the synthetic text: CODE at f, nops elsewhere."""

    def read(self, addr: int, length: int) -> bytes:
        off = addr - (STEXT + 0x10 + SHIFT)
        data = CODE[max(off, 0):]
        return data[:length].ljust(length, b"\x90")


class _SyntheticTarget(Target):
    """The real Target (its symbol API) on a synthetic profile, with kernel reads from CODE."""

    def __post_init__(self) -> None:
        self.kernel = _Kernel()  # type: ignore[assignment]


def _target() -> Target:
    isf = {"symbols": {"_stext": {"address": STEXT}, "_etext": {"address": STEXT + 0x1000},
                       "f": {"address": STEXT + 0x10}, "g": {"address": STEXT + 0x20},
                       "init_task": {"address": STEXT + 0x2000}, "nosym": {}}}
    loc = KernelLocation(dtb=0, virt_shift=SHIFT, phys_base=0, la57=False, source="test")
    return _SyntheticTarget(None, loc, isf, Path("synthetic.json"), "synthetic")  # type: ignore[arg-type]


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
    before = dict(vars(t))
    check_monitor_point(t, "g")
    assert vars(t) == before  # nothing hung on the target
    with pytest.raises(MonitorPointError, match="no symbol"):
        check_monitor_point(t, "nosym")
