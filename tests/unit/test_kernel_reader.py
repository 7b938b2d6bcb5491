"""The one kernel reader (plugins/linux/kernel.py) on synthetic memory: every walker is
bounded, cycle-detecting, and says why it stopped instead of raising."""

from __future__ import annotations

import importlib
import struct

import pytest
from volatility3.framework import exceptions

K = 0xFFFF888000000000
MASK = (1 << 48) - 1


@pytest.fixture(scope="module")
def kmod():
    from shadowvol.volbridge import use_our_plugins

    use_our_plugins()
    return importlib.import_module("volatility3.plugins.linux.kernel")


class Memory:
    """A volatility3-like layer over a dict of 8-byte words (masked addresses, as the Intel layers take)."""

    address_mask = MASK
    name = "synthetic"

    def __init__(self) -> None:
        self.words: dict[int, int] = {}

    def put(self, addr: int, *values: int) -> None:
        for i, v in enumerate(values):
            self.words[(addr + 8 * i) & MASK] = v & 0xFFFF_FFFF_FFFF_FFFF

    def put_bytes(self, addr: int, data: bytes) -> None:
        data = data + b"\0" * (-len(data) % 8)
        self.put(addr, *struct.unpack(f"<{len(data) // 8}Q", data))

    def read(self, offset: int, length: int, pad: bool = False) -> bytes:
        base = offset & ~7
        out = bytearray()
        for a in range(base, offset + length, 8):
            if a not in self.words:
                if not pad:
                    raise exceptions.InvalidAddressException(self.name, a, "unmapped")
                out += b"\0" * 8
            else:
                out += struct.pack("<Q", self.words[a])
        return bytes(out[offset - base: offset - base + length])


class Types:
    """Profile facts as dicts: symbols (link-time), offsets, sizes, array counts."""

    def __init__(self, symbols=None, offsets=None, sizes=None, counts=None, shift=0) -> None:
        self.symbols, self.offsets = symbols or {}, offsets or {}
        self.sizes, self.counts, self.shift = sizes or {}, counts or {}, shift

    def symbol_offset(self, name):
        return self.symbols.get(name)

    def kaslr_shift(self):
        return self.shift

    def offsetof(self, type_name, *path):
        return sum(self.offsets[(type_name, m)] for m in path)

    def sizeof(self, type_name):
        return self.sizes[type_name]

    def has_member(self, type_name, member):
        return (type_name, member) in self.offsets

    def array_count(self, type_name, member):
        return self.counts[(type_name, member)]

    def enum_value(self, enum, name):
        return None


def kernel(kmod, mem, **types):
    return kmod.Kernel(mem, Types(**types))


def chain(mem, head, nodes, back=True):
    """A circular doubly linked list head -> nodes -> head (next at +0, prev at +8)."""
    ring = [head, *nodes, head]
    for a, b in zip(ring, ring[1:]):
        mem.put(a, b)
        if back:
            mem.put(b + 8, a)


def test_canonical(kmod):
    assert kmod.canonical(0xFFFF_8880_0000_1000 & MASK, MASK) == 0xFFFF_8880_0000_1000
    assert kmod.canonical(0x0000_7FFF_0000_1000, MASK) == 0x0000_7FFF_0000_1000
    la57 = (1 << 57) - 1
    assert kmod.canonical(0xFF11_0000_0000_0000 & la57, la57) == 0xFF11_0000_0000_0000


@pytest.mark.parametrize("case", ["ok", "cycle", "bad", "poison", "unmapped", "bound"])
def test_list_for_each_is_bounded_and_says_why_it_stopped(kmod, case):
    mem = Memory()
    head, nodes = K, [K + 0x100 * i for i in range(1, 6)]
    chain(mem, head, nodes)
    if case == "cycle":
        mem.put(nodes[3], nodes[1])
    elif case == "bad":
        mem.put(nodes[2], 0x1234)
    elif case == "poison":
        mem.put(nodes[2], kmod.LIST_POISON1)
    elif case == "unmapped":
        mem.put(nodes[2], K + 0x9990)
    walk = kmod.Walk("t", limit=3 if case == "bound" else 100)
    got = list(kmod.list_for_each(kernel(kmod, mem), head, walk))
    if case == "ok":
        assert got == nodes and walk.partial == ""
    else:
        assert walk.partial and got == nodes[:len(got)] and len(got) <= 4, (got, walk.partial)
    assert {"cycle": "cycle", "bad": "bad list pointer", "poison": "bad list pointer",
            "unmapped": "unreadable", "bound": "more than 3"}.get(case, "") in walk.partial


