"""Physical memory sources: shadow (live RAM file or process), libvmi (gdbstub/QMP), dumps.

Every backend is a :class:`~shadowvol.backends.base.PhysicalMemory`.
"""

from .base import BufferMemory, PartialRead, PhysicalMemory, Segment
from .dump import DumpMemory, open_dump
from .libvmi import open_libvmi
from .shadow import ShadowFile, ShadowProcess, open_shadow

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
