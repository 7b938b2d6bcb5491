"""The one kernel reader of our plugins, with drgn-style walkers named after the kernel's own.

Models include/linux/list.h (``list_for_each_entry``), include/linux/sched/signal.h
(``for_each_process``, ``for_each_thread``), include/linux/idr.h + lib/xarray.c
(``idr_for_each``), include/linux/rbtree.h, include/linux/percpu-defs.h
(``per_cpu_ptr``) and kernel/module/ (``for_each_module``, ``struct module``'s
memory regions).

One :class:`Kernel` is built per plugin run (one snapshot epoch of a live
guest): it reads kernel virtual memory and answers profile facts (symbol
addresses, member offsets), and caches profile facts only, never guest data.

**One bound and cycle policy.** Every walker takes a :class:`Walk`, visits at
most ``walk.limit`` entries, never visits a node twice, and stops at the first
pointer that is not a kernel pointer or cannot be read. When it stops early
it records why in ``walk.partial`` (the first reason wins) instead of
raising: a running guest changes its lists under us, and the caller decides
whether a partial answer is good enough.

Reads: :meth:`Kernel.read` returns None on a fault; :meth:`Kernel.read_exact`
raises the layer's own fault (volatility3's ``InvalidAddressException`` in a
plugin; shadowvol's ``InvalidAddressError`` on a Target), which carries the
layer and the address, for callers that cannot go on without the bytes.

**Two worlds, one reader.** This module imports nothing but the standard
library at import time, so the same walkers serve our volatility3 plugins
(:meth:`Kernel.from_context`: a volatility3 layer and :class:`VolatilityTypes`)
and shadowvol's trace and integrity code, which do not use volatility3
(``shadowvol.kernel_reader``: a Target's kernel memory and symbol API). A
reader's memory is anything with ``read(addr, length, pad=False)`` and
``address_mask``; ``faults`` names the exceptions its reads raise.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator, Optional, Protocol

if TYPE_CHECKING:
    from volatility3.framework import interfaces

__all__ = ["Kernel", "Types", "VolatilityTypes", "Walk", "ModuleRegion", "canonical", "list_for_each", "hlist_for_each",
           "list_for_each_entry", "for_each_process", "for_each_thread", "idr_for_each", "rb_for_each",
           "per_cpu_ptr", "for_each_module", "module_regions", "module_name", "module_core_text",
           "LIST_POISON1", "LIST_POISON2",
           "MAX_ENTRIES", "MAX_NODES",
           "ModuleFields", "ModuleLayout", "validate_module", "carve_modules", "MODULE_STATES", "MODULES_VADDR",
           "MODULES_END", "module_address_lookup"]

LIST_POISON1 = 0xDEAD000000000100
LIST_POISON2 = 0xDEAD000000000122
MAX_ENTRIES = 1 << 17
"""Default bound of every list walk (tasks, modules, probes...): far above any real kernel's count."""
MAX_NODES = 1 << 16
"""Default bound of every tree walk (xa_node, rb_node)."""
_Q = struct.Struct("<Q")


def canonical(addr: int, mask: int) -> int:
    """Sign-extend ``addr`` (masked by the layer's ``address_mask``) to a 64-bit canonical address."""
    addr &= mask
    top = (mask + 1) >> 1
    return addr | (~mask & 0xFFFF_FFFF_FFFF_FFFF) if addr & top else addr


class Types(Protocol):
    """Profile facts: what the kernel's types and symbols say, independent of memory."""

    def symbol_offset(self, name: str) -> Optional[int]:
        """Link-time address of ``name`` (per-CPU symbols: their per-CPU offset), or None."""

    def kaslr_shift(self) -> int:
        """What KASLR added to link-time addresses."""

    def offsetof(self, type_name: str, *path: str) -> int:
        """offsetof(struct type_name, a.b.c)."""

    def sizeof(self, type_name: str) -> int:
        """sizeof(struct type_name)."""

    def has_member(self, type_name: str, member: str) -> bool:
        """Whether struct type_name has ``member``."""

    def array_count(self, type_name: str, member: str) -> int:
        """The element count of array member ``member`` of struct type_name."""

    def enum_value(self, enum: str, name: str) -> Optional[int]:
        """The value of enumerator ``name`` of ``enum enum``, or None if the profile lacks either."""