def test_list_for_each_entry_and_for_each_process(kmod):
    mem = Memory()
    tasks_off = 0x40
    init_task = 0xFFFFFFFF82000000
    procs = [K + 0x1000 * i for i in range(1, 4)]
    chain(mem, init_task + tasks_off, [p + tasks_off for p in procs])
    k = kernel(kmod, mem, symbols={"init_task": init_task - 0x1000}, shift=0x1000,
               offsets={("task_struct", "tasks"): tasks_off})
    walk = kmod.Walk()
    assert list(kmod.for_each_process(k, walk)) == [init_task, *procs] and not walk.partial


def test_for_each_thread(kmod):
    mem = Memory()
    signal, head_off, node_off = K + 0x8000, 0x10, 0x80
    threads = [K + 0x1000 * i for i in range(1, 3)]
    chain(mem, signal + head_off, [t + node_off for t in threads])
    k = kernel(kmod, mem, offsets={("signal_struct", "thread_head"): head_off, ("task_struct", "thread_node"): node_off})
    assert list(kmod.for_each_thread(k, signal, kmod.Walk())) == threads


def _idr_types():
    return dict(offsets={("idr", "idr_rt"): 0, ("xarray", "xa_head"): 8, ("xa_node", "slots"): 40},
                counts={("xa_node", "slots"): 64})


def test_idr_for_each_walks_nodes_and_survives_a_cycle(kmod):
    mem = Memory()
    node, leaf = K + 0x1000, K + 0x3000
    mem.put(K + 8, node | 2)  # xa_head -> an internal node
    mem.put(node + 40, *([0] * 64))
    mem.put(leaf + 40, *([0] * 64))
    mem.put(node + 40, K + 0x5000)  # slot 0: an entry
    mem.put(node + 48, leaf | 2)  # slot 1: a child node
    mem.put(leaf + 40 + 8 * 5, K + 0x6000)
    k = kernel(kmod, mem, **_idr_types())
    walk = kmod.Walk()
    assert list(kmod.idr_for_each(k, K, walk)) == [K + 0x5000, K + 0x6000] and not walk.partial
    mem.put(leaf + 40, node | 2)  # a slot pointing back at an ancestor
    walk = kmod.Walk()
    assert sorted(kmod.idr_for_each(k, K, walk)) == [K + 0x5000, K + 0x6000]
    assert "cycle" in walk.partial


def test_idr_for_each_unreadable_head(kmod):
    walk = kmod.Walk()
    assert list(kmod.idr_for_each(kernel(kmod, Memory(), **_idr_types()), K, walk)) == []
    assert "idr head" in walk.partial


def test_rb_for_each_survives_a_cycle(kmod):
    mem = Memory()
    a, b, c = K + 0x100, K + 0x200, K + 0x300
    mem.put(a, 0, c, b)  # parent_color, rb_right, rb_left
    mem.put(b, a, 0, 0)
    mem.put(c, a, a, 0)  # right child points back at the root
    k = kernel(kmod, mem, offsets={("rb_node", "rb_right"): 8, ("rb_node", "rb_left"): 16})
    walk = kmod.Walk()
    assert list(kmod.rb_for_each(k, a, walk)) == [a, b, c]
    assert "bad rb_node" in walk.partial


def test_per_cpu_ptr(kmod):
    mem = Memory()
    table = 0xFFFFFFFF82100000
    mem.put(table, K + 0x10_0000, K + 0x20_0000)
    k = kernel(kmod, mem, symbols={"__per_cpu_offset": table - 0x4000, "runqueues": 0x2C000}, shift=0x4000)
    assert kmod.per_cpu_ptr(k, "runqueues", 1) == K + 0x20_0000 + 0x2C000  # the per-CPU offset is not shifted
    assert kmod.per_cpu_ptr(k, "runqueues", 7) is None  # unreadable slot
    assert kmod.per_cpu_ptr(k, "no_such", 0) is None


