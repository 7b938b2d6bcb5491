"""QEMU's guest RAM layout, from the monitor (HMP ``info ramblock``, ``info mtree``) or the q35 rule.

Parsing only: any caller that can run an HMP command (a QMP client, the
gdbstub's ``qRcmd``) gets the RAM block and its guest-physical segments here.
The backends that map or read that RAM (:mod:`shadowvol.backends.shadow`,
:mod:`shadowvol.backends.libvmi`) share it instead of importing each other.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from ..backends.base import Segment
from ..errors import BackendError
from .qmp import Monitor

__all__ = ["GiB", "FOUR_GIB", "q35_layout", "parse_ramblocks", "parse_ram_aliases", "parse_flat_ram",
           "qemu_ram_layout"]

GiB = 1 << 30
FOUR_GIB = 4 * GiB

_ALIAS_RE = re.compile(
    r"^\s*([0-9a-f]+)-([0-9a-f]+) \(prio -?\d+, [^)]*\): alias (ram-(?:below|above)-4g) @(\S+) ([0-9a-f]+)-([0-9a-f]+)")
_FLAT_RE = re.compile(r"^\s*([0-9a-f]+)-([0-9a-f]+) \(prio -?\d+, ([^)]*)\): (\S+)(?: @([0-9a-f]+))?")
_RAMBLOCK_RE = re.compile(
    r"^\s*(\S+)\s+(\d+ [KMG]iB)\s+0x([0-9a-f]+)\s+0x([0-9a-f]+)\s+0x([0-9a-f]+)\s*$")


def q35_layout(ram_size: int, max_ram_below_4g: int = FOUR_GIB) -> list[Segment]:
    """Guest-physical segments of a q35 machine's RAM block (QEMU 7.2 ``pc_q35_init``).

    RAM below 4 GiB is ``[0, lowmem)`` at block offset 0, with lowmem =
    0x80000000 if ram_size >= 0xb0000000 else 0xb0000000 (capped by
    ``max-ram-below-4g``); the rest sits at 4 GiB. Ignores the AMD 1 TiB
    hole relocation, which only applies to guests near 1 TiB.
    """
    lowmem = 0x80000000 if ram_size >= 0xB0000000 else 0xB0000000
    lowmem = min(lowmem, max_ram_below_4g)
    if ram_size <= lowmem:
        return [Segment(0, ram_size, 0)]
    return [Segment(0, lowmem, 0), Segment(FOUR_GIB, FOUR_GIB + ram_size - lowmem, lowmem)]


def parse_ramblocks(text: str) -> list[dict[str, Any]]:
    """Parse HMP ``info ramblock``: name, psize, offset, used, total per block."""
    blocks = []
    for line in text.splitlines():
        m = _RAMBLOCK_RE.match(line)
        if m:
            blocks.append({"name": m.group(1), "psize": m.group(2), "offset": int(m.group(3), 16),
                           "used": int(m.group(4), 16), "total": int(m.group(5), 16)})
    return blocks


def parse_ram_aliases(mtree: str) -> tuple[str, list[Segment]] | None:
    """From HMP ``info mtree``, the RAM block name and its ``ram-below/above-4g`` segments.

    Segment offsets are offsets inside the RAM block. Returns None if the
    machine has no such aliases (not a pc/q35 machine).
    """
    found: dict[str, tuple[str, Segment]] = {}
    section = ""
    for line in mtree.splitlines():
        if line.startswith("address-space:"):
            section = line.split(":", 1)[1].strip()
            continue
        if section != "memory":
            continue
        m = _ALIAS_RE.match(line)
        if m and m.group(3) not in found:
            start, last = int(m.group(1), 16), int(m.group(2), 16)
            off = int(m.group(5), 16)
            found[m.group(3)] = (m.group(4), Segment(start, last + 1, off))
    if not found:
        return None
    blocks = {block for block, _ in found.values()}
    if len(blocks) != 1:
        raise BackendError(f"RAM aliases point at several blocks: {sorted(blocks)}")
    return blocks.pop(), sorted((seg for _, seg in found.values()), key=lambda s: s.start)


def parse_flat_ram(flat: str, block: str) -> list[Segment]:
    """From HMP ``info mtree -f``, the segments of ``block`` mapped as RAM in AS "memory"."""
    segs: list[Segment] = []
    in_memory = False
    for line in flat.splitlines():
        if line.startswith("FlatView"):
            in_memory = False
            continue
        if line.strip().startswith('AS "memory"'):
            in_memory = True
            continue
        if not in_memory:
            continue
        m = _FLAT_RE.match(line)
        if m and m.group(3) == "ram" and m.group(4) == block:
            start, last = int(m.group(1), 16), int(m.group(2), 16)
            segs.append(Segment(start, last + 1, int(m.group(5) or "0", 16)))
    return segs


def qemu_ram_layout(hmp: Monitor | Callable[[str], str]) -> tuple[str, int, list[Segment]]:
    """Ask QEMU for (RAM block name, block size, guest-physical segments with block offsets).

    ``hmp`` is a QMP client (or QMP through libvirt) or any function running an HMP command (e.g.
    :meth:`shadowvol.qemu.gdbstub.GdbStub.monitor`).
    """
    run = hmp.hmp if hasattr(hmp, "hmp") else hmp
    blocks = parse_ramblocks(run("info ramblock"))
    if not blocks:
        raise BackendError("QEMU reported no RAM blocks (info ramblock)")
    sizes = {b["name"]: b["used"] for b in blocks}
    aliases = parse_ram_aliases(run("info mtree"))
    if aliases is not None:
        block, segs = aliases
    else:
        block = max(blocks, key=lambda b: b["used"])["name"]
        segs = parse_flat_ram(run("info mtree -f"), block)
    if block not in sizes:
        raise BackendError(f"RAM block {block!r} is not in info ramblock")
    if not segs:
        raise BackendError(f"no guest-physical mapping found for RAM block {block!r}")
    for s in segs:
        if s.offset + s.length > sizes[block]:
            raise BackendError(f"segment {s} lies past the end of RAM block {block!r}")
    return block, sizes[block], segs
