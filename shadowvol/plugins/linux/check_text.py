"""linux.check_text: x64_sys_call and every syscall handler, byte for byte against the kernel image.

The live text of ``x64_sys_call`` and of each ``__x64_sys_*`` handler is
compared with the same bytes of the kernel image the profile was built from
(``--kernel-image``: the vmlinux ELF, or the whole decompressed payload of
the vmlinuz, which carries ``vmlinux.relocs``; ``shadowvol`` finds and
extracts the image itself). The image's text is relocated by the KASLR slide
as the boot loader does, and the sites the kernel rewrites in itself are
masked, each taken from the image's own tables (:mod:`kernel_text`):
alternatives, paravirt sites, static calls, jump labels, ftrace call sites,
retpolines, return thunks, call-depth sites, sealed endbr64, lock prefixes,
runtime constants. Where the kernel's rewrite has a known shape, the live
content must have it: a jump label jumps only to its own target, an ftrace
site is a nop or a call into kernel text or an ftrace trampoline, a static
call reaches the kernel or a listed module.

Each changed instruction run is one row: function, offset, live and image
bytes, the live code, where a jmp/call in it leads and who owns that
(``hidden:NAME`` for a module hidden from the module list). A kprobe's int3
is attributed to the probe's handlers; our guest stub's are ours, not a
finding. A clean kernel gives no row.
"""

from __future__ import annotations

import logging
import mmap
import os
from typing import Iterator, Optional

from capstone import x86 as cs_x86
from volatility3.framework import exceptions, interfaces, renderers
from volatility3.framework.configuration import requirements
from volatility3.framework.renderers import format_hints

from volatility3.plugins.linux import kernel_hooks
from volatility3.plugins.linux.kernel_text import (ElfImage, KernelTextError, Layout, PatchSite, PatchSites,
                                                   compare_text, is_nop, patch_sites)

vollog = logging.getLogger(__name__)

__all__ = ["CheckText", "TextImage", "NO_IMAGE"]

SYSCALL_PREFIX = "__x64_sys_"
DISPATCH = "x64_sys_call"
#: The path of a system call before its handler: the SYSCALL entry (MSR_LSTAR) and its inner labels
#: (entry_SYSCALL_64_after_hwframe...), its C part, the dispatch.
ENTRY_PREFIX = "entry_SYSCALL_64"
ENTRY = ("do_syscall_64", DISPATCH)
PREFIXES = (SYSCALL_PREFIX, ENTRY_PREFIX, *ENTRY)
MAX_FUNCTION = 1 << 16
NO_IMAGE = ("linux.check_text needs the kernel image the guest booted: --kernel-image PATH (its vmlinuz, "
            "or the vmlinux ELF with its relocations); shadowvol finds it for its own VMs and cached kernels")

#: Struct layouts read from the profile: type -> members.
LAYOUTS = {
    "alt_instr": ("instr_offset", "instrlen"),
    "paravirt_patch_site": ("instr", "len"),
    "jump_entry": ("code", "target"),
    "static_call_site": ("addr",),
}
#: Tables the linker script folds into a bigger section: (section name, start symbol, stop symbol).
BOUNDED_TABLES = (
    ("__mcount_loc", "__start_mcount_loc", "__stop_mcount_loc"),
    ("__jump_table", "__start___jump_table", "__stop___jump_table"),
    (".static_call_sites", "__start_static_call_sites", "__stop_static_call_sites"),
)