class Memory(Protocol):
    """Kernel virtual memory: what a reader reads (a volatility3 layer has this shape)."""

    address_mask: int

    def read(self, offset: int, length: int, pad: bool = False) -> bytes:
        """``length`` bytes at (masked) ``offset``; raises a fault at a hole unless ``pad``."""


class VolatilityTypes:
    """:class:`Types` from a volatility3 kernel module (its ISF symbol table); member offsets cached."""

    def __init__(self, module: "interfaces.context.ModuleInterface") -> None:
        from volatility3.framework import exceptions

        self.module = module
        self._symbol_error = exceptions.SymbolError
        self._offsets: dict[tuple[str, ...], int] = {}

    def symbol_offset(self, name: str) -> Optional[int]:
        if not self.module.has_symbol(name):
            return None
        return self.module.get_symbol(name).address

    def kaslr_shift(self) -> int:
        return self.module.offset

    def offsetof(self, type_name: str, *path: str) -> int:
        key = (type_name, *path)
        off = self._offsets.get(key)
        if off is None:
            tmpl = self.module.get_type(type_name)
            off = 0
            for member in path:
                off += tmpl.relative_child_offset(member)
                tmpl = tmpl.child_template(member)
            self._offsets[key] = off
        return off

    def sizeof(self, type_name: str) -> int:
        return self.module.get_type(type_name).size

    def has_member(self, type_name: str, member: str) -> bool:
        try:
            return self.module.get_type(type_name).has_member(member)
        except self._symbol_error:
            return False

    def array_count(self, type_name: str, member: str) -> int:
        return self.module.get_type(type_name).child_template(member).vol.count

    def enum_value(self, enum: str, name: str) -> Optional[int]:
        try:
            return self.module.get_enumeration(enum).choices.get(name)
        except self._symbol_error:
            return None


