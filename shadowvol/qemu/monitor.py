"""What QEMU's human monitor (HMP) says about a guest, parsed: ``xp``, ``gpa2hva``, ``info registers``.

Every function takes ``hmp``: a :class:`~shadowvol.qemu.qmp.QMPClient` or any
function that runs an HMP command and returns its text (for example
:meth:`shadowvol.qemu.gdbstub.GdbStub.monitor`). The parsers are pure and
raise :class:`~shadowvol.errors.BackendError` on text they do not recognise.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

from ..errors import BackendError
from .qmp import Monitor, QMPClient

__all__ = ["Hmp", "XP_CHUNK", "parse_xp", "xp", "parse_gpa2hva", "gpa2hva", "parse_control_registers",
           "control_registers", "dump_first_page"]

#: A QMP client (or QMP through libvirt: :class:`~shadowvol.qemu.qmp.Monitor`), or any function
#: running one HMP command and returning its output.
Hmp = Monitor | Callable[[str], str]

#: Bytes asked for per ``xp`` command (QEMU prints 8 per line; 4 KiB is ~40 KiB of text).
XP_CHUNK = 0x1000

_GPA2HVA_RE = re.compile(r"is (0x[0-9a-fA-F]+)")
_CR3_RE = re.compile(r"\bCR3=([0-9a-fA-F]+)")
_CR4_RE = re.compile(r"\bCR4=([0-9a-fA-F]+)")


def _runner(hmp: Hmp) -> Callable[[str], str]:
    return hmp.hmp if hasattr(hmp, "hmp") else hmp


def parse_xp(text: str) -> bytes:
    """Bytes from HMP ``xp /Nxb`` output (``ADDR: 0x00 0x01 ...`` lines)."""
    out = bytearray()
    for line in text.splitlines():
        if ":" not in line:
            continue
        for tok in line.split(":", 1)[1].split():
            try:
                out.append(int(tok, 16))
            except ValueError:
                raise BackendError(f"QEMU xp: unexpected output {line[:60]!r}") from None
    return bytes(out)


def xp(hmp: Hmp, paddr: int, length: int) -> bytes:
    """``length`` bytes of guest-physical memory at ``paddr`` through ``xp``, in 4 KiB commands.

    QEMU answers ``xp`` outside RAM with device or unassigned memory rather
    than an error: callers check the address against the RAM layout first."""
    run = _runner(hmp)
    out = bytearray()
    pos, end = paddr, paddr + length
    while pos < end:
        n = min(XP_CHUNK, end - pos)
        data = parse_xp(run(f"xp /{n}xb {pos:#x}"))
        if len(data) != n:
            raise BackendError(f"QEMU xp at {pos:#x} returned {len(data)} of {n} bytes")
        out += data
        pos += n
    return bytes(out)


def parse_gpa2hva(text: str, gpa: int) -> int:
    """The host virtual address in HMP ``gpa2hva`` output (``Host virtual address for 0x... is 0x...``)."""
    m = _GPA2HVA_RE.search(text)
    if not m:
        raise BackendError(f"QEMU gpa2hva {gpa:#x}: {text.strip()[:120]}")
    return int(m.group(1), 16)


def gpa2hva(hmp: Hmp, gpa: int) -> int:
    """Where guest-physical ``gpa`` is mapped in the QEMU process."""
    return parse_gpa2hva(_runner(hmp)(f"gpa2hva {gpa:#x}"), gpa)


def parse_control_registers(text: str) -> tuple[int, int] | None:
    """(CR3, CR4) of the first CPU in HMP ``info registers`` output, None if absent."""
    cr3, cr4 = _CR3_RE.search(text), _CR4_RE.search(text)
    if not (cr3 and cr4):
        return None
    return int(cr3.group(1), 16), int(cr4.group(1), 16)


def control_registers(hmp: Hmp) -> tuple[int, int] | None:
    """(CR3, CR4) of the current CPU from ``info registers``."""
    return parse_control_registers(_runner(hmp)("info registers"))


def dump_first_page(qmp: QMPClient, out: Path) -> None:
    """Write an ELF core of the first guest page with QEMU's notes (VMCOREINFO among them) to ``out``.

    A filtered ``dump-guest-memory`` (about 1 ms): the notes are what the
    caller wants, the page keeps the dump valid."""
    qmp.execute("dump-guest-memory", paging=False, protocol=f"file:{out}", begin=0, length=4096)
