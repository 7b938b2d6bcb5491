"""linux.check_syscall: hooked system calls on x86-64.

Three checks, each row naming the module that owns a hook's target:

- ``sys_call_table``: every entry must be the handler that ``x64_sys_call``
  dispatches that number to (or, on kernels without ``x64_sys_call``, a
  ``__x64_sys_*`` entry point in kernel text).
- ``x64_sys_call``: the dispatch switch (arch/x86/entry/syscall_64.c, Linux
  6.9 and backported to stable kernels) is decoded with capstone and each
  number followed to the handler it reaches; that handler must be a
  ``__x64_sys_*`` entry point in kernel text, and the switch must contain only
  compares and jumps.
- ``inline``: the first bytes of every handler must not hold a jmp, call,
  push-ret or mov-jmp trampoline leaving kernel text. The ftrace site
  (``nop5``, or ``call ftrace_caller`` when tracing) stays in kernel text;
  a call to an ftrace_ops' own trampoline is named after the ops' callback,
  or for the kprobes' ops after the kprobe handlers at that site (our guest
  stub's probes are reported as ours, not as hooks).

Owners: ``kernel``, a module's name, ``hidden:NAME`` for a module carved from
module memory but missing from the module list, or ``unknown``.

Kernel memory is read once per run: the table, the switch and each handler's
entry bytes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterator, Optional

from capstone import x86 as cs_x86
from volatility3.framework import exceptions, interfaces, renderers
from volatility3.framework.configuration import requirements
from volatility3.framework.renderers import format_hints

from volatility3.plugins.linux import kernel_hooks

vollog = logging.getLogger(__name__)

__all__ = ["CheckSyscall", "Dispatch", "decode_x64_sys_call"]

SYSCALL_PREFIX = "__x64_sys_"
MAX_DISPATCH_STEPS = 256
"""Bound on instructions followed through ``x64_sys_call`` for one number."""
MAX_DISPATCH_BYTES = 1 << 16
MAX_TABLE_ENTRIES = 1024
ENTRY_WINDOW = 16
"""Bytes at a handler's entry searched for a trampoline."""

_JCC = {
    "je": lambda a, b: a == b, "jne": lambda a, b: a != b,
    "ja": lambda a, b: a > b, "jae": lambda a, b: a >= b,
    "jb": lambda a, b: a < b, "jbe": lambda a, b: a <= b,
    "jg": lambda a, b: a > b, "jge": lambda a, b: a >= b,
    "jl": lambda a, b: a < b, "jle": lambda a, b: a <= b,
}


@dataclass(frozen=True)
class Dispatch:
    """Where ``x64_sys_call`` sends one syscall number."""

    nr: int
    site: Optional[int]  # address of the jmp/call that leaves the switch
    target: Optional[int]
    anomaly: str = ""  # why the switch could not be followed (patched code)


def decode_x64_sys_call(image: kernel_hooks.KernelImage, count: int) -> Optional[list[Dispatch]]:
    """Follow ``long x64_sys_call(const struct pt_regs *regs, unsigned int nr)``
    for ``nr`` in ``[0, count)``; None if the kernel has no such function.

    The switch compiles to a tree of ``cmp nr, imm`` / conditional jumps ending
    in ``jmp __x64_sys_*`` (tail calls); it is followed symbolically for each
    number, bounded by :data:`MAX_DISPATCH_STEPS` instructions.
    """
    start = image.symbol_address("x64_sys_call")
    if start is None:
        return None
    end = image.symbol_after(start) or start + 4096
    size = min(end - start, MAX_DISPATCH_BYTES)
    code = image.read_exact(start, size)
    insns = {i.address: i for i in image.cs.disasm(code, start)}
    return [_follow(image, insns, start, start + size, nr) for nr in range(count)]