class Kernel:
    """Kernel virtual memory (:class:`Memory`) and the profile's facts (:class:`Types`), for one run.

    ``faults`` are the exceptions the memory's reads raise at a hole
    (default: volatility3's ``InvalidAddressException``); ``context`` and
    ``module`` are set for a volatility3 plugin and None elsewhere.
    """

    def __init__(self, layer: Memory, types: Types, context: Optional["interfaces.context.ContextInterface"] = None,
                 module: Optional["interfaces.context.ModuleInterface"] = None,
                 faults: Optional[tuple[type[BaseException], ...]] = None) -> None:
        if faults is None:
            from volatility3.framework import exceptions

            faults = (exceptions.InvalidAddressException,)
        self.layer = layer
        self.types = types
        self.context = context
        self.module = module
        self.faults = faults
        self.mask = layer.address_mask
        self.kernel_half = (1 << 64) - (1 << (self.mask.bit_length() - 1))
        self.shift = types.kaslr_shift()

    @classmethod
    def from_context(cls, context: "interfaces.context.ContextInterface", module_name: str) -> "Kernel":
        """The kernel of plugin requirement ``module_name`` (its layer and ISF)."""
        module = context.modules[module_name]
        return cls(context.layers[module.layer_name], VolatilityTypes(module), context, module)

    # -- profile facts

    def symbol(self, name: str) -> Optional[int]:
        """Run-time address of kernel symbol ``name`` (KASLR applied, canonical), or None."""
        off = self.types.symbol_offset(name)
        return None if off is None else self.canonical(off + self.shift)

    def raw_symbol(self, name: str) -> Optional[int]:
        """Link-time value of ``name``: per-CPU symbols are offsets KASLR does not move."""
        return self.types.symbol_offset(name)

    def offsetof(self, type_name: str, *path: str) -> int:
        return self.types.offsetof(type_name, *path)

    def sizeof(self, type_name: str) -> int:
        return self.types.sizeof(type_name)

    def has_member(self, type_name: str, member: str) -> bool:
        return self.types.has_member(type_name, member)

    def array_count(self, type_name: str, member: str) -> int:
        return self.types.array_count(type_name, member)

    # -- memory

    def canonical(self, addr: int) -> int:
        """Sign-extend a (possibly masked) kernel address to 64 bits."""
        return canonical(addr, self.mask)

    def is_kernel_pointer(self, value: int) -> bool:
        """Whether ``value`` is in the kernel half and not a list poison value."""
        return self.kernel_half <= value < (1 << 64) and value not in (LIST_POISON1, LIST_POISON2)

    def read_exact(self, addr: int, length: int) -> bytes:
        """``length`` bytes at kernel virtual ``addr``; raises the layer's fault (one of ``faults``) at a hole."""
        return self.layer.read(addr & self.mask, length)

    def read(self, addr: int, length: int, pad: bool = False) -> Optional[bytes]:
        """``length`` bytes at ``addr``; None if any of it is unmapped (zeros there if ``pad``)."""
        try:
            return self.layer.read(addr & self.mask, length, pad=pad)
        except self.faults:
            return None

    def u64(self, addr: int) -> Optional[int]:
        data = self.read(addr, 8)
        return None if data is None else _Q.unpack(data)[0]

    def u32(self, addr: int) -> Optional[int]:
        data = self.read(addr, 4)
        return None if data is None else int.from_bytes(data, "little")

    def read_pointers(self, addr: int, count: int) -> tuple[int, ...]:
        """``count`` little-endian 64-bit words at ``addr``; raises the layer's fault at a hole."""
        return struct.unpack(f"<{count}Q", self.read_exact(addr, 8 * count))

    def cstring(self, addr: int, limit: int = 256) -> Optional[str]:
        """The NUL-terminated string at ``addr`` (at most ``limit`` bytes), or None if unreadable."""
        data = self.read(addr, limit, pad=True)
        if data is None:
            return None
        return data.split(b"\0", 1)[0].decode("latin-1")


@dataclass
class Walk:
    """One walk's bound, and why it stopped early ("" if it did not); ``items`` is for the caller's results."""

    name: str = ""
    limit: int = MAX_ENTRIES
    partial: str = ""
    items: set[int] = field(default_factory=set)

    def stop(self, reason: str) -> None:
        if not self.partial:
            self.partial = reason


# -- list.h -------------------------------------------------------------------


def list_for_each(k: Kernel, head: int, walk: Walk, first: Optional[int] = None) -> Iterator[int]:
    """list_for_each(pos, head): each ``struct list_head *`` after ``head``, bounded and cycle-checked.

    ``first`` is ``head->next`` when the caller already read it.
    """
    seen = {head}
    prev = head
    node = k.u64(head) if first is None else first
    while node != head:
        if node is None or not k.is_kernel_pointer(node):
            walk.stop(f"bad list pointer {node if node is None else hex(node)} after {prev:#x}")
            return
        if node in seen:
            walk.stop(f"cycle at {node:#x}")
            return
        if len(seen) > walk.limit:
            walk.stop(f"more than {walk.limit} entries")
            return
        nxt = k.u64(node)
        if nxt is None:
            walk.stop(f"unreadable list node {node:#x}")
            return
        seen.add(node)
        yield node
        prev, node = node, nxt


def hlist_for_each(k: Kernel, first: int, walk: Walk) -> Iterator[int]:
    """hlist_for_each(pos, head): each ``struct hlist_node *`` from ``head->first``, bounded and cycle-checked."""
    seen: set[int] = set()
    node = first
    while node:
        if not k.is_kernel_pointer(node):
            walk.stop(f"bad hlist pointer {node:#x}")
            return
        if node in seen:
            walk.stop(f"cycle at {node:#x}")
            return
        if len(seen) >= walk.limit:
            walk.stop(f"more than {walk.limit} entries")
            return
        nxt = k.u64(node)
        if nxt is None:
            walk.stop(f"unreadable hlist node {node:#x}")
            return
        seen.add(node)
        yield node
        node = nxt