def _module_types(modules_sym):
    return dict(symbols={"modules": modules_sym},
                offsets={("module", "list"): 8, ("module", "name"): 24, ("module", "core_layout"): 0x100,
                         ("module", "init_layout"): 0x140, ("module_layout", "base"): 0, ("module_layout", "size"): 8},
                counts={("module", "name"): 56})


def test_for_each_module_names_and_regions(kmod):
    mem = Memory()
    head = 0xFFFFFFFF82200000
    mods = [0xFFFFFFFFC0001000, 0xFFFFFFFFC0101000]
    chain(mem, head, [m + 8 for m in mods])
    for i, m in enumerate(mods):
        mem.put_bytes(m + 24, f"mod{i}".encode().ljust(56, b"\0"))
        mem.put(m + 0x100, m - 0x1000, 0x3000)  # core_layout.base, .size (u32 read of the low half)
        mem.put(m + 0x140, 0, 0)  # init memory freed
    k = kernel(kmod, mem, **_module_types(head))
    walk = kmod.Walk()
    got = list(kmod.for_each_module(k, walk))
    assert got == mods and not walk.partial
    assert [kmod.module_name(k, m) for m in got] == ["mod0", "mod1"]
    regions = kmod.module_regions(k, mods[1], "mod1")
    assert regions == [kmod.ModuleRegion("mod1", mods[1] - 0x1000, 0x3000, True, mods[1])]
    assert mods[1] + 0x10 in regions[0] and mods[1] + 0x2000 not in regions[0]


def test_for_each_module_without_the_symbol_is_partial(kmod):
    walk = kmod.Walk()
    assert list(kmod.for_each_module(kernel(kmod, Memory(), symbols={}), walk)) == []
    assert walk.partial


def test_read_policies(kmod):
    mem = Memory()
    mem.put(K, 0x1122334455667788)
    k = kernel(kmod, mem)
    assert k.u64(K) == 0x1122334455667788 and k.u32(K + 4) == 0x11223344
    assert k.read(K + 8, 8) is None and k.u64(K + 8) is None
    assert k.read(K, 16, pad=True) == struct.pack("<QQ", 0x1122334455667788, 0)
    with pytest.raises(exceptions.InvalidAddressException) as err:
        k.read_exact(K, 16)
    assert err.value.invalid_address == (K + 8) & MASK and err.value.layer_name == "synthetic"
    assert k.is_kernel_pointer(K) and not k.is_kernel_pointer(0x7FFF_0000_0000)
    assert not k.is_kernel_pointer(kmod.LIST_POISON2)


# -- tracing_hooks: kprobe_table and ftrace_ops_list on synthetic memory ----------


@pytest.fixture(scope="module")
def thooks(kmod):
    return importlib.import_module("volatility3.plugins.linux.tracing_hooks")


KPROBE = {("kprobe", "hlist"): 0, ("kprobe", "list"): 16, ("kprobe", "addr"): 40, ("kprobe", "symbol_name"): 48,
          ("kprobe", "offset"): 56, ("kprobe", "pre_handler"): 64, ("kprobe", "post_handler"): 72,
          ("kprobe", "flags"): 88, ("kretprobe", "kp"): 0, ("kretprobe", "handler"): 96,
          ("kretprobe", "entry_handler"): 104}


def put_kprobe(mem, p, addr, pre, post=0, nxt=0, name=0):
    mem.put(p, nxt, 0, 0, 0, 0, addr, name, 0, pre, post, 0, 8, 0, 0)


