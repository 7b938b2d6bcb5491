"""Validate kernel monitor points before anything is hooked there.

A monitor point (a kprobe in the stub, a gdbstub breakpoint in the libvmi
monitor, the paper's INT 20 hook) must start an instruction inside kernel
text, or the guest executes half an instruction. Branches and RIP-relative
instructions at the point are legal but are the paper's special cases: an
out-of-line single-step has to fix them up, so they get a warning.

Boundaries are found by a linear capstone sweep from the start of the
enclosing symbol (x86 kernel functions keep no data inline; jump tables live
in .rodata).
"""

from __future__ import annotations

import re
from typing import Any

from ..errors import ShadowvolError
from ..profiles import TextSymbols

__all__ = ["MonitorPointError", "TextSymbols", "resolve_point", "check_monitor_point"]

#: Longest function we sweep to reach a point; bigger offsets are refused.
MAX_SWEEP = 1 << 16


class MonitorPointError(ShadowvolError):
    """A monitor point is not a usable kernel instruction address."""


def resolve_point(target: Any, point: str | int) -> int:
    """``SYMBOL``, ``SYMBOL+OFF`` or an address (int or ``0x...``) -> runtime virtual address."""
    if isinstance(point, int):
        return point
    text = point.strip()
    if re.fullmatch(r"0x[0-9a-fA-F]+|\d+", text):
        return int(text, 0)
    m = re.fullmatch(r"([A-Za-z_.$][\w.$]*)(?:\s*\+\s*(0x[0-9a-fA-F]+|\d+))?", text)
    if not m:
        raise MonitorPointError(f"monitor point {point!r}: expected SYMBOL, SYMBOL+OFFSET or an address")
    if not target.has_symbol(m.group(1)):
        raise MonitorPointError(f"monitor point {point!r}: no symbol {m.group(1)!r} in the profile")
    return target.symbol_address(m.group(1)) + (int(m.group(2), 0) if m.group(2) else 0)


def check_monitor_point(target: Any, point: str | int,
                        text: TextSymbols | None = None) -> tuple[int, list[str]]:
    """Check that ``point`` starts an instruction in kernel text; return (runtime address, warnings).

    ``text``: the profile's :class:`TextSymbols`, when the caller checks
    several points. Raises :class:`MonitorPointError` when the address is
    outside kernel text, unreadable, or inside an instruction.
    """
    import capstone

    addr = resolve_point(target, point)
    shift = target.location.virt_shift
    lo, hi = target.symbol_address("_stext"), target.symbol_address("_etext")
    if not lo <= addr < hi:
        raise MonitorPointError(f"monitor point {point!r} ({addr:#x}) is outside kernel text "
                                f"[{lo:#x}, {hi:#x})")
    found = (text or TextSymbols(target.isf)).enclosing(addr - shift)
    start = found[0] + shift if found else lo
    func = found[1] if found else "_stext"
    if addr - start > MAX_SWEEP:
        raise MonitorPointError(f"monitor point {point!r} is {addr - start:#x} bytes into {func}: too far "
                                "to find instruction boundaries")
    try:
        code = target.kernel.read(start, addr - start + 16)
    except ShadowvolError as exc:
        raise MonitorPointError(f"monitor point {point!r}: cannot read kernel text: {exc}") from None
    md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
    md.detail = True
    insn = None
    for ins in md.disasm(code, start):
        if ins.address == addr:
            insn = ins
            break
        if ins.address > addr:
            break
    if insn is None:
        raise MonitorPointError(f"monitor point {point!r} ({addr:#x}, {func}+{addr - start:#x}) is not on "
                                "an instruction boundary")
    warnings: list[str] = []
    where = f"{func}+{addr - start:#x}" if addr != start else func
    text = f"{insn.mnemonic} {insn.op_str}".strip()
    branch_groups = (capstone.CS_GRP_JUMP, capstone.CS_GRP_CALL, capstone.CS_GRP_RET,
                     capstone.CS_GRP_IRET, capstone.CS_GRP_INT, capstone.CS_GRP_BRANCH_RELATIVE)
    if any(insn.group(g) for g in branch_groups):
        warnings.append(f"{where}: branch instruction '{text}' at the monitor point: an out-of-line "
                        "single-step must emulate or fix it up")
    elif "rip" in insn.op_str:
        warnings.append(f"{where}: RIP-relative instruction '{text}' at the monitor point: its "
                        "displacement must be fixed up when executed out of line")
    return addr, warnings