def list_for_each_entry(k: Kernel, type_name: str, head: int, member: str, walk: Walk) -> Iterator[int]:
    """list_for_each_entry(pos, head, member): each ``type_name *`` whose ``member`` is on the list."""
    off = k.offsetof(type_name, member)
    for node in list_for_each(k, head, walk):
        yield node - off


# -- sched/signal.h -----------------------------------------------------------


def for_each_thread(k: Kernel, signal: int, walk: Walk) -> Iterator[int]:
    """for_each_thread: each ``struct task_struct *`` on ``signal->thread_head`` (struct signal_struct *)."""
    head = signal + k.offsetof("signal_struct", "thread_head")
    return list_for_each_entry(k, "task_struct", head, "thread_node", walk)


def for_each_process(k: Kernel, walk: Walk) -> Iterator[int]:
    """for_each_process: ``&init_task`` and each ``struct task_struct *`` on ``init_task.tasks``."""
    init_task = k.symbol("init_task")
    yield init_task
    yield from list_for_each_entry(k, "task_struct", init_task + k.offsetof("task_struct", "tasks"), "tasks", walk)


# -- idr.h / xarray -----------------------------------------------------------


def idr_for_each(k: Kernel, idr: int, walk: Walk) -> Iterator[int]:
    """idr_for_each: each entry (void *) of a ``struct idr *`` (an xarray since 4.20), bounded by MAX_NODES nodes."""
    head = k.u64(idr + k.offsetof("idr", "idr_rt") + k.offsetof("xarray", "xa_head"))
    if head is None:
        walk.stop("cannot read the idr head")
        return
    slots_off = k.offsetof("xa_node", "slots")
    nslots = k.array_count("xa_node", "slots")
    fmt = struct.Struct(f"<{nslots}Q")
    stack, seen = [head], set()
    while stack:
        entry = stack.pop()
        if entry & 3 == 2 and entry > 4096:  # xa_is_node()
            node = entry - 2
            if node in seen:
                walk.stop(f"xa_node cycle at {node:#x}")
                continue
            if len(seen) >= MAX_NODES:
                walk.stop(f"more than {MAX_NODES} xa_nodes")
                return
            seen.add(node)
            data = k.read(node + slots_off, nslots * 8)
            if data is None:
                walk.stop(f"unreadable xa_node {node:#x}")
                continue
            stack.extend(reversed([e for e in fmt.unpack(data) if e]))
        elif entry and entry & 3 == 0:
            yield entry


# -- rbtree.h -----------------------------------------------------------------


def rb_for_each(k: Kernel, root: int, walk: Walk) -> Iterator[int]:
    """Each ``struct rb_node *`` of the tree under node ``root`` (pre-order), bounded and cycle-checked."""
    right = k.offsetof("rb_node", "rb_right")
    left = k.offsetof("rb_node", "rb_left")
    stack, seen = [root], set()
    while stack:
        node = stack.pop()
        if not node:
            continue
        if not k.is_kernel_pointer(node) or node in seen or len(seen) >= MAX_NODES:
            walk.stop(f"bad rb_node {node:#x}")
            continue
        seen.add(node)
        data = k.read(node, max(right, left) + 8)
        if data is None:
            walk.stop(f"unreadable rb_node {node:#x}")
            continue
        yield node
        stack.append(_Q.unpack_from(data, right)[0])
        stack.append(_Q.unpack_from(data, left)[0])


# -- percpu-defs.h ------------------------------------------------------------


def per_cpu_ptr(k: Kernel, name: str, cpu: int) -> Optional[int]:
    """per_cpu_ptr(&name, cpu): the per-CPU symbol's offset + ``__per_cpu_offset[cpu]``, or None."""
    table = k.symbol("__per_cpu_offset")
    off = k.raw_symbol(name)
    if table is None or off is None:
        return None
    base = k.u64(table + 8 * cpu)
    return None if base is None else (base + off) & 0xFFFF_FFFF_FFFF_FFFF


