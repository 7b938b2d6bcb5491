"""Physical memory sources: shadow (live RAM file or process), libvmi (gdbstub/QMP), dumps.

Every backend is a :class:`~shadowvol.backends.base.PhysicalMemory`.
"""

from typing import Any

from .base import BufferMemory, PartialRead, PhysicalMemory, Segment
from .dump import DumpMemory, open_dump
from .shadow import ShadowFile, ShadowProcess, open_shadow


def __getattr__(name: str) -> Any:
    """``open_libvmi``, imported on first use: its gdbstub client (with an XML
    parser for target descriptions) costs 8 ms at every start, which a run on
    the shadow backend never needs."""
    if name == "open_libvmi":
        from .libvmi import open_libvmi

        return open_libvmi
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "PhysicalMemory",
    "PartialRead",
    "Segment",
    "BufferMemory",
    "ShadowFile",
    "ShadowProcess",
    "open_shadow",
    "DumpMemory",
    "open_dump",
    "open_libvmi",
]
