"""linux.check_modules: the module list against sysfs kobjects and a carve of struct module.

Models include/linux/module.h (struct module, struct module_kobject),
kernel/module/ (the ``modules`` list, ``module_kset``) and
include/linux/kobject.h (struct kset, struct kobject).

A module that removed itself from the ``modules`` list (list_del on
THIS_MODULE->list, the classic) keeps its sysfs kobject under module_kset and
its struct module in module memory: it shows as ``module_list=False`` with
``sysfs``/``carve`` True, and ``Hidden`` True.
"""

from __future__ import annotations

import logging
import struct
from dataclasses import dataclass
from typing import Iterator, Optional

from volatility3.framework import interfaces, renderers
from volatility3.framework.configuration import requirements
from volatility3.framework.renderers import format_hints
from volatility3.plugins.linux.psxview import LIST_POISON1, LIST_POISON2, KernelReader, View, list_for_each

__all__ = ["CheckModules", "ModuleFields", "ModuleLayout", "for_each_module", "module_kset_modules",
           "carve_modules", "validate_module", "MODULES_VADDR", "MODULES_END"]

vollog = logging.getLogger(__name__)

# arch/x86/include/asm/pgtable_64_types.h: MODULES_VADDR = __START_KERNEL_map + KERNEL_IMAGE_SIZE
# (1 GiB with KASLR), MODULES_END = 0xffffffffff000000 (4- and 5-level paging alike).
MODULES_VADDR = 0xFFFFFFFFC0000000
MODULES_END = 0xFFFFFFFFFF000000
MODULE_STATES = {0: "LIVE", 1: "COMING", 2: "GOING", 3: "UNFORMED"}  # enum module_state
MAX_MODULES = 1 << 14
STRUCT_MODULE_ALIGN = 64  # struct module is ____cacheline_aligned
_Q = struct.Struct("<Q")
_NAME_CHARS = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")


@dataclass
class ModuleFields:
    """The fields of one struct module that check_modules needs."""

    addr: int
    state: int
    name: str
    name_ok: bool
    list_next: int
    list_prev: int
    mkobj_mod: int
    kobj_name: int


class ModuleLayout:
    """Offsets of struct module fields, and a parser for its bytes."""

    def __init__(self, r: KernelReader) -> None:
        o = r.offsetof
        self.state = o("module", "state")
        self.list = o("module", "list")
        self.name = o("module", "name")
        self.name_len = r.array_count("module", "name")  # MODULE_NAME_LEN
        self.mkobj = o("module", "mkobj")
        self.mkobj_mod = self.mkobj + o("module_kobject", "mod")
        self.kobj_name = self.mkobj + o("module_kobject", "kobj") + o("kobject", "name")
        self.span = max(self.state + 4, self.list + 16, self.name + self.name_len, self.mkobj_mod + 8,
                        self.kobj_name + 8)

    def parse(self, addr: int, buf: bytes, base: int = 0) -> ModuleFields:
        raw = buf[base + self.name: base + self.name + self.name_len]
        nul = raw.find(b"\0")
        name = raw[:nul] if nul > 0 else b""
        q = _Q.unpack_from
        return ModuleFields(
            addr, int.from_bytes(buf[base + self.state: base + self.state + 4], "little"),
            name.decode("latin-1"), bool(name) and all(c in _NAME_CHARS for c in name),
            q(buf, base + self.list)[0], q(buf, base + self.list + 8)[0], q(buf, base + self.mkobj_mod)[0],
            q(buf, base + self.kobj_name)[0])

    def read(self, r: KernelReader, addr: int) -> Optional[ModuleFields]:
        buf = r.read(addr, self.span)
        return None if buf is None else self.parse(addr, buf)


# -- trusting walkers ---------------------------------------------------------


def for_each_module(r: KernelReader, lay: ModuleLayout, view: View) -> None:
    """Fill ``view`` from the ``modules`` list (struct module, via module->list)."""
    head = r.symbol("modules")
    for node in list_for_each(r, head, view, limit=MAX_MODULES):
        view.tasks.add(node - lay.list)


def module_kset_modules(r: KernelReader, lay: ModuleLayout, view: View) -> None:
    """Fill ``view`` from module_kset (struct kset *): kobject -> module_kobject -> mod.

    Built-in modules (parameters only) have a module_kobject with mod NULL; they are skipped.
    """
    kset = r.u64(r.symbol("module_kset"))
    if not kset or not r.is_kernel_pointer(kset):
        view.stop("module_kset is NULL or unreadable")
        return
    entry = r.offsetof("kobject", "entry")
    kobj = r.offsetof("module_kobject", "kobj")
    mod_off = r.offsetof("module_kobject", "mod")
    for node in list_for_each(r, kset + r.offsetof("kset", "list"), view, limit=MAX_MODULES):
        mod = r.u64(node - entry - kobj + mod_off)
        if mod and r.is_kernel_pointer(mod):
            view.tasks.add(mod)


# -- validating carve ---------------------------------------------------------


def validate_module(r: KernelReader, m: ModuleFields) -> bool:
    """Check a struct module candidate: state, name, list pointers, mkobj.mod and kobject name."""
    if not (m.state in MODULE_STATES and m.name_ok and m.mkobj_mod == m.addr
            and (r.is_kernel_pointer(m.list_next) or m.list_next == LIST_POISON1)  # list_del() poisons
            and (r.is_kernel_pointer(m.list_prev) or m.list_prev == LIST_POISON2)):
        return False
    if not r.is_kernel_pointer(m.kobj_name):
        return False
    kname = r.read(m.kobj_name, len(m.name) + 1)
    return kname == m.name.encode("latin-1") + b"\0"