class TextImage:
    """The kernel image file, checked to be the running kernel, with its patch sites (one run)."""

    def __init__(self, image: kernel_hooks.KernelImage, path: str) -> None:
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError as exc:
            raise exceptions.VolatilityException(f"cannot open kernel image {path}: {exc.strerror}") from None
        try:
            size = os.fstat(fd).st_size
            if size < 64:
                raise exceptions.VolatilityException(f"kernel image {path}: not an ELF file")
            self._map = mmap.mmap(fd, size, prot=mmap.PROT_READ)
        finally:
            os.close(fd)
        try:
            self.elf = ElfImage(self._map)
        except KernelTextError as exc:
            hint = " (a compressed vmlinuz: pass it through shadowvol, or extract it with " \
                   "scripts/extract-vmlinux)" if self._map[0x202:0x206] == b"HdrS" else ""
            raise exceptions.VolatilityException(f"kernel image {path}: {exc}{hint}") from None
        self.image = image
        self.delta = image.shift
        self._check_banner(path)
        self.functions = CheckText.functions(image)
        self.sites = self._sites()

    def link(self, live: int) -> int:
        """Link-time address of live kernel address ``live``."""
        return self.image.canonical(live - self.delta)

    def _check_banner(self, path: str) -> None:
        """The image's ``linux_banner`` must be the running kernel's: else every byte would differ."""
        live_at = self.image.symbol("linux_banner")
        if live_at is None:
            raise exceptions.SymbolError("linux_banner", self.image.kernel.symbol_table_name,
                                         "the profile has no linux_banner")
        live = self.image.read_exact(live_at, 256).split(b"\0")[0]
        try:
            mine = self.elf.read(self.link(live_at), len(live) + 1)
        except KernelTextError:
            mine = b""
        if mine != live + b"\0":
            theirs = mine.split(b"\0")[0][:60]
            raise exceptions.VolatilityException(
                f"kernel image {path} is not the running kernel (its linux_banner differs: "
                f"{theirs!r} vs {live[:60]!r})")

    def _sites(self) -> PatchSites:
        layouts = {}
        for type_name, members in LAYOUTS.items():
            try:
                size = self.image.sizeof(type_name)
                offsets = {m: self.image.offsetof(type_name, m) for m in members}
            except (exceptions.SymbolError, AttributeError, KeyError):
                continue  # a kernel without that feature (no paravirt patching on 6.12)
            layouts[type_name] = Layout(size, offsets)
        bounds = {}
        for section, start, stop in BOUNDED_TABLES:
            lo, hi = self.image.types.symbol_offset(start), self.image.types.symbol_offset(stop)
            if lo is not None and hi is not None:
                bounds[section] = (self.image.canonical(lo), self.image.canonical(hi))
        try:
            ranges = sorted((self.link(addr), self.link(addr) + size) for _n, addr, size in self.functions)
            return patch_sites(self.elf, layouts, bounds, ranges)
        except KernelTextError as exc:
            raise exceptions.VolatilityException(f"kernel image: {exc}") from None

    def close(self) -> None:
        self._map.close()


