"""Where kernel code pointers lead: kernel text, a module, a hidden module, or elsewhere.

Shared by ``linux.check_syscall``, ``linux.check_idt`` and the other hook
checks. Adds to the :class:`~kernel.Kernel` reader the kernel's text bounds
(``_stext``.. ``_etext``), a sorted symbol index, the memory regions of the
modules (include/linux/module.h), and an x86-64 decoder of the
jump/call/push-ret trampolines that inline hooks plant at a function's entry.

A target outside kernel text is owned by the listed module whose memory
contains it; failing that, by a module carved from module memory that is
missing from the module list (``hidden:NAME``), so a culprit that hides is
still named.

One :class:`KernelImage` is built per plugin run: its module ranges are read
once (one snapshot epoch of a live guest) and then dropped with the plugin.
Its symbol index depends only on the symbol table and the KASLR shift, so it
is kept on the symbol table, as volatility3 keeps its own address index
there: plugins run one after the other in one context build it once.
"""

from __future__ import annotations

import bisect
import logging
from dataclasses import dataclass
from collections.abc import Mapping
from typing import Optional

import capstone
from capstone import x86 as cs_x86
from volatility3.framework import exceptions, interfaces
from volatility3.plugins.linux.kernel import (Kernel, ModuleLayout, ModuleRegion, VolatilityTypes, Walk,
                                              carve_modules, for_each_module, module_address_lookup, module_name,
                                              module_regions)
from volatility3.plugins.linux.tracing_hooks import (FTRACE_OPS_FL_IPMODIFY, FtraceOps, Kprobe, for_each_ftrace_ops,
                                                      for_each_kprobe)

vollog = logging.getLogger(__name__)

__all__ = ["KernelImage", "Trampoline", "find_trampoline", "disassembler", "preferred_name", "KERNEL",
           "KERNEL_INIT", "UNKNOWN", "HIDDEN_PREFIX"]

KERNEL = "kernel"
KERNEL_INIT = "kernel-init"
UNKNOWN = "unknown"
HIDDEN_PREFIX = "hidden:"
OUR_STUB_MODULE = "shadow_stub"
"""shadowvol's guest stub (guest_stub/shadow_stub.c): its kprobes are ours, reported but never a finding."""
OUR_STUB_HANDLERS = frozenset({"sv_kprobe_pre"})


@dataclass(frozen=True)
class Trampoline:
    """A control transfer found at a function entry."""

    offset: int  # of the first instruction of the trampoline, from the entry
    kind: str  # "jmp", "call", "push-ret", "mov-jmp", "jmp-indirect"
    target: int