# -- module.h -----------------------------------------------------------------


@dataclass(frozen=True)
class ModuleRegion:
    """One memory region of a module: ``[base, base + size)``; ``core`` unless it is init memory."""

    name: str
    base: int
    size: int
    core: bool = True
    mod: int = 0  # the struct module *

    def __contains__(self, addr: int) -> bool:
        return self.base <= addr < self.base + self.size


def for_each_module(k: Kernel, walk: Walk) -> Iterator[int]:
    """Each ``struct module *`` on the ``modules`` list (via ``module->list``)."""
    head = k.symbol("modules")
    if head is None:
        walk.stop("the profile has no modules list")
        return
    yield from list_for_each_entry(k, "module", head, "list", walk)


def module_name(k: Kernel, mod: int) -> Optional[str]:
    """``mod->name`` (struct module *), or None if unreadable."""
    raw = k.read(mod + k.offsetof("module", "name"), k.array_count("module", "name"))
    if raw is None:
        return None
    return raw.split(b"\0", 1)[0].decode("latin-1")


def module_regions(k: Kernel, mod: int, name: str) -> list[ModuleRegion]:
    """The memory regions of ``mod`` (struct module *), empty ones left out.

    Linux 6.4 replaced ``core_layout``/``init_layout`` (struct module_layout)
    with ``mem[MOD_MEM_NUM_TYPES]`` (struct module_memory), commit ac3b43283923
    ("module: replace module_layout with module_memory"); the init types are
    MOD_INIT_TEXT and after (enum mod_mem_type).
    """
    out = []
    if k.has_member("module", "mem"):
        count = k.array_count("module", "mem")
        stride = k.sizeof("module_memory")
        base_off, size_off = k.offsetof("module_memory", "base"), k.offsetof("module_memory", "size")
        first_init = _enum_value(k, "mod_mem_type", "MOD_INIT_TEXT", 3)
        mem = mod + k.offsetof("module", "mem")
        for i in range(count):
            base, size = k.u64(mem + i * stride + base_off), k.u32(mem + i * stride + size_off)
            if base and size:
                out.append(ModuleRegion(name, k.canonical(base), size, i < first_init, mod))
        return out
    for layout, core in (("core_layout", True), ("init_layout", False)):
        if k.has_member("module", layout):
            at = mod + k.offsetof("module", layout)
            base = k.u64(at + k.offsetof("module_layout", "base"))
            size = k.u32(at + k.offsetof("module_layout", "size"))
            if base and size:
                out.append(ModuleRegion(name, k.canonical(base), size, core, mod))
    return out


def module_core_text(k: Kernel, mod: int) -> Optional[tuple[int, int, int]]:
    """(base, size, text_size) of the core text of ``mod`` (struct module *).

    ``core_layout`` (struct module_layout: base, size, text_size) up to 6.3;
    ``mem[MOD_TEXT]`` (struct module_memory, MOD_TEXT == 0, all of it text)
    from 6.4, commit ac3b43283923. None when the profile has neither; the
    layer's fault when the module cannot be read.
    """
    if k.has_member("module", "core_layout"):
        at = mod + k.offsetof("module", "core_layout")
        base = _Q.unpack(k.read_exact(at + k.offsetof("module_layout", "base"), 8))[0]
        size = int.from_bytes(k.read_exact(at + k.offsetof("module_layout", "size"), 4), "little")
        text = int.from_bytes(k.read_exact(at + k.offsetof("module_layout", "text_size"), 4), "little")
        return k.canonical(base), size, text
    if k.has_member("module", "mem"):
        at = mod + k.offsetof("module", "mem")
        base = _Q.unpack(k.read_exact(at + k.offsetof("module_memory", "base"), 8))[0]
        size = int.from_bytes(k.read_exact(at + k.offsetof("module_memory", "size"), 4), "little")
        return k.canonical(base), size, size
    return None