def test_for_each_kprobe_plain_aggregated_and_kretprobe(kmod, thooks):
    mem = Memory()
    table, aggr, rp_pre = 0xFFFFFFFF83000000, 0xFFFFFFFF81000100, 0xFFFFFFFF81000200
    mem.put(table, *([0] * 64))
    a, b, c, d = (K + 0x1000 * i for i in range(1, 5))
    mem.put(table + 8 * 3, a)
    put_kprobe(mem, a, 0xFFFFFFFF81100000, 0xFFFFFFFFC0001000, nxt=b, name=K + 0x9000)
    mem.put_bytes(K + 0x9000, b"__x64_sys_getppid\0")
    put_kprobe(mem, b, 0xFFFFFFFF81200000, aggr)
    put_kprobe(mem, c, 0xFFFFFFFF81200000, 0xFFFFFFFFC0002000)
    put_kprobe(mem, d, 0xFFFFFFFF81200000, rp_pre)
    chain(mem, b + 16, [c + 16, d + 16])
    mem.put(d + 96, 0xFFFFFFFFC0003000, 0)  # kretprobe handler, no entry_handler
    k = kernel(kmod, mem, symbols={"kprobe_table": table, "aggr_pre_handler": aggr, "pre_handler_kretprobe": rp_pre},
               offsets=KPROBE)
    walk = kmod.Walk()
    got = list(thooks.for_each_kprobe(k, walk))
    assert not walk.partial
    assert [(p.struct, p.kind, p.symbol, p.handlers) for p in got] == [
        (a, "kprobe", "__x64_sys_getppid", (("pre_handler", 0xFFFFFFFFC0001000),)),
        (c, "kprobe", "", (("pre_handler", 0xFFFFFFFFC0002000),)),
        (d, "kretprobe", "", (("handler", 0xFFFFFFFFC0003000),)),
    ]
    mem.put(b, a)  # a cycle in the bucket's hlist
    walk = kmod.Walk()
    assert len(list(thooks.for_each_kprobe(k, walk))) <= 4 and "cycle" in walk.partial


FTRACE = {("ftrace_ops", "func"): 0, ("ftrace_ops", "next"): 8, ("ftrace_ops", "flags"): 16,
          ("ftrace_ops", "func_hash"): 24, ("ftrace_ops", "trampoline"): 32, ("ftrace_ops", "trampoline_size"): 40,
          ("ftrace_ops_hash", "filter_hash"): 8, ("ftrace_hash", "size_bits"): 0, ("ftrace_hash", "buckets"): 8,
          ("ftrace_func_entry", "hlist"): 0, ("ftrace_func_entry", "ip"): 16}


def test_for_each_ftrace_ops_with_filter_hash(kmod, thooks):
    mem = Memory()
    head, end = 0xFFFFFFFF83100000, 0xFFFFFFFF83100100
    o1, o2, fh, hsh, buckets, e1, e2 = (K + 0x1000 * i for i in range(1, 8))
    mem.put(head, o1)
    mem.put(o1, 0xFFFFFFFFC0001000, o2, 1 | 1 << 12, fh, 0xFFFFFFFFC0010000, 0x100)
    mem.put(o2, 0xFFFFFFFF81000300, end, 1, 0, 0, 0)
    mem.put(fh, 0, hsh)
    mem.put(hsh, 1, buckets)  # two buckets
    mem.put(buckets, e1, 0)
    mem.put(e1, e2, 0, 0xFFFFFFFF81100000)
    mem.put(e2, 0, 0, 0xFFFFFFFF81000000)
    k = kernel(kmod, mem, symbols={"ftrace_ops_list": head, "ftrace_list_end": end}, offsets=FTRACE)
    walk = kmod.Walk()
    ops = list(thooks.for_each_ftrace_ops(k, walk))
    assert not walk.partial
    assert [(x.struct, x.func, x.ips, x.all_functions, x.trampoline) for x in ops] == [
        (o1, 0xFFFFFFFFC0001000, (0xFFFFFFFF81000000, 0xFFFFFFFF81100000), False, 0xFFFFFFFFC0010000),
        (o2, 0xFFFFFFFF81000300, (), True, 0)]
    assert thooks.ftrace_flag_names(ops[0].flags) == "ENABLED,IPMODIFY"
    mem.put(o2 + 8, o1)  # a cycle instead of ftrace_list_end
    walk = kmod.Walk()
    assert len(list(thooks.for_each_ftrace_ops(k, walk))) == 2 and "cycle" in walk.partial