def _follow(image: kernel_hooks.KernelImage, insns: dict, start: int, end: int, nr: int) -> Dispatch:
    pc, value = start, None
    for _ in range(MAX_DISPATCH_STEPS):
        ins = insns.get(pc)
        if ins is None:
            return Dispatch(nr, pc, None, f"no instruction at {pc:#x}")
        nxt = ins.address + ins.size
        m, ops = ins.mnemonic, ins.operands
        if m.startswith("nop") or m == "endbr64":
            pc = nxt
        elif m == "cmp" and len(ops) == 2 and ops[1].type == cs_x86.X86_OP_IMM:
            value, pc = ops[1].imm & 0xFFFF_FFFF, nxt
        elif m == "test" and len(ops) == 2 and ops[0].type == ops[1].type == cs_x86.X86_OP_REG \
                and ops[0].reg == ops[1].reg:
            value, pc = 0, nxt
        elif m in _JCC and value is not None and ops and ops[0].type == cs_x86.X86_OP_IMM:
            pc = image.canonical(ops[0].imm) if _JCC[m](nr, value) else nxt
        elif m in ("jmp", "call") and ops and ops[0].type == cs_x86.X86_OP_IMM:
            target = image.canonical(ops[0].imm)
            if m == "jmp" and start <= target < end:
                pc = target
            else:
                return Dispatch(nr, ins.address, target)
        else:
            return Dispatch(nr, ins.address, None, f"unexpected '{m} {ins.op_str}'")
    return Dispatch(nr, pc, None, "no handler within the step bound")