# arch/x86/include/asm/pgtable_64_types.h: MODULES_VADDR = __START_KERNEL_map + KERNEL_IMAGE_SIZE
# (1 GiB with KASLR), MODULES_END = 0xffffffffff000000 (4- and 5-level paging alike).
MODULES_VADDR = 0xFFFFFFFFC0000000
MODULES_END = 0xFFFFFFFFFF000000
MODULE_STATES = {0: "LIVE", 1: "COMING", 2: "GOING", 3: "UNFORMED"}  # enum module_state
STRUCT_MODULE_ALIGN = 64  # struct module is ____cacheline_aligned
_NAME_CHARS = frozenset(b"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")

@dataclass
class ModuleFields:
    """The fields of one struct module that the carve reads."""

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

    def __init__(self, r: Kernel) -> None:
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

    def read(self, r: Kernel, addr: int) -> Optional[ModuleFields]:
        buf = r.read(addr, self.span)
        return None if buf is None else self.parse(addr, buf)


def validate_module(r: Kernel, m: ModuleFields) -> bool:
    """Check a struct module candidate: state, name, list pointers, mkobj.mod and kobject name."""
    if not (m.state in MODULE_STATES and m.name_ok and m.mkobj_mod == m.addr
            and (r.is_kernel_pointer(m.list_next) or m.list_next == LIST_POISON1)  # list_del() poisons
            and (r.is_kernel_pointer(m.list_prev) or m.list_prev == LIST_POISON2)):
        return False
    if not r.is_kernel_pointer(m.kobj_name):
        return False
    kname = r.read(m.kobj_name, len(m.name) + 1)
    return kname == m.name.encode("latin-1") + b"\0"


def mapped_runs(r: Kernel, start: int, end: int) -> Iterator[tuple[int, int]]:
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


def carve_modules(r: Kernel, lay: ModuleLayout, view: Walk, fields: dict[int, ModuleFields],
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
                    view.items.add(addr)
                    fields[addr] = m
                if len(view.items) > view.limit:
                    view.stop(f"more than {view.limit} candidates")
                    return



ELF64_SYM = struct.Struct("<IBBHQQ")  # Elf64_Sym: st_name, st_info, st_other, st_shndx, st_value, st_size
MAX_MODULE_SYMBOLS = 1 << 16


def module_address_lookup(k: Kernel, mod: int, addr: int) -> Optional[tuple[str, int]]:
    """(name, offset) of the function of ``mod`` (struct module *) containing ``addr``, from its
    ``mod->kallsyms`` (struct mod_kallsyms: symtab, num_symtab, strtab), as module_address_lookup() does;
    None if the module has no symbol there or its tables are unreadable."""
    if not k.has_member("module", "kallsyms"):
        return None
    ks = k.u64(mod + k.offsetof("module", "kallsyms"))
    if not ks or not k.is_kernel_pointer(ks):
        return None
    symtab = k.u64(ks + k.offsetof("mod_kallsyms", "symtab"))
    count = k.u32(ks + k.offsetof("mod_kallsyms", "num_symtab"))
    strtab = k.u64(ks + k.offsetof("mod_kallsyms", "strtab"))
    if not symtab or not strtab or not count or count > MAX_MODULE_SYMBOLS:
        return None
    raw = k.read(symtab, count * ELF64_SYM.size)
    if raw is None:
        return None
    best: Optional[tuple[int, int]] = None
    for i in range(1, count):
        st_name, info, _other, shndx, value, size = ELF64_SYM.unpack_from(raw, i * ELF64_SYM.size)
        value = k.canonical(value)
        if info & 0xF not in (1, 2) or not shndx or value > addr:  # STT_OBJECT, STT_FUNC; defined
            continue
        if (size and addr < value + size) or (not size and (best is None or value > best[1])):
            if best is None or value >= best[1]:
                best = (st_name, value)
    if best is None:
        return None
    name = k.cstring(strtab + best[0], 128)
    return (name, addr - best[1]) if name else None


def _enum_value(k: Kernel, enum: str, name: str, default: int) -> int:
    value = k.types.enum_value(enum, name)
    return default if value is None else value