class KernelImage(Kernel):
    """The :class:`~kernel.Kernel` plus kernel text bounds, a sorted symbol index and module ranges, for one run."""

    def __init__(self, context: interfaces.context.ContextInterface, kernel_module_name: str) -> None:
        module = context.modules[kernel_module_name]
        super().__init__(context.layers[module.layer_name], VolatilityTypes(module), context, module)
        self.kernel = module
        self.table = context.symbol_space[module.symbol_table_name]
        self.text_start = self.symbol("_stext")
        self.text_end = self.symbol("_etext")
        if self.text_start is None or self.text_end is None or self.text_end <= self.text_start:
            raise exceptions.SymbolError("_stext", module.symbol_table_name,
                                         "the profile has no kernel text bounds (_stext, _etext)")
        self.init_start = self.symbol("_sinittext")
        self.init_end = self.symbol("_einittext")
        self._index: Optional[tuple[list[int], list[str]]] = None
        self._modules: Optional[list[ModuleRegion]] = None
        self._hidden: Optional[list[ModuleRegion]] = None
        self._kprobes: Optional[list[Kprobe]] = None
        self._ftrace: Optional[list[FtraceOps]] = None
        self.cs = disassembler()

    def symbol_address(self, name: str) -> Optional[int]:
        """The run-time (KASLR-shifted) address of kernel symbol ``name``, or None."""
        return self.symbol(name)

    # Symbols ----------------------------------------------------------------

    def _symbols(self) -> tuple[list[int], list[str]]:
        if self._index is None:
            shift = self.shift
            cached = getattr(self.table, "_kernel_image_index", None)
            if cached is not None and cached[0] == (shift, self.mask):
                self._index = cached[1]
                return self._index
            by_address = getattr(self.table, "symbols_by_address", None)  # the table's own index, shared
            links = by_address() if callable(by_address) else [(a, n) for n, a in self._link_addresses()]
            pairs = sorted((self.canonical(shift + a), n) for a, n in links)  # nearly sorted already
            self._index = ([a for a, _ in pairs], [n for _, n in pairs])
            self.table._kernel_image_index = ((shift, self.mask), self._index)
        return self._index

    def _link_addresses(self) -> list[tuple[str, int]]:
        """(name, link-time address) of every symbol of the profile.

        ``get_symbol`` builds a typed object per name (~80k of them: seconds);
        an ISF table's own JSON has the addresses, so it is read directly when
        the table is volatility3's IntermediateSymbolTable, else through the
        public API.
        """
        raw = getattr(getattr(self.table, "_delegate", None), "_json_object", None)
        symbols = raw.get("symbols") if isinstance(raw, Mapping) else None
        if isinstance(symbols, Mapping):
            mask = self.table.config.get("symbol_mask", 0) or ~0
            return [(n, s["address"] & mask) for n, s in symbols.items() if isinstance(s, Mapping) and "address" in s]
        return [(n, self.table.get_symbol(n).address) for n in self.table.symbols]

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
        mod = self.module_at(addr) or self.hidden_module_at(addr)
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

    def modules(self) -> list[ModuleRegion]:
        """Memory regions of every module on the ``modules`` list (read once)."""
        if self._modules is None:
            walk = Walk("modules")
            self._modules = []
            for mod in for_each_module(self, walk):
                self._modules.extend(module_regions(self, mod, module_name(self, mod) or "?"))
            if walk.partial:
                vollog.warning("the modules list walk stopped early: %s", walk.partial)
        return self._modules

    def hidden_modules(self) -> list[ModuleRegion]:
        """Core regions (``hidden:NAME``) of modules carved from module memory but not on the ``modules`` list.

        Carved once, on first use: only when some address has no other owner.
        """
        if self._hidden is None:
            listed = {r.base for r in self.modules()}
            carved, fields = Walk("carve"), {}
            carve_modules(self, ModuleLayout(self), carved, fields)
            self._hidden = []
            for mod, m in fields.items():
                regions = [r for r in module_regions(self, mod, HIDDEN_PREFIX + m.name) if r.core]
                if not any(r.base in listed for r in regions):
                    self._hidden.extend(regions)
            if carved.partial:
                vollog.warning("the module carve stopped early: %s", carved.partial)
        return self._hidden

    def module_at(self, addr: int) -> Optional[ModuleRegion]:
        """The region of a listed module containing ``addr``, or None."""
        for r in self.modules():
            if addr in r:
                return r
        return None

    def hidden_module_at(self, addr: int) -> Optional[ModuleRegion]:
        """The core region of a module hidden from the list (carved) containing ``addr``, or None."""
        for r in self.hidden_modules():
            if addr in r:
                return r
        return None

    def function_name(self, addr: int) -> str:
        """``name+0xoff`` in kernel text, ``name+0xoff [module]`` in a (hidden) module's code, else as :meth:`describe`."""
        if self.in_text(addr) or self.in_init_text(addr):
            return self.describe(addr)
        region = self.module_at(addr) or self.hidden_module_at(addr)
        if region is None:
            return self.describe(addr)
        found = module_address_lookup(self, region.mod, addr)
        if found is None:
            return f"{region.name}+{addr - region.base:#x}"
        name, off = found
        return f"{name}{f'+{off:#x}' if off else ''} [{region.name}]"

    def kprobes(self) -> list[Kprobe]:
        """Every registered kprobe and kretprobe (read once)."""
        if self._kprobes is None:
            walk = Walk("kprobes")
            self._kprobes = list(for_each_kprobe(self, walk))
            if walk.partial:
                vollog.warning("the kprobe table walk stopped early: %s", walk.partial)
        return self._kprobes

    def ftrace_ops(self) -> list[FtraceOps]:
        """Every struct ftrace_ops on ``ftrace_ops_list`` (read once)."""
        if self._ftrace is None:
            walk = Walk("ftrace_ops")
            self._ftrace = list(for_each_ftrace_ops(self, walk))
            if walk.partial:
                vollog.warning("the ftrace_ops walk stopped early: %s", walk.partial)
        return self._ftrace

    def ftrace_trampoline_at(self, addr: int) -> Optional[FtraceOps]:
        """The ftrace_ops whose trampoline contains ``addr``, or None."""
        for ops in self.ftrace_ops():
            if ops.trampoline and ops.trampoline <= addr < ops.trampoline + max(ops.trampoline_size, 1):
                return ops
        return None

    def is_ours(self, handler: int) -> bool:
        """Whether ``handler`` is our guest stub's probe handler (by module and function name)."""
        region = self.module_at(handler)
        if region is None or region.name != OUR_STUB_MODULE:
            return False
        found = module_address_lookup(self, region.mod, handler)
        return found is not None and found[0] in OUR_STUB_HANDLERS and found[1] == 0

    def is_kprobe_ops(self, ops: FtraceOps) -> bool:
        """Whether ``ops`` is the kprobes' own ftrace_ops (callback ``kprobe_ftrace_handler``)."""
        return self.in_text(ops.func) and "kprobe_ftrace_handler" in self.symbols_at(ops.func)

    def hook_owner(self, target: int, site: int) -> tuple[str, str, bool]:
        """Who is behind a control transfer at ``site`` to ``target``: (owner, how, ours).

        A target in an ftrace trampoline is the trampoline's ftrace_ops: the
        kprobes' own ops stands for the kprobes at ``site`` (their handlers'
        owners; ``ours`` when every one is our stub's), any other ops for the
        owner of its callback.
        """
        ops = self.ftrace_trampoline_at(target)
        if ops is None:
            return self.owner(target), self.function_name(target), False
        if self.is_kprobe_ops(ops):
            found = self.kprobe_hooks(site, site + 1)
            if found:
                return found
        return self.owner(ops.func), f"ftrace {self.function_name(ops.func)}", False

    def kprobe_hooks(self, start: int, end: int) -> Optional[tuple[str, str, bool]]:
        """(owners, "kprobe HANDLERS", ours) of the kprobes in ``[start, end)``, or None if there are none.

        The owners are those of the handlers that are not our stub's (all of them if every one is ours).
        """
        handlers = [h for p in self.kprobes() if start <= p.addr < end for _, h in p.handlers]
        if not handlers:
            return None
        theirs = [h for h in handlers if not self.is_ours(h)]
        owners = sorted({self.owner(h) for h in (theirs or handlers)})
        return ",".join(owners), "kprobe " + ", ".join(self.function_name(h) for h in handlers), not theirs

    def tracing_hooks(self, start: int, end: int) -> list[tuple[str, str, bool]]:
        """(owner, how, ours) of every kprobe and every ftrace_ops that can redirect code in ``[start, end)``:
        ops with IPMODIFY or a callback outside kernel text (the kprobes' own ops stands for its kprobes)."""
        out = []
        probes = self.kprobe_hooks(start, end)
        if probes is not None:
            out.append(probes)
        for ops in self.ftrace_ops():
            if self.is_kprobe_ops(ops) or not any(start <= ip < end for ip in ops.ips):
                continue
            owner = self.owner(ops.func)
            if owner != KERNEL or ops.flags & FTRACE_OPS_FL_IPMODIFY:
                out.append((owner, f"ftrace {self.function_name(ops.func)}", False))
        return out

    def owner(self, addr: int) -> str:
        """``kernel``, ``kernel-init``, a listed module's name, ``hidden:NAME`` (a module carved from
        module memory but missing from the module list) or ``unknown``."""
        if self.in_text(addr):
            return KERNEL
        if self.in_init_text(addr):
            return KERNEL_INIT
        mod = self.module_at(addr) or self.hidden_module_at(addr)
        return mod.name if mod is not None else UNKNOWN


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
