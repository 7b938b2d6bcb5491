"""Where kernel code pointers lead: kernel text, a module, or elsewhere.

Shared by ``linux.check_syscall`` and ``linux.check_idt``. Models
include/linux/module.h (``struct module`` and its memory regions) and the
kernel's text bounds (``_stext``.. ``_etext``), plus an x86-64 decoder of the
jump/call/push-ret trampolines that inline hooks plant at a function's entry.

One :class:`KernelImage` is built per plugin run: its module ranges are read
once (one snapshot epoch of a live guest) and then dropped with the plugin.
Its symbol index depends only on the symbol table and the KASLR shift, so it
is kept on the symbol table, as volatility3 keeps its own address index
there: plugins run one after the other in one context build it once.
"""

from __future__ import annotations

import bisect
import logging
import struct
from dataclasses import dataclass
from typing import Iterator, Optional

import capstone
from capstone import x86 as cs_x86
from volatility3.framework import exceptions, interfaces
from volatility3.framework.objects import utility

vollog = logging.getLogger(__name__)

__all__ = ["KernelImage", "ModuleRange", "Trampoline", "find_trampoline", "module_memory_regions", "MAX_MODULES"]

MAX_MODULES = 4096
"""Bound on the ``modules`` list walk (the kernel allows far fewer)."""

KERNEL = "kernel"
KERNEL_INIT = "kernel-init"
UNKNOWN = "unknown"


@dataclass(frozen=True)
class ModuleRange:
    """One memory region of a loaded module: ``[base, base + size)``."""

    name: str
    base: int
    size: int


@dataclass(frozen=True)
class Trampoline:
    """A control transfer found at a function entry."""

    offset: int  # of the first instruction of the trampoline, from the entry
    kind: str  # "jmp", "call", "push-ret", "mov-jmp", "jmp-indirect"
    target: int


