"""linux.check_idt: interrupt handlers outside kernel text.

Decodes the 256 gates of ``idt_table`` (``gate_desc idt_table[IDT_ENTRIES]``,
arch/x86/kernel/idt.c; ``struct gate_struct`` in arch/x86/include/asm/desc_defs.h),
resolves each handler to a kernel symbol (``asm_exc_*``, ``asm_sysvec_*``,
``irq_entries_start+N``...) and flags present gates whose handler leaves
kernel text, naming the module that owns it. The table is read once.
"""

from __future__ import annotations

import logging
import struct
from typing import Iterator

from volatility3.framework import exceptions, interfaces, renderers
from volatility3.framework.configuration import requirements
from volatility3.framework.renderers import format_hints

from volatility3.plugins.linux import kernel_hooks

vollog = logging.getLogger(__name__)

__all__ = ["CheckIdt", "gate_offset"]

IDT_ENTRIES = 256
NUM_EXCEPTION_VECTORS = 32
EARLY_IDT_HANDLER_SIZE = 9
GATE_TYPES = {0xE: "interrupt", 0xF: "trap", 0x5: "task", 0xC: "call"}


def gate_offset(low: int, middle: int, high: int) -> int:
    """The handler address of a 64-bit gate: ``gate_offset()`` in asm/desc.h."""
    return low | (middle << 16) | (high << 32)


class CheckIdt(interfaces.plugins.PluginInterface):
    """Checks the interrupt descriptor table for handlers outside kernel text."""

    _required_framework_version = (2, 0, 0)
    _version = (1, 0, 0)

    @classmethod
    def get_requirements(cls) -> list[interfaces.configuration.RequirementInterface]:
        return [
            requirements.ModuleRequirement(name="kernel", description="Linux kernel",
                                           architectures=["Intel64"]),
            requirements.BooleanRequirement(name="hooked_only", description="Show only hooked gates",
                                            default=False, optional=True),
        ]

    @classmethod
    def read_idt_table(cls, image: kernel_hooks.KernelImage) -> list[tuple[int, int, int, int]]:
        """``(vector, handler, type, present)`` of each gate of ``idt_table`` (struct gate_struct[])."""
        addr = image.symbol_address("idt_table")
        if addr is None:
            raise exceptions.SymbolError("idt_table", image.kernel.symbol_table_name,
                                         "the profile has no idt_table")
        gate = image.kernel.get_type("gate_struct")
        size = gate.size
        off = {f: gate.relative_child_offset(f) for f in ("offset_low", "offset_middle", "offset_high", "bits")}
        raw = image.read_exact(addr, size * IDT_ENTRIES)
        gates = []
        for vec in range(IDT_ENTRIES):
            base = vec * size
            low, = struct.unpack_from("<H", raw, base + off["offset_low"])
            middle, = struct.unpack_from("<H", raw, base + off["offset_middle"])
            high, = struct.unpack_from("<I", raw, base + off["offset_high"])
            # struct idt_bits { u16 ist:3, zero:5, type:5, dpl:2, p:1 }: the hardware layout.
            bits, = struct.unpack_from("<H", raw, base + off["bits"])
            gates.append((vec, image.canonical(gate_offset(low, middle, high)), (bits >> 8) & 0x1F,
                          bits >> 15))
        return gates

    @classmethod
    def early_idt_handlers(cls, image: kernel_hooks.KernelImage) -> dict[int, int]:
        """Vector -> address in ``early_idt_handler_array`` (char [32][EARLY_IDT_HANDLER_SIZE]).

        Exception vectors the kernel defines no handler for (reserved ones, or
        #MC without CONFIG_X86_MCE) keep the early handler installed by
        idt_setup_early_handler(), in init text freed after boot.
        """
        base = image.symbol_address("early_idt_handler_array")
        if base is None:
            return {}
        step = EARLY_IDT_HANDLER_SIZE
        sym_type = image.table.get_symbol("early_idt_handler_array").type
        if sym_type is not None and getattr(sym_type.vol, "count", 0):
            step = sym_type.size // sym_type.vol.count
        return {vec: base + vec * step for vec in range(NUM_EXCEPTION_VECTORS)}

    @classmethod
    def gate_rows(cls, image: kernel_hooks.KernelImage) -> Iterator[tuple]:
        """(vector, handler, symbol, owner, type, present, hooked) of each gate."""
        early = cls.early_idt_handlers(image)
        for vec, handler, gtype, present in cls.read_idt_table(image):
            hooked = bool(present) and not image.in_text(handler) and early.get(vec) != handler
            yield (vec, handler, image.function_name(handler) if present else "-",
                   image.owner(handler) if present else "-", GATE_TYPES.get(gtype, f"{gtype:#x}"), bool(present),
                   hooked)

    def _generator(self) -> Iterator[tuple[int, tuple]]:
        image = kernel_hooks.KernelImage(self.context, self.config["kernel"])
        only = bool(self.config.get("hooked_only"))
        for vec, handler, symbol, owner, gtype, present, hooked in self.gate_rows(image):
            if only and not hooked:
                continue
            yield 0, (vec, format_hints.Hex(handler), symbol, owner, gtype, present, hooked)

    def run(self) -> renderers.TreeGrid:
        return renderers.TreeGrid(
            [("Index", int), ("Address", format_hints.Hex), ("Symbol", str), ("Owner", str),
             ("Type", str), ("Present", bool), ("Hooked", bool)],
            self._generator())