def test_module_address_lookup(kmod):
    mem = Memory()
    mod, ks, symtab, strtab = K + 0x1000, K + 0x2000, K + 0x3000, K + 0x4000
    text = 0xFFFFFFFFC0001000
    mem.put(mod + 0x200, ks)
    mem.put(ks, symtab, 3, strtab)  # symtab, num_symtab (u32), strtab
    sym = struct.Struct("<IBBHQQ")
    mem.put_bytes(symtab, sym.pack(0, 0, 0, 0, 0, 0) + sym.pack(1, 0x12, 0, 1, text, 0x40)
                  + sym.pack(8, 0x12, 0, 1, text + 0x40, 0x20))
    mem.put_bytes(strtab, b"\0rk_pre\0rk_getppid\0")
    k = kernel(kmod, mem, offsets={("module", "kallsyms"): 0x200, ("mod_kallsyms", "symtab"): 0,
                                   ("mod_kallsyms", "num_symtab"): 8, ("mod_kallsyms", "strtab"): 16})
    assert kmod.module_address_lookup(k, mod, text) == ("rk_pre", 0)
    assert kmod.module_address_lookup(k, mod, text + 0x44) == ("rk_getppid", 4)
    assert kmod.module_address_lookup(k, mod, text + 0x100) is None


# -- the same walkers on a Target (shadowvol.kernel_reader), as trace and integrity use them ------

VBASE = 0xFFFFFFFF81000000  # link-time; the kernel runs at VBASE + TSHIFT
TSHIFT = 0x2000000
PAGES = 16
DATA = 0x40000  # physical address of the mapped pages


def _mapped_target(isf):
    """A real Target on synthetic physical memory: 4-level tables mapping PAGES pages at VBASE + TSHIFT."""
    import mmap
    from pathlib import Path

    from shadowvol.backends.base import BufferMemory, Segment
    from shadowvol.kaslr import KernelLocation
    from shadowvol.target import Target

    mm = mmap.mmap(-1, 1 << 20)
    va = VBASE + TSHIFT
    pml4, pdpt, pd, pt = 0x1000, 0x2000, 0x3000, 0x4000
    for table, index, nxt in ((pml4, va >> 39, pdpt), (pdpt, va >> 30, pd), (pd, va >> 21, pt)):
        at = table + 8 * (index & 0x1FF)
        mm[at:at + 8] = struct.pack("<Q", nxt | 3)
    for i in range(PAGES):
        at = pt + 8 * (((va >> 12) + i) & 0x1FF)
        mm[at:at + 8] = struct.pack("<Q", (DATA + 0x1000 * i) | 3)
    mem = BufferMemory(mm, [Segment(0, 1 << 20, 0)], name="synthetic")
    loc = KernelLocation(dtb=pml4, virt_shift=TSHIFT, phys_base=0, la57=False, source="test")
    target = Target(mem, loc, isf, Path("synthetic.json"), "synthetic")
    return target, mm


def _put(mm, vaddr, data):
    off = DATA + vaddr - (VBASE + TSHIFT)
    mm[off:off + len(data)] = data


def _isf_mem():
    """6.4+: struct module has mem[MOD_MEM_NUM_TYPES] (struct module_memory) instead of core_layout."""
    isf = _isf()
    field = lambda off, kind="base", **kw: {"offset": off, "type": {"kind": kind, **kw}}  # noqa: E731
    types = isf["user_types"]
    del types["module"]["fields"]["core_layout"], types["module_layout"]
    types["module_memory"] = {"size": 0x20, "fields": {"base": field(0, "pointer"), "size": field(8)}}
    types["module"]["fields"]["mem"] = field(0x100, "array", count=7,
                                             subtype={"kind": "struct", "name": "module_memory"})
    return isf


def _isf():
    field = lambda off, kind="base", **kw: {"offset": off, "type": {"kind": kind, **kw}}  # noqa: E731
    return {
        "symbols": {"modules": {"address": VBASE}},
        "user_types": {
            "list_head": {"size": 16, "fields": {"next": field(0, "pointer"), "prev": field(8, "pointer")}},
            "module_layout": {"size": 16, "fields": {"base": field(0, "pointer"), "size": field(8),
                                                     "text_size": field(12)}},
            "module": {"size": 0x200, "fields": {
                "list": field(8, "struct", name="list_head"),
                "name": field(24, "array", count=56, subtype={"kind": "base", "name": "char"}),
                "core_layout": field(0x100, "struct", name="module_layout")}},
        },
        "enums": {"mod_mem_type": {"size": 4, "base": "int", "constants": {"MOD_TEXT": 0, "MOD_INIT_TEXT": 3}}},
    }