class CheckSyscall(interfaces.plugins.PluginInterface):
    """Checks sys_call_table, the x64_sys_call dispatch and handler entries for hooks."""

    _required_framework_version = (2, 0, 0)
    _version = (1, 0, 0)

    @classmethod
    def get_requirements(cls) -> list[interfaces.configuration.RequirementInterface]:
        return [
            requirements.ModuleRequirement(name="kernel", description="Linux kernel",
                                           architectures=["Intel64"]),
            requirements.BooleanRequirement(name="hooked_only", description="Show only hooked entries",
                                            default=False, optional=True),
        ]

    @classmethod
    def syscall_table_count(cls, image: kernel_hooks.KernelImage) -> int:
        """Entries in ``sys_call_table`` (``sys_call_ptr_t[NR_syscalls]``), from its type or extent."""
        sym = image.table.get_symbol("sys_call_table")
        count = None
        if sym.type is not None:
            count = getattr(sym.type.vol, "count", None)
        if not count:
            start = image.symbol_address("sys_call_table")
            after = image.symbol_after(start)
            count = (after - start) // 8 if after else 0
        if not 0 < count <= MAX_TABLE_ENTRIES:
            raise exceptions.SymbolError("sys_call_table", image.kernel.symbol_table_name,
                                         f"implausible sys_call_table size {count}")
        return count

    @classmethod
    def _row(cls, check: str, nr: int, name: str, address: Optional[int], expected: Optional[int],
             target: Optional[int], hooked: bool, image: kernel_hooks.KernelImage, note: str = "",
             owner: str = "") -> tuple:
        hex_or_na = lambda v: format_hints.Hex(v) if v is not None else renderers.NotAvailableValue()
        symbol = note or (image.describe(target) if target is not None else "-")
        owner = owner or (image.owner(target) if target is not None else "-")
        return (check, nr, name, hex_or_na(address), hex_or_na(expected), hex_or_na(target),
                symbol, owner, hooked)

    @classmethod
    def table_rows(cls, image: kernel_hooks.KernelImage) -> list[tuple]:
        """Every row (the last column: hooked) of the three checks."""
        if not image.kernel.has_symbol("sys_call_table"):
            raise exceptions.SymbolError("sys_call_table", image.kernel.symbol_table_name,
                                         "the profile has no sys_call_table")
        count = cls.syscall_table_count(image)
        table_addr = image.symbol_address("sys_call_table")
        entries = image.read_pointers(table_addr, count)
        dispatch = decode_x64_sys_call(image, count)

        def syscall_name(nr: int) -> str:
            for addr in ((dispatch[nr].target if dispatch else None), entries[nr]):
                if addr is not None and image.in_text(addr):
                    for n in image.symbols_at(addr):
                        if n.startswith(SYSCALL_PREFIX):
                            return n[len(SYSCALL_PREFIX):]
            return "?"

        def is_handler(addr: Optional[int]) -> bool:
            return addr is not None and image.in_text(addr) and any(
                n.startswith(SYSCALL_PREFIX) for n in image.symbols_at(addr))

        rows: list[tuple] = []
        for nr, entry in enumerate(entries):
            # Compared with where x64_sys_call dispatches only when that is a handler (a patched
            # switch is reported on its own row, not on the intact table entry).
            expected = dispatch[nr].target if dispatch and not dispatch[nr].anomaly \
                and is_handler(dispatch[nr].target) else None
            hooked = not is_handler(entry) or (expected is not None and entry != expected)
            rows.append(cls._row("sys_call_table", nr, syscall_name(nr), table_addr + 8 * nr,
                                  expected, entry, hooked, image))
        if dispatch is None:
            vollog.info("no x64_sys_call: the kernel dispatches through sys_call_table")
        else:
            for d in dispatch:
                hooked = bool(d.anomaly) or not is_handler(d.target)
                rows.append(cls._row("x64_sys_call", d.nr, syscall_name(d.nr), d.site, None, d.target,
                                      hooked, image, note=d.anomaly))
        handlers: dict[int, int] = {}
        for nr, entry in enumerate(entries):
            for addr in (entry, dispatch[nr].target if dispatch else None):
                if addr is not None and image.in_text(addr):
                    handlers.setdefault(addr, nr)
        for addr, nr in sorted(handlers.items(), key=lambda kv: kv[1]):
            try:
                code = image.read_exact(addr, ENTRY_WINDOW + 16)
            except exceptions.InvalidAddressException:
                rows.append(cls._row("inline", nr, syscall_name(nr), addr, None, None, False, image,
                                      note="unreadable"))
                continue
            hook = kernel_hooks.find_trampoline(image, code, addr, ENTRY_WINDOW)
            traced = image.tracing_hooks(addr, addr + ENTRY_WINDOW) if hook is None else []
            if traced:
                # The entry's ftrace site calls ftrace's shared caller (several ops on it): the
                # registered kprobes and ftrace_ops on the site say who redirects it.
                theirs = [t for t in traced if not t[2]]
                rows.append(cls._row("inline", nr, syscall_name(nr), addr, addr, None, bool(theirs), image,
                                      note="; ".join(t[1] for t in traced) + ("" if theirs else " (ours)"),
                                      owner=",".join(sorted({t[0] for t in theirs or traced}))))
            elif hook is None:
                rows.append(cls._row("inline", nr, syscall_name(nr), addr, None, None, False, image,
                                      note=image.describe(addr)))
            else:
                # An optimized kprobe is a jmp to its detour buffer: the probe's handlers say whose it is.
                optimized = image.kprobe_hooks(addr + hook.offset, addr + hook.offset + 1)
                owner, how, ours = optimized or image.hook_owner(hook.target, addr + hook.offset)
                if optimized is not None:
                    how = f"{hook.kind} -> {how} (optimized){' (ours)' if ours else ''}"
                elif image.ftrace_trampoline_at(hook.target) is not None:
                    how = f"{hook.kind} -> {how}{' (ours)' if ours else ''}"
                else:
                    how = f"{hook.kind} {image.describe(hook.target)}"
                rows.append(cls._row("inline", nr, syscall_name(nr), addr + hook.offset, addr,
                                      hook.target, not ours, image, note=how, owner=owner))
        return rows

    def _generator(self) -> Iterator[tuple[int, tuple]]:
        image = kernel_hooks.KernelImage(self.context, self.config["kernel"])
        only = bool(self.config.get("hooked_only"))
        for row in self.table_rows(image):
            if row[-1] or not only:
                yield 0, row

    def run(self) -> renderers.TreeGrid:
        return renderers.TreeGrid(
            [("Check", str), ("Index", int), ("Syscall", str), ("Address", format_hints.Hex),
             ("Expected", format_hints.Hex), ("Target", format_hints.Hex), ("Symbol", str),
             ("Owner", str), ("Hooked", bool)],
            self._generator())