class KernelImage:
    """Kernel text bounds, a sorted symbol index and module ranges, for one run."""

    def __init__(self, context: interfaces.context.ContextInterface, kernel_module_name: str) -> None:
        self.context = context
        self.kernel = context.modules[kernel_module_name]
        self.layer = context.layers[self.kernel.layer_name]
        self.table = context.symbol_space[self.kernel.symbol_table_name]
        self.mask = self.layer.address_mask
        self.text_start = self.symbol_address("_stext")
        self.text_end = self.symbol_address("_etext")
        if self.text_start is None or self.text_end is None or self.text_end <= self.text_start:
            raise exceptions.SymbolError("_stext", self.kernel.symbol_table_name,
                                         "the profile has no kernel text bounds (_stext, _etext)")
        self.init_start = self.symbol_address("_sinittext")
        self.init_end = self.symbol_address("_einittext")
        self._index: Optional[tuple[list[int], list[str]]] = None
        self._modules: Optional[list[ModuleRange]] = None
        self.cs = disassembler()

    # Addresses --------------------------------------------------------------

    def canonical(self, addr: int) -> int:
        """Sign-extend a (possibly masked) kernel address to 64 bits."""
        addr &= self.mask
        top = (self.mask + 1) >> 1
        return addr | (~self.mask & 0xFFFF_FFFF_FFFF_FFFF) if addr & top else addr

    def symbol_address(self, name: str) -> Optional[int]:
        """The run-time (KASLR-shifted) address of kernel symbol ``name``, or None."""
        if not self.kernel.has_symbol(name):
            return None
        return self.canonical(self.kernel.offset + self.table.get_symbol(name).address)

    def read(self, addr: int, length: int) -> bytes:
        """Kernel virtual memory; raises volatility3's InvalidAddressException."""
        return self.layer.read(addr & self.mask, length)

    def read_pointers(self, addr: int, count: int) -> tuple[int, ...]:
        """``count`` little-endian 64-bit pointers at ``addr``."""
        return struct.unpack(f"<{count}Q", self.read(addr, 8 * count))

    # Symbols ----------------------------------------------------------------

    def _symbols(self) -> tuple[list[int], list[str]]:
        if self._index is None:
            shift = self.kernel.offset
            cached = getattr(self.table, "_kernel_image_index", None)
            if cached is not None and cached[0] == (shift, self.mask):
                self._index = cached[1]
                return self._index
            pairs = sorted((self.canonical(shift + self.table.get_symbol(n).address), n)
                           for n in self.table.symbols)
            self._index = ([a for a, _ in pairs], [n for _, n in pairs])
            self.table._kernel_image_index = ((shift, self.mask), self._index)
        return self._index

    def symbols_at(self, addr: int) -> list[str]:
        """Names of the kernel symbols that start exactly at ``addr``."""
        addrs, names = self._symbols()
        i = bisect.bisect_left(addrs, addr)
        out = []
        while i < len(addrs) and addrs[i] == addr:
            out.append(names[i])
            i += 1
        return out

    def symbol_after(self, addr: int) -> Optional[int]:
        """Address of the first kernel symbol after ``addr`` (the end of a function)."""
        addrs, _ = self._symbols()
        i = bisect.bisect_right(addrs, addr)
        return addrs[i] if i < len(addrs) else None

    def describe(self, addr: int) -> str:
        """``name`` or ``name+0xoff`` for kernel (init) text, ``module+0xoff`` for modules, else "-"."""
        if self.in_text(addr) or self.in_init_text(addr):
            exact = self.symbols_at(addr)
            if exact:
                return preferred_name(exact)
            addrs, names = self._symbols()
            i = bisect.bisect_right(addrs, addr) - 1
            if i >= 0:
                base = addrs[i]
                return f"{preferred_name(self.symbols_at(base))}+{addr - base:#x}"
        mod = self.module_at(addr)
        if mod is not None:
            return f"{mod.name}+{addr - mod.base:#x}"
        return "-"

    # Ownership --------------------------------------------------------------

    def in_text(self, addr: int) -> bool:
        """Whether ``addr`` lies in the core kernel's text (``_stext`` <= addr < ``_etext``)."""
        return self.text_start <= addr < self.text_end

    def in_init_text(self, addr: int) -> bool:
        """Whether ``addr`` lies in the kernel's init text (freed after boot)."""
        return self.init_start is not None and self.init_end is not None \
            and self.init_start <= addr < self.init_end

    def modules(self) -> list[ModuleRange]:
        """Memory regions of every module on the ``modules`` list (read once)."""
        if self._modules is None:
            self._modules = list(self.module_ranges())
        return self._modules

    def module_ranges(self) -> Iterator[ModuleRange]:
        """Walk ``modules`` (struct list_head) to each struct module's regions.

        Bounded by :data:`MAX_MODULES` and stops on a repeated or unreadable link.
        """
        head = self.symbol_address("modules")
        if head is None:
            return
        mod_type = self.kernel.get_type("module")
        list_off = mod_type.relative_child_offset("list")
        seen = {head}
        try:
            link = self.read_pointers(head, 1)[0]
        except exceptions.InvalidAddressException:
            vollog.warning("the modules list head is unreadable")
            return
        for _ in range(MAX_MODULES):
            if link == head:
                return
            if link in seen:
                vollog.warning("the modules list has a cycle at %#x", link)
                return
            seen.add(link)
            try:
                mod = self.kernel.object("module", offset=(link - list_off) & self.mask, absolute=True)
                name = utility.array_to_string(mod.name) or "?"
                for r in module_memory_regions(mod, name):
                    if r.size:
                        yield ModuleRange(r.name, self.canonical(r.base), r.size)
                link = self.canonical(int(mod.list.next))
            except exceptions.InvalidAddressException:
                vollog.warning("the modules list is unreadable at %#x", link)
                return
        vollog.warning("the modules list is longer than %d entries; stopped", MAX_MODULES)

    def module_at(self, addr: int) -> Optional[ModuleRange]:
        """The module region containing ``addr``, or None."""
        for r in self.modules():
            if r.base <= addr < r.base + r.size:
                return r
        return None

    def owner(self, addr: int) -> str:
        """"kernel" for kernel text, "kernel-init" for init text, the module's name, or "unknown"."""
        if self.in_text(addr):
            return KERNEL
        if self.in_init_text(addr):
            return KERNEL_INIT
        mod = self.module_at(addr)
        return mod.name if mod is not None else UNKNOWN