def _modules(mm, names):
    """The modules list at ``modules`` (VBASE + TSHIFT): one struct module per page after it."""
    head = VBASE + TSHIFT
    mods = [head + 0x1000 * (i + 1) for i in range(len(names))]
    ring = [head, *[m + 8 for m in mods], head]
    for a, b in zip(ring, ring[1:]):
        _put(mm, a, struct.pack("<Q", b))
        _put(mm, b + 8, struct.pack("<Q", a))
    for i, (m, name) in enumerate(zip(mods, names)):
        _put(mm, m + 24, name.encode() + b"\0")
        _put(mm, m + 0x100, struct.pack("<QII", 0xFFFFFFFFC0000000 + 0x10000 * i, 0x3000, 0x2000))
    return head, mods


def test_target_symbol_api_walks_nested_members_arrays_and_enums():
    target, _mm = _mapped_target(_isf())
    assert target.offsetof("module", "core_layout", "text_size") == 0x100 + 12
    assert target.offsetof("module", "list", "prev") == 16
    assert target.member_count("module", "name") == 56
    assert target.enum_value("mod_mem_type", "MOD_INIT_TEXT") == 3
    assert target.enum_value("mod_mem_type", "NOPE") is None and target.enum_value("nope", "X") is None
    from shadowvol.errors import ProfileError

    with pytest.raises(ProfileError):
        target.offsetof("module", "name", "x")  # an array, not a struct
    with pytest.raises(ProfileError):
        target.member_count("module", "list")


@pytest.mark.parametrize("layout", ["core_layout", "mem"])
def test_integrity_lists_modules_through_the_one_reader(layout):
    from shadowvol.integrity import list_modules

    target, mm = _mapped_target(_isf() if layout == "core_layout" else _isf_mem())
    _head, mods = _modules(mm, ["alpha", "shadow_stub"])
    got = list_modules(target)
    text = 0x2000 if layout == "core_layout" else 0x3000  # mem[MOD_TEXT] is all text
    assert [(m.address, m.name, m.core_base, m.core_size, m.text_size) for m in got] == [
        (mods[0], "alpha", 0xFFFFFFFFC0000000, 0x3000, text),
        (mods[1], "shadow_stub", 0xFFFFFFFFC0010000, 0x3000, text)]


@pytest.mark.parametrize("damage", ["cycle", "hole", "user"])
def test_integrity_refuses_a_modules_list_it_cannot_walk_to_the_end(damage):
    from shadowvol.errors import ShadowvolError
    from shadowvol.integrity import list_modules

    target, mm = _mapped_target(_isf())
    _head, mods = _modules(mm, ["a", "b", "c"])
    bad = {"cycle": mods[0] + 8, "hole": VBASE + TSHIFT + 0x1000 * PAGES + 8, "user": 0x400000}[damage]
    _put(mm, mods[1] + 8, struct.pack("<Q", bad))
    with pytest.raises(ShadowvolError, match="cannot be walked"):
        list_modules(target)


def test_target_reader_faults_carry_layer_and_address():
    from shadowvol.errors import InvalidAddressError
    from shadowvol.kernel_reader import kernel_of

    target, mm = _mapped_target(_isf())
    k = kernel_of(target)
    _put(mm, VBASE + TSHIFT + 0x40, struct.pack("<Q", 0x1122334455667788))
    assert k.symbol("modules") == VBASE + TSHIFT and k.u64(VBASE + TSHIFT + 0x40) == 0x1122334455667788
    hole = VBASE + TSHIFT + 0x1000 * PAGES
    assert k.u64(hole) is None and k.read(hole - 4, 8, pad=True)[4:] == b"\0" * 4
    with pytest.raises(InvalidAddressError) as exc:
        k.read_exact(hole, 8)
    assert exc.value.address == hole and exc.value.layer == "kernel"
