"""The one kernel reader on a Target, for trace and integrity (no volatility3).

``plugins/linux/kernel.py`` holds the reader, :class:`Kernel`, and its
drgn-style walkers (``list_for_each_entry``, ``for_each_module``,
``per_cpu_ptr``, ...) with their one bound and cycle policy. Our volatility3
plugins build it on a volatility3 layer and symbol table
(``Kernel.from_context``). Here the same walkers run on a
:class:`~shadowvol.target.Target`: its kernel address space (which reads
through the current epoch's translation cache) and its symbol API.

A reader caches profile facts only (member offsets), never guest data, so one
built when a tracer starts stays right across the epochs it starts later.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Optional

from .errors import InvalidAddressError
from .plugins.linux import kernel as linux
from .plugins.linux.kernel import Kernel, Walk

if TYPE_CHECKING:
    from .target import Target

__all__ = ["Kernel", "Walk", "TargetMemory", "TargetTypes", "kernel_of", "linux"]


class TargetMemory:
    """A Target's kernel virtual memory in the reader's ``Memory`` shape.

    The reader masks addresses to the paging format's width, as volatility3's
    Intel layers take them; reads sign-extend them back to canonical ones."""

    def __init__(self, target: "Target") -> None:
        self.target = target
        self.name = target.kernel.name
        self.address_mask = (1 << target.kernel.format.va_bits) - 1

    @property
    def paged(self):  # the reader walks its page tables directly (``mapped_runs``)
        return self.target.kernel

    def read(self, offset: int, length: int, pad: bool = False) -> bytes:
        addr = linux.canonical(offset, self.address_mask)
        kernel = self.target.kernel
        return kernel.read_padded(addr, length) if pad else kernel.read(addr, length)


class TargetTypes:
    """The reader's ``Types`` from a Target's symbol API (the profile, KASLR shift from its location)."""

    def __init__(self, target: "Target") -> None:
        self.target = target

    def symbol_offset(self, name: str) -> Optional[int]:
        if not self.target.has_symbol(name):
            return None
        return self.target.symbol_address(name) - self.target.location.virt_shift

    def kaslr_shift(self) -> int:
        return self.target.location.virt_shift

    def offsetof(self, type_name: str, *path: str) -> int:
        return self.target.offsetof(type_name, *path)

    def sizeof(self, type_name: str) -> int:
        return self.target.type_size(type_name)

    def has_member(self, type_name: str, member: str) -> bool:
        return self.target.has_member(type_name, member)

    def array_count(self, type_name: str, member: str) -> int:
        return self.target.member_count(type_name, member)

    def enum_value(self, enum: str, name: str) -> Optional[int]:
        return self.target.enum_value(enum, name)


def kernel_of(target: "Target") -> Kernel:
    """The kernel reader on ``target``; its reads raise :class:`InvalidAddressError` (layer, address, entry)."""
    return Kernel(TargetMemory(target), TargetTypes(target), faults=(InvalidAddressError,))