def module_memory_regions(mod: interfaces.objects.ObjectInterface, name: str) -> Iterator[ModuleRange]:
    """The regions of ``mod`` (struct module *).

    Linux 6.4 replaced ``core_layout``/``init_layout`` (struct module_layout)
    with ``mem[MOD_MEM_NUM_TYPES]`` (struct module_memory), commit ac3b43283923
    ("module: replace module_layout with module_memory").
    """
    if mod.has_member("mem"):
        for region in mod.mem:
            yield ModuleRange(name, int(region.base), int(region.size))
        return
    for field in ("core_layout", "init_layout"):
        if mod.has_member(field):
            layout = getattr(mod, field)
            yield ModuleRange(name, int(layout.base), int(layout.size))


def preferred_name(names: list[str]) -> str:
    """Of several aliases at one address, the syscall entry point if there is one."""
    ranked = sorted(names, key=lambda n: (not n.startswith("__x64_sys_"), not n.startswith("asm_"),
                                          n.startswith("_"), n))
    return ranked[0] if ranked else "-"


def disassembler() -> capstone.Cs:
    """An x86-64 capstone instance with operand details on."""
    cs = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_64)
    cs.detail = True
    return cs


def find_trampoline(image: KernelImage, code: bytes, entry: int, window: int = 16) -> Optional[Trampoline]:
    """The first jmp/call/push-ret/mov-jmp trampoline starting in ``code[:window]``.

    ``code`` is read from ``entry``. Direct ``jmp``/``call`` whose target is in
    kernel text are ordinary (a ftrace site patched to ``call ftrace_caller``,
    a tail call); they are returned only when the target leaves kernel text.
    A ``ret`` before any trampoline ends the search (a complete small function).
    """
    imm: dict[int, int] = {}  # register id -> immediate loaded into it
    pushed: Optional[int] = None
    for ins in image.cs.disasm(code, entry):
        off = ins.address - entry
        if off >= window:
            break
        ops = ins.operands
        m = ins.mnemonic
        if m in ("jmp", "call") and len(ops) == 1:
            op = ops[0]
            kind = m
            target: Optional[int] = None
            if op.type == cs_x86.X86_OP_IMM:
                target = image.canonical(op.imm)
            elif op.type == cs_x86.X86_OP_REG and op.reg in imm:
                target, kind = imm[op.reg], f"mov-{m}"
            elif op.type == cs_x86.X86_OP_MEM and op.mem.base == cs_x86.X86_REG_RIP and not op.mem.index:
                slot = ins.address + ins.size + op.mem.disp
                try:
                    target, kind = image.read_pointers(slot, 1)[0], f"{m}-indirect"
                except exceptions.InvalidAddressException:
                    target, kind = slot, f"{m}-indirect"
            if target is not None and not image.in_text(target):
                return Trampoline(off, kind, target)
            if m == "jmp":
                return None
            continue
        if m in ("mov", "movabs") and len(ops) == 2 and ops[0].type == cs_x86.X86_OP_REG \
                and ops[1].type == cs_x86.X86_OP_IMM:
            imm[ops[0].reg] = image.canonical(ops[1].imm)
            continue
        if m == "push" and len(ops) == 1:
            if ops[0].type == cs_x86.X86_OP_IMM:
                pushed = image.canonical(ops[0].imm)
            elif ops[0].type == cs_x86.X86_OP_REG and ops[0].reg in imm:
                pushed = imm[ops[0].reg]
            else:
                pushed = None
            continue
        if m == "ret":
            if pushed is not None and not image.in_text(pushed):
                return Trampoline(off, "push-ret", pushed)
            return None
    return None