class CheckText(interfaces.plugins.PluginInterface):
    """Compares x64_sys_call and the syscall handlers with the kernel image, masking what the kernel patches itself."""

    _required_framework_version = (2, 0, 0)
    _version = (1, 0, 0)

    @classmethod
    def get_requirements(cls) -> list[interfaces.configuration.RequirementInterface]:
        return [
            requirements.ModuleRequirement(name="kernel", description="Linux kernel", architectures=["Intel64"]),
            requirements.StringRequirement(name="kernel_image", optional=True,
                                           description="the kernel image the guest booted: vmlinux ELF, with "
                                                       "vmlinux.relocs appended under KASLR (shadowvol finds it)"),
        ]

    @classmethod
    def functions(cls, image: kernel_hooks.KernelImage) -> list[tuple[str, int, int]]:
        """(name, live address, size) of the syscall path in kernel text: ``entry_SYSCALL_64`` (and its
        inner labels), ``do_syscall_64``, ``x64_sys_call`` and every ``__x64_sys_*`` handler."""
        addrs, names = image._symbols()
        seen: dict[int, str] = {}
        for addr, name in zip(addrs, names):
            if name.startswith(PREFIXES) and (name in ENTRY or name.startswith(PREFIXES[:2])) and image.in_text(addr):
                seen.setdefault(addr, name)
        out = []
        for addr, name in sorted(seen.items()):
            end = min(image.symbol_after(addr) or addr + 1, image.text_end, addr + MAX_FUNCTION)
            out.append((kernel_hooks.preferred_name(image.symbols_at(addr)) or name, addr, end - addr))
        return out

    @classmethod
    def site_check(cls, image: kernel_hooks.KernelImage, text: TextImage):
        """Whether a patch site's live content is one the kernel itself writes there."""
        cs = image.cs

        def rel_target(live_addr: int, live: bytes) -> Optional[int]:
            for insn in cs.disasm(live, live_addr, 1):
                if insn.mnemonic in ("jmp", "call") and insn.operands and \
                        insn.operands[0].type == cs_x86.X86_OP_IMM and insn.size == len(live):
                    return image.canonical(insn.operands[0].imm)
            return None

        def check(site: PatchSite, live_addr: int, live: bytes, mine: bytes) -> bool:
            if live == mine or site.kind not in ("ftrace", "jump-label", "static-call"):
                return True
            if is_nop(cs, live, live_addr):
                return True
            target = rel_target(live_addr, live)
            if site.kind == "jump-label":
                return target is not None and site.target is not None and target == image.canonical(site.target + text.delta)
            if site.kind == "ftrace":
                return target is not None and live[0] == 0xE8 and \
                    (image.in_text(target) or image.ftrace_trampoline_at(target) is not None)
            if live[0] == 0xC3:  # static call to a function returning nothing: "ret; int3..."
                return True
            return target is not None and (image.in_text(target) or image.module_at(target) is not None)

        return check

    @classmethod
    def text_rows(cls, image: kernel_hooks.KernelImage, path: str) -> list[tuple]:
        """One row per changed instruction run (the last column: a finding)."""
        text = TextImage(image, path)
        try:
            check = cls.site_check(image, text)
            rows = []
            for name, addr, size in text.functions:
                link = text.link(addr)
                try:
                    mine = text.elf.text(link, size, text.delta)
                except KernelTextError as exc:
                    raise exceptions.VolatilityException(f"kernel image: {name}: {exc}") from None
                live = image.read_exact(addr, size)
                for diff in compare_text(image.cs, link, text.delta, live, mine, text.sites.within(link, link + size),
                                         check):
                    rows.append(cls._row(image, name, addr, diff))
            vollog.info("compared %d functions; %d patch sites (%s)", len(text.functions), len(text.sites),
                        ", ".join(text.sites.kinds))
            return rows
        finally:
            text.close()

    @classmethod
    def _row(cls, image: kernel_hooks.KernelImage, name: str, addr: int, diff) -> tuple:
        at = addr + diff.offset
        code, target = [], None
        for insn in image.cs.disasm(diff.live, at):
            code.append(f"{insn.mnemonic} {insn.op_str}".strip())
            if target is None and insn.mnemonic in ("jmp", "call") and insn.operands and \
                    insn.operands[0].type == cs_x86.X86_OP_IMM:
                target = image.canonical(insn.operands[0].imm)
        if target is None:
            found = kernel_hooks.find_trampoline(image, diff.live + bytes(16), at, len(diff.live))
            target = found.target if found is not None else None
        probes = image.kprobe_hooks(at, at + len(diff.live))
        if probes is not None:  # an int3, or an optimized kprobe's jmp to its detour buffer
            owner, how, ours = probes
            code.append(how)
        elif target is not None:
            owner, how, ours = image.hook_owner(target, at)
            owner = owner if not image.in_text(target) else kernel_hooks.UNKNOWN
        else:
            owner, ours = kernel_hooks.UNKNOWN, False
        if diff.sites:
            code.append(f"(refused at {', '.join(diff.sites)} site)")
        hex_or_na = format_hints.Hex(target) if target is not None else renderers.NotAvailableValue()
        return (name, diff.offset, format_hints.Hex(at), diff.live.hex(" "), diff.image.hex(" "), "; ".join(code),
                hex_or_na, image.function_name(target) if target is not None else "-", owner, not ours)

    def _generator(self) -> Iterator[tuple[int, tuple]]:
        path = self.config.get("kernel_image")
        if not path:
            raise exceptions.VolatilityException(NO_IMAGE)
        image = kernel_hooks.KernelImage(self.context, self.config["kernel"])
        for row in self.text_rows(image, path):
            yield 0, row

    def run(self) -> renderers.TreeGrid:
        return renderers.TreeGrid(
            [("Symbol", str), ("Offset", int), ("Address", format_hints.Hex), ("Live bytes", str),
             ("Image bytes", str), ("Live code", str), ("Target", format_hints.Hex), ("Target symbol", str),
             ("Owner", str), ("Finding", bool)],
            self._generator())