def mapped_runs(r: KernelReader, start: int, end: int) -> Iterator[tuple[int, int]]:
    """(vaddr, length) runs of kernel memory mapped in [start, end)."""
    paged = getattr(r.layer, "paged", None)  # shadowvol's live layer: walk the page tables once
    if paged is not None and hasattr(paged, "iter_mapped"):
        run_start = run_end = None
        for vaddr, size, _paddr in paged.iter_mapped(start, end):
            lo, hi = max(vaddr, start), min(vaddr + size, end)
            if run_end == lo:
                run_end = hi
                continue
            if run_start is not None:
                yield run_start, run_end - run_start
            run_start, run_end = lo, hi
        if run_start is not None:
            yield run_start, run_end - run_start
        return
    for offset, length, _m, _ml, _layer in r.layer.mapping(start & r.mask, end - start, ignore_errors=True):
        yield r.canonical(offset), length


def carve_modules(r: KernelReader, lay: ModuleLayout, view: View, fields: dict[int, ModuleFields],
                  start: int = MODULES_VADDR, end: int = MODULES_END) -> None:
    """Fill ``view`` with validated struct modules carved from module memory [start, end)."""
    chunk = 1 << 20
    for vaddr, length in mapped_runs(r, start, end):
        for cstart in range(vaddr, vaddr + length, chunk):
            n = min(chunk + lay.span, vaddr + length - cstart)
            buf = r.read(cstart, n, pad=True)
            if buf is None:
                view.stop(f"unreadable module memory at {cstart:#x}")
                continue
            first = (-cstart) % STRUCT_MODULE_ALIGN
            q = _Q.unpack_from
            stop = min(chunk, n - lay.span)
            for off in range(first, stop + 1, STRUCT_MODULE_ALIGN):
                addr = cstart + off
                if q(buf, off + lay.mkobj_mod)[0] != addr:  # the signature: mkobj.mod == &module
                    continue
                m = lay.parse(addr, buf, off)
                if validate_module(r, m):
                    view.tasks.add(addr)
                    fields[addr] = m
                if len(view.tasks) > MAX_MODULES:
                    view.stop(f"more than {MAX_MODULES} candidates")
                    return


class CheckModules(interfaces.plugins.PluginInterface):
    """Compares the module list with sysfs (module_kset) and a carve of struct module from module memory."""

    _required_framework_version = (2, 0, 0)
    _version = (1, 0, 0)

    VIEWS = ("module_list", "sysfs", "carve")
    only_hidden = False

    @classmethod
    def get_requirements(cls) -> list[interfaces.configuration.RequirementInterface]:
        return [
            requirements.ModuleRequirement(name="kernel", description="Linux kernel",
                                           architectures=["Intel32", "Intel64"]),
            requirements.BooleanRequirement(name="hidden_only", description="Only rows flagged Hidden",
                                            default=False, optional=True),
        ]

    @classmethod
    def collect_views(cls, context: interfaces.context.ContextInterface, kernel_module_name: str
                      ) -> tuple[dict[str, View], dict[int, ModuleFields], KernelReader, ModuleLayout]:
        """Each view's struct module addresses, the fields carved, reader and layout."""
        r = KernelReader(context, kernel_module_name)
        lay = ModuleLayout(r)
        views = {name: View(name) for name in cls.VIEWS}
        fields: dict[int, ModuleFields] = {}
        for_each_module(r, lay, views["module_list"])
        module_kset_modules(r, lay, views["sysfs"])
        carve_modules(r, lay, views["carve"], fields)
        return views, fields, r, lay

    def _generator(self) -> Iterator[tuple[int, tuple]]:
        views, fields, r, lay = self.collect_views(self.context, self.config["kernel"])
        for v in views.values():
            if v.partial:
                vollog.warning(f"check_modules: {v.name} walk incomplete: {v.partial}")
        listed = views["module_list"].tasks
        mods = set().union(*(v.tasks for v in views.values()))
        suspects = mods - listed
        if suspects:  # the guest runs on: walk the list once more before calling anything hidden
            again = View("module_list")
            for_each_module(r, lay, again)
            listed |= again.tasks & suspects
            suspects -= again.tasks
            if again.partial:
                vollog.warning(f"check_modules: module list re-walk incomplete: {again.partial}")
        rows = []
        for mod in mods:
            m = fields.get(mod) or lay.read(r, mod)
            notes, hidden = [], False
            if m is None or not m.name_ok:
                notes.append("unreadable struct module")
            if mod in suspects:
                if m is not None and MODULE_STATES.get(m.state) in ("LIVE", "COMING"):
                    hidden = True
                    notes.append("not in module list")
                else:
                    notes.append(f"state {MODULE_STATES.get(m.state, '?') if m else '?'}: (un)loading")
            for v in views.values():
                if mod not in v.tasks and v.partial:
                    notes.append(f"{v.name} partial")
            if (self.only_hidden or self.config.get("hidden_only")) and not hidden:
                continue
            rows.append((m.name if m and m.name_ok else "", mod, hidden, notes))
        rows.sort()
        for name, mod, hidden, notes in rows:
            yield 0, (format_hints.Hex(mod), name or renderers.UnreadableValue(),
                      *(mod in views[v].tasks for v in self.VIEWS), hidden, "; ".join(notes))

    def run(self) -> renderers.TreeGrid:
        return renderers.TreeGrid(
            [("Offset(V)", format_hints.Hex), ("Name", str), ("module_list", bool), ("sysfs", bool),
             ("carve", bool), ("Hidden", bool), ("Notes", str)],
            self._generator())
