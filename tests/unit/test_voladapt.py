"""voladapt.adapt_volatility3: each replacement behaves as the stock method it replaces.

The adaptations speed up volatility3's object model for stock plugins (issue
12); they must not change any result. Each is compared here with the stock
implementation (kept by the adaptation as ``__wrapped__`` or rebuilt from
volatility3's source), on synthetic objects and maps; the live fidelity test
compares every stock plugin's rows with stock ``vol`` in a separate process.
"""

from __future__ import annotations

import collections
import dataclasses
import random

from hypothesis import given, settings, strategies as st
from volatility3.framework import contexts, objects
from volatility3.framework.interfaces import objects as iobjects
from volatility3.framework.objects import templates

from shadowvol import voladapt, volbridge

keys = st.sampled_from(["a", "b", "c", "size", "offset", "type_name", "layer_name", "x"])
maps = st.lists(st.dictionaries(keys, st.integers()), min_size=1, max_size=4)


@settings(max_examples=300, deadline=None)
@given(maps, keys, st.integers())
def test_volchainmap_is_chainmap(ms, key, default):
    stock, ours = collections.ChainMap(*ms), voladapt.VolChainMap(*ms)
    assert (key in ours) == (key in stock)
    assert ours.get(key, default) == stock.get(key, default)
    assert list(ours) == list(stock) and dict(ours) == dict(stock)
    if key in stock:
        assert ours[key] == stock[key]
    child = ours.new_child({"a": 1})
    assert isinstance(child, voladapt.VolChainMap) and child["a"] == 1


def test_object_information_contains_matches_dataclass_fields():
    voladapt.adapt_volatility3()
    info = iobjects.ObjectInformation(layer_name="l", offset=0, native_layer_name="n")
    fields = {f.name for f in dataclasses.fields(info)}
    for key in list(fields) + ["nope", "", "__dict__", "vol"]:
        assert (key in info) == (key in fields)

    @dataclasses.dataclass
    class Extended(iobjects.ObjectInformation):
        extra: int = 0

    assert "extra" in Extended(layer_name="l", offset=0, native_layer_name="n")


def test_read_only_mapping_getattr():
    voladapt.adapt_volatility3()
    m = iobjects.ReadOnlyMapping(voladapt.VolChainMap({}, {"a": 1}, {"a": 2, "b": None}))
    assert m.a == 1 and m.b is None
    try:
        m.c
    except AttributeError as exc:
        assert "ReadOnlyMapping.c" in str(exc)
    else:
        raise AssertionError("missing key must raise AttributeError")


def _stock_template_call(template, context, object_info):
    """volatility3 2.28's ObjectTemplate.__call__, as written there."""
    arguments = {}
    for arg in template.vol:
        if arg != "object_class":
            arguments[arg] = template.vol[arg]
    return template.vol.object_class(context=context, object_info=object_info, **arguments)


VOL_KEYS = ("type_name", "offset", "layer_name", "native_layer_name", "member_name", "size")


def _vol(obj) -> dict:
    """An object's vol as a dict (a vol holding an ObjectInformation cannot be iterated)."""
    return {k: getattr(obj.vol, k, None) for k in VOL_KEYS}


def _context_with_bytes(data: bytes):
    from volatility3.framework.layers.physical import BufferDataLayer

    ctx = contexts.Context()
    ctx.layers.add_layer(BufferDataLayer(ctx, "cfg", "mem", data))
    return ctx


def test_template_call_and_size_match_stock():
    voladapt.adapt_volatility3()
    ctx = _context_with_bytes(bytes(range(64)))
    info = iobjects.ObjectInformation(layer_name="mem", offset=8, native_layer_name="mem")
    int_t = templates.ObjectTemplate(objects.Integer, "u32", data_format=objects.DataFormatInfo(4, "little", False))
    arr_t = templates.ObjectTemplate(objects.Array, "arr", count=3, subtype=int_t)
    for t in (int_t, arr_t):
        ours, stock = t(ctx, info), _stock_template_call(t, ctx, info)
        assert type(ours) is type(stock) and _vol(ours) == _vol(stock)
        assert t.size == t.vol.object_class.VolTemplateProxy.size(t)
    assert int(int_t(ctx, info)) == int.from_bytes(bytes(range(8, 12)), "little")
    assert [int(x) for x in arr_t(ctx, info)] == [int.from_bytes(bytes(range(i, i + 4)), "little")
                                                  for i in (8, 12, 16)]


def test_struct_member_access_matches_stock():
    """AggregateType.__getattr__ adapted vs the stock method it wraps, member by member."""
    voladapt.adapt_volatility3()
    ctx = _context_with_bytes(bytes(range(64)))
    u16 = templates.ObjectTemplate(objects.Integer, "u16", data_format=objects.DataFormatInfo(2, "little", False))
    struct_t = templates.ObjectTemplate(objects.StructType, "s", size=8,
                                        members={"lo": (0, u16), "hi": (6, u16)})
    info = iobjects.ObjectInformation(layer_name="mem", offset=16, native_layer_name="mem")
    ours, plain = struct_t(ctx, info), struct_t(ctx, info)
    stock = objects.AggregateType.__getattr__.__wrapped__
    for name in ("lo", "hi"):
        a, b = getattr(ours, name), stock(plain, name)
        assert int(a) == int(b) and _vol(a) == _vol(b) and a.vol.parent is ours
    for bad in ("nope", "_x__y"):
        for obj, get in ((ours, getattr), (plain, stock)):
            try:
                get(obj, bad)
            except AttributeError as exc:
                assert "has no attribute" in str(exc)
            else:
                raise AssertionError(bad)


def test_boottime_read_once_per_epoch_and_copied():
    from types import SimpleNamespace

    from volatility3.framework.symbols.linux.extensions import Timespec64Concrete

    calls = []

    def stock(self):
        calls.append(1)
        return Timespec64Concrete(100, 5)

    wrapped = voladapt._epoch_cached_boottime(stock)

    def task(ctx):
        return SimpleNamespace(_context=ctx, vol=SimpleNamespace(layer_name="kernel_layer"),
                               get_symbol_table_name=lambda: "symbol_table_name1")

    live = SimpleNamespace(epoch_cache={})
    first, second = wrapped(task(live)), wrapped(task(live))
    assert len(calls) == 1 and (first.tv_sec, first.tv_nsec) == (second.tv_sec, second.tv_nsec) == (100, 5)
    assert first is not second  # callers get copies
    wrapped(task(SimpleNamespace(epoch_cache={})))  # a new epoch reads again
    assert len(calls) == 2
    stock_ctx = SimpleNamespace()  # not a LiveContext (stock vol): stock behaviour, every time
    wrapped(task(stock_ctx)), wrapped(task(stock_ctx))
    assert len(calls) == 4


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(["layer_name", "offset", "native_layer_name", "member_name", "parent", "size",
                        "type_name", "subtype", "x"]),
       st.dictionaries(st.sampled_from(["offset", "size", "subtype", "x"]), st.integers(), max_size=3))
def test_volchainmap_with_object_information_is_chainmap(key, kwargs):
    """An object's vol: ``{}, vol_info, ObjectInformation, kwargs`` as volatility3 builds it."""
    voladapt.adapt_volatility3()
    info = iobjects.ObjectInformation(layer_name="l", offset=16, native_layer_name="n", size=None)
    ms = ({}, {"type_name": "t", "offset": 16}, info, kwargs)
    stock, ours = collections.ChainMap(*ms), voladapt.VolChainMap(*ms)
    assert (key in ours) == (key in stock)
    assert ours.get(key, "d") == stock.get(key, "d")
    if key in stock:
        assert ours[key] == stock[key]
    else:
        for m in (ours, stock):
            try:
                m[key]
            except KeyError:
                pass
            else:
                raise AssertionError(key)


def _live_layer(ram: bytes = bytes(0x4000)):
    """Our kernel layer (4-level, CR3 0x1000) over ``ram``, as build_context makes it."""
    from shadowvol.backends.base import BufferMemory, Segment
    from shadowvol.paging import FOUR_LEVEL, PagedMemory, TranslationCache

    mem = BufferMemory(ram, [Segment(0, len(ram), 0)])
    paged = PagedMemory(mem, 0x1000, FOUR_LEVEL, TranslationCache(mem))
    ctx = volbridge.LiveContext()
    ctx.layers.add_layer(volbridge.LivePhysicalLayer(ctx, "p", volbridge.PHYSICAL_LAYER, mem,
                                                     cache=paged.cache))
    ctx.config["k.memory_layer"] = volbridge.PHYSICAL_LAYER
    ctx.config["k.page_map_offset"] = 0x1000
    ctx.config["k.kernel_virtual_offset"] = 0
    return volbridge.LiveLinuxIntel32e(ctx, "k", volbridge.KERNEL_LAYER, metadata={"os": "Linux"},
                                       paged=paged)


@settings(max_examples=500, deadline=None)
@given(st.one_of(st.integers(0, (1 << 64) - 1), st.integers(0, (1 << 49) - 1),
                 st.sampled_from([0, (1 << 47) - 1, 1 << 47, (1 << 48) - 1, 1 << 48, 0xffff800000000000,
                                  0xffffffff81000000, (1 << 64) - 1])))
def test_live_layer_canonicalize_is_intel(addr):
    from volatility3.framework.layers import intel

    layer = _live_layer()
    assert layer.canonicalize(addr) == intel.Intel.canonicalize(layer, addr)


def _layer_with_holes():
    """Our kernel layer over synthetic tables: the same page table serves the lower half
    (PML4 slot 0) and the top 512 GiB (slot 511); of its 16 pages, 0-7 are in RAM,
    8-11 point past the end of RAM, the rest are not present."""
    ram = bytearray(random.Random(7).randbytes(0xD000))  # page tables in pages 1-4, data in 5-12
    ram[0x1000:0x5000] = bytes(0x4000)
    for table, index, entry in ((0x1000, 0, 0x2003), (0x1000, 511, 0x2003), (0x2000, 0, 0x3003),
                                (0x3000, 0, 0x4003)):
        ram[table + 8 * index:table + 8 * index + 8] = entry.to_bytes(8, "little")
    for i in range(12):
        frame = 0x5000 + i * 0x1000 if i < 8 else 0x20000 + i * 0x1000
        ram[0x4000 + 8 * i:0x4000 + 8 * i + 8] = (frame | 3).to_bytes(8, "little")
    return _live_layer(bytes(ram))


@settings(max_examples=400, deadline=None)
@given(st.sampled_from([0, 0xffffff8000000000, 0xffffff8000000000 & ((1 << 48) - 1), 1 << 47]),
       st.integers(-0x100, 0x11000), st.integers(-2, 0x6000), st.booleans())
def test_live_layer_is_valid_and_read_are_intel(base, delta, length, warm):
    """Our page-by-page is_valid and read (through the TLB) answer as Intel's, over mapping()."""
    from volatility3.framework import exceptions
    from volatility3.framework.interfaces.layers import TranslationLayerInterface
    from volatility3.framework.layers import intel

    layer = _layer_with_holes()
    offset = max(0, base + delta)
    if warm:  # some translations already in the TLB
        layer.is_valid(base + 0x3000, 0x2000)
    assert layer.is_valid(offset, length) == intel.Intel.is_valid(layer, offset, length)
    if length < 1:  # (a zero-length read of a page outside RAM: b"" here, an error in Intel's)
        return
    outcomes = []
    for read in (layer.read, lambda o, n: TranslationLayerInterface.read(layer, o, n)):
        try:
            outcomes.append(read(offset, length))
        except exceptions.InvalidAddressException as exc:
            outcomes.append((exc.layer_name, hex(exc.invalid_address)))
    assert outcomes[0] == outcomes[1]


ops = st.lists(st.tuples(st.sampled_from(["set", "del", "pop", "update", "child", "parents", "copy"]),
                         keys, st.integers()), max_size=12)


def _write_both(stock, ours, op: str, key, value) -> bool:
    """Apply one of ChainMap's writes (set, del, pop, update, clear, ior) to both
    maps, checking they answer alike; False for an op that is none of them."""
    if op == "set":
        stock[key] = ours[key] = value
    elif op in ("del", "pop"):
        outcomes = []
        for m in (stock, ours):
            try:
                outcomes.append(m.pop(key) if op == "pop" else m.__delitem__(key))
            except KeyError:
                outcomes.append(KeyError)
        assert outcomes[0] == outcomes[1]
    elif op == "update":
        stock.update({key: value})
        ours.update({key: value})
    elif op == "clear":
        stock.clear()
        ours.clear()
    elif op == "ior":
        stock |= {key: value}
        ours |= {key: value}
    else:
        return False
    return True


@settings(max_examples=400, deadline=None)
@given(maps, ops, keys)
def test_volchainmap_flat_view_follows_writes(ms, script, probe):
    """The flattened lookup of a sealed map stays equal to stock ChainMap under every
    write ChainMap offers, and maps derived from it (sharing its dicts) too."""
    stock = collections.ChainMap(*[dict(m) for m in ms])
    ours = voladapt.VolChainMap(*[dict(m) for m in ms])
    for op, key, value in script:
        assert ours.get(probe) == stock.get(probe)  # flattens early, then writes follow
        if not _write_both(stock, ours, op, key, value):
            stock = getattr(stock, "new_child")() if op == "child" else \
                (stock.parents if op == "parents" else stock.copy())
            ours = getattr(ours, "new_child")() if op == "child" else \
                (ours.parents if op == "parents" else ours.copy())
            assert isinstance(ours, voladapt.VolChainMap)
        assert list(ours) == list(stock) and dict(ours) == dict(stock)
        assert (probe in ours) == (probe in stock) and ours.get(probe) == stock.get(probe)
    if ours.flat() is not None:
        assert list(ours.flat()) == list(stock) and ours.flat() == dict(stock)


def test_volchainmap_derived_maps_see_later_writes_to_shared_dicts():
    """new_child shares the parent's first dict: a write there must show through."""
    parent = voladapt.VolChainMap({}, {"a": 1})
    child = parent.new_child()
    assert child["a"] == 1
    parent["a"] = 2
    assert child["a"] == 2 and parent["a"] == 2


# -- object construction without the constructor chain (makers), sizes, pointers ------------

def _stock_volatility3(mp) -> None:
    """Undo every adaptation that builds objects, for the rest of ``mp``'s context."""
    mp.setattr(iobjects.ObjectInterface, "__init__", iobjects.ObjectInterface.__init__.__wrapped__)
    mp.setattr(templates.ObjectTemplate, "__call__", lambda self, context, object_info: _stock_template_call(
        self, context, object_info))
    mp.setattr(objects.AggregateType, "__getattr__", objects.AggregateType.__getattr__.__wrapped__)
    mp.setattr(objects.Pointer, "dereference", objects.Pointer.dereference.__wrapped__)


def _state(obj) -> tuple:
    """Everything an object holds: its class, value, attributes in order, and its vol's maps."""
    attrs = {k: v for k, v in vars(obj).items() if k != "_vol"}
    maps = obj._vol.maps
    return (type(obj), obj if isinstance(obj, int) else None, list(attrs), attrs,
            [dict(m) if isinstance(m, dict) else m for m in maps])


def _templates():
    from volatility3.framework.symbols.linux import extensions as ext

    u16 = templates.ObjectTemplate(objects.Integer, "u16", data_format=objects.DataFormatInfo(2, "little", False))
    s32 = templates.ObjectTemplate(objects.Integer, "int", data_format=objects.DataFormatInfo(4, "little", True))
    flag = templates.ObjectTemplate(objects.Boolean, "bool", data_format=objects.DataFormatInfo(1, "little", False))
    ch = templates.ObjectTemplate(objects.Char, "char", data_format=objects.DataFormatInfo(1, "little", True))
    ptr = templates.ObjectTemplate(objects.Pointer, "pointer", subtype=u16,
                                   data_format=objects.DataFormatInfo(8, "little", False))
    members = {"lo": (0, u16), "n": (4, s32), "p": (8, ptr), "c": (16, ch), "f": (17, flag)}
    struct = templates.ObjectTemplate(objects.StructType, "s", size=24, members=members)
    union = templates.ObjectTemplate(objects.UnionType, "u", size=8, members={"a": (0, u16), "b": (0, s32)})
    task = templates.ObjectTemplate(ext.task_struct, "task_struct", size=24, members=members)
    lst = templates.ObjectTemplate(ext.list_head, "list_head", size=16, members={"next": (0, ptr), "prev": (8, ptr)})
    arr = templates.ObjectTemplate(objects.Array, "arr", count=3, subtype=u16)
    return [u16, s32, flag, ch, ptr, struct, union, task, lst, arr]


@settings(max_examples=60, deadline=None)
@given(st.binary(min_size=96, max_size=96), st.integers(0, 40), st.sampled_from([None, "m"]))
def test_made_objects_are_stock_objects(data, offset, member_name):
    """Every template's object, built by our makers, holds exactly what the stock constructors
    put in it (class, value, attributes and their order, the vol's maps), and reads the same."""
    import pytest

    voladapt.adapt_volatility3()
    with pytest.MonkeyPatch.context() as mp:
        ctx = _context_with_bytes(data)
        info = lambda: iobjects.ObjectInformation(layer_name="mem", offset=offset, member_name=member_name,  # noqa: E731
                                                  native_layer_name="mem", size=None)
        ts = _templates()
        ours = [t(ctx, info()) for t in ts]
        _stock_volatility3(mp)
        stock = [t(ctx, info()) for t in ts]
    for a, b in zip(ours, stock):
        if not isinstance(a, objects.Array):  # built by _new_vol: merged at birth, as _flatten merges
            assert a._vol._flat is not None
            assert list(a._vol._flat.items()) == list(voladapt.VolChainMap(*a._vol.maps)._flatten().items())
        sa, sb = _state(a), _state(b)
        assert sa[:4] == sb[:4]
        assert [type(m) for m in sa[4]] == [type(m) for m in sb[4]]
        assert [list(m) for m in sa[4] if isinstance(m, dict)] == [list(m) for m in sb[4] if isinstance(m, dict)]
        assert [m if isinstance(m, dict) else vars(m) for m in sa[4]] == \
               [m if isinstance(m, dict) else vars(m) for m in sb[4]]
        for key in VOL_KEYS + ("data_format", "subtype", "members", "count", "nope"):
            assert (key in a._vol) == (key in b._vol) and a._vol.get(key) == b._vol.get(key)
    struct, stock_struct = ours[5], stock[5]
    for name in ("lo", "n", "p", "c", "f"):
        assert int(getattr(struct, name)) == int(getattr(stock_struct, name))
    assert struct.p.vol.subtype is stock_struct.p.vol.subtype


def _same_state(a, b, parents) -> None:
    """``a`` and ``b`` hold the same (see _state); a parent in their ObjectInformation
    is the one ``parents`` pairs with it."""
    sa, sb = _state(a), _state(b)
    assert sa[:3] == sb[:3]
    assert {k: v for k, v in sa[3].items() if k != "_cache"} == {k: v for k, v in sb[3].items() if k != "_cache"}
    assert [type(m) for m in sa[4]] == [type(m) for m in sb[4]]
    for ma, mb in zip(sa[4], sb[4]):
        va, vb = (dict(ma), dict(mb)) if isinstance(ma, dict) else (dict(vars(ma)), dict(vars(mb)))
        assert list(va) == list(vb)
        pa, pb = va.pop("parent", None), vb.pop("parent", None)
        assert parents.get(id(pa), pa) is pb
        assert va == vb


@settings(max_examples=40, deadline=None)
@given(st.binary(min_size=96, max_size=96), st.integers(0, 40), st.booleans())
def test_members_and_dereferences_are_stock_objects(data, offset, write_first):
    """A struct's members and a pointer's target, built by makers through their
    plans (and their maps built only when asked for, after a write or not), hold
    exactly what stock volatility3 builds."""
    import pytest

    voladapt.adapt_volatility3()
    data = data[:offset + 8] + (60).to_bytes(8, "little") + data[offset + 16:]  # p: to offset 60 of the layer
    names = ("lo", "n", "p", "c", "f")
    built = []
    ctx = _context_with_bytes(data)
    struct_t = _templates()[5]
    for stock in (False, True):
        with pytest.MonkeyPatch.context() as mp:
            if stock:
                _stock_volatility3(mp)
            struct = struct_t(ctx, iobjects.ObjectInformation(layer_name="mem", offset=offset,
                                                                      native_layer_name="mem"))
            members = [getattr(struct, name) for name in names]
            if write_first:
                for m in members:
                    m._vol["note"] = "x"
            target = members[2].dereference()
            built.append((struct, members, target))
    (ours, our_members, our_target), (stock, stock_members, stock_target) = built
    parents = {id(ours): stock, id(our_members[2]): stock_members[2]}
    for a, b in zip(our_members + [our_target], stock_members + [stock_target]):
        _same_state(a, b, parents)
        assert a._vol.get("note") == b._vol.get("note")


def test_a_template_with_other_arguments_takes_the_stock_constructor():
    """A template holding an argument its class does not take fails as stock fails."""
    voladapt.adapt_volatility3()
    ctx = _context_with_bytes(bytes(16))
    extra = templates.ObjectTemplate(objects.Integer, "u16", data_format=objects.DataFormatInfo(2, "little", False))
    extra.update_vol(note="x")
    info = iobjects.ObjectInformation(layer_name="mem", offset=0, native_layer_name="mem")
    errors = []
    for call in (extra, lambda c, i: _stock_template_call(extra, c, i)):
        try:
            call(ctx, info)
        except TypeError as exc:
            errors.append(str(exc))
    assert len(errors) == 2 and errors[0] == errors[1] and "note" in errors[0]


def test_template_sizes_are_stock_sizes():
    voladapt.adapt_volatility3()
    for t in _templates():
        assert t.size == t.vol.object_class.VolTemplateProxy.size(t)
    sizeless = templates.ObjectTemplate(objects.StructType, "s", members={})
    for get in (lambda: sizeless.size, lambda: objects.StructType.VolTemplateProxy.size(sizeless)):
        try:
            get()
        except ValueError as exc:
            assert str(exc) == "ObjectTemplate not provided with a size"
        else:
            raise AssertionError("a struct template without a size has no size")


def test_pointer_dereference_and_readability_are_stock():
    voladapt.adapt_volatility3()
    data = (24).to_bytes(8, "little") + (31).to_bytes(8, "little") + bytes(range(16))  # 31: its u16 ends past the layer
    ctx = _context_with_bytes(data)
    ptr_t = _templates()[4]

    class Space:  # what a DeferredTemplate resolves its type name through
        def get_type(self, name):
            assert name == "u16"
            return ptr_t.vol.subtype

    # the subtype as a template, and deferred (as volbridge makes pointer subtypes)
    deferred_t = templates.ObjectTemplate(objects.Pointer, "pointer", subtype=volbridge.DeferredTemplate(
        Space(), "u16"), data_format=objects.DataFormatInfo(8, "little", False))
    for template in (ptr_t, deferred_t):
        for offset, readable in ((0, True), (8, False)):
            info = iobjects.ObjectInformation(layer_name="mem", offset=offset, native_layer_name="mem")
            ours, stock = template(ctx, info), template(ctx, info)
            assert ours.is_readable() == objects.Pointer.is_readable.__wrapped__(stock) == readable
            if readable:
                a, b = ours.dereference(), objects.Pointer.dereference.__wrapped__(stock)
                assert int(a) == int(b) == int.from_bytes(data[24:26], "little") and _vol(a) == _vol(b)
                assert ours.dereference() is a  # cached per layer, as stock
    struct = _templates()[5](ctx, iobjects.ObjectInformation(layer_name="mem", offset=0, native_layer_name="mem"))
    for name in ("lo", "p", "nope"):
        assert struct.has_member(name) == objects.AggregateType.has_member.__wrapped__(struct, name)


def test_template_size_follows_writes_to_the_template():
    """A template's size is kept on its vol until the vol is written to."""
    voladapt.adapt_volatility3()
    u16 = templates.ObjectTemplate(objects.Integer, "u16", data_format=objects.DataFormatInfo(2, "little", False))
    struct = templates.ObjectTemplate(objects.StructType, "s", size=8, members={})
    assert (u16.size, struct.size) == (2, 8)
    u16.update_vol(data_format=objects.DataFormatInfo(4, "little", False))
    struct.update_vol(size=24)
    assert (u16.size, struct.size) == (4, 24)
    assert struct.clone().size == 8  # a clone holds the arguments as constructed, as stock
    arr = templates.ObjectTemplate(objects.Array, "arr", count=3, subtype=u16)
    assert arr.size == 12
    u16.update_vol(data_format=objects.DataFormatInfo(8, "little", False))
    assert arr.size == 24  # an array's size follows its subtype's (never kept)


def test_live_layers_are_a_layer_container():
    """LiveContext's layers: a dict that is also volatility3's LayerContainer, read as an attribute."""
    from volatility3.framework import exceptions
    from volatility3.framework.interfaces.layers import LayerContainer
    from volatility3.framework.layers.physical import BufferDataLayer

    ctx = volbridge.LiveContext()
    layers = ctx.layers
    assert isinstance(layers, LayerContainer) and layers is contexts.Context.layers.fget(ctx)
    ctx.add_layer(BufferDataLayer(ctx, "cfg", "mem", bytes(range(64))))
    assert list(layers) == ["mem"] and len(layers) == 1 and "mem" in layers
    assert layers.read("mem", 4, 4) == bytes(range(4, 8)) and layers.free_layer_name("mem") == "mem_1"
    try:
        ctx.add_layer(BufferDataLayer(ctx, "cfg", "mem", bytes(8)))
    except exceptions.LayerException:
        pass
    else:
        raise AssertionError("a second layer of the same name is refused, as stock")
    for missing in (lambda: layers["nope"], lambda: layers.read("nope", 0, 1)):
        try:
            missing()
        except KeyError:
            pass
        else:
            raise AssertionError("an unknown layer is a KeyError, as stock")
    layers.del_layer("mem")
    assert list(layers) == [] and dict(layers) == {}


def _context_with_table(data: bytes):
    """A context with ``data`` as layer ``mem`` and a symbol table ``t`` (struct ``s``,
    ``u16``, a ``pointer`` to ``u16``, a ``list_head`` of the Linux extension class)."""
    from volatility3.framework.symbols.linux import extensions as ext

    ctx = _context_with_bytes(data)
    u16 = {"kind": "base", "name": "unsigned short"}
    isf = {
        "metadata": {"format": "6.2.0", "producer": {"name": "test", "version": "0"}},
        "base_types": {"unsigned short": {"kind": "int", "size": 2, "signed": False, "endian": "little"},
                       "int": {"kind": "int", "size": 4, "signed": True, "endian": "little"},
                       "pointer": {"kind": "int", "size": 8, "signed": False, "endian": "little"}},
        "user_types": {
            "s": {"kind": "struct", "size": 24, "fields": {
                "lo": {"offset": 0, "type": u16}, "n": {"offset": 4, "type": {"kind": "base", "name": "int"}},
                "p": {"offset": 8, "type": {"kind": "pointer", "subtype": u16}}}},
            "list_head": {"kind": "struct", "size": 16, "fields": {
                "next": {"offset": 0, "type": {"kind": "pointer", "subtype": {"kind": "struct", "name": "list_head"}}},
                "prev": {"offset": 8, "type": {"kind": "pointer", "subtype": {"kind": "struct", "name": "list_head"}}}}},
        },
        "enums": {}, "symbols": {},
    }
    table = volbridge.PreloadedISF(ctx, "tables.t", "t", "test:isf", isf=isf,
                                   class_types={"list_head": ext.list_head})
    ctx.symbol_space.append(table)
    return ctx


@settings(max_examples=40, deadline=None)
@given(st.binary(min_size=96, max_size=96), st.integers(0, 40), st.sampled_from(
    ["s", "t!s", "unsigned short", "t!int", "pointer", "list_head", "t!list_head"]))
def test_casts_are_stock_objects(data, offset, new_type):
    """A cast (of a struct, and of one of its members: another member name and
    parent) builds what stock's clone-and-call builds; with extra arguments, or
    to a type that does not exist, it is stock's own cast."""
    import pytest

    from volatility3.framework.layers.physical import BufferDataLayer

    voladapt.adapt_volatility3()
    ctx = _context_with_table(data)
    ctx.layers.add_layer(BufferDataLayer(ctx, "cfg2", "native", data))
    stock_cast = iobjects.ObjectInterface.cast.__wrapped__
    source = ctx.object("t!s", "mem", offset, native_layer_name="native")
    for obj in (source, source.n):
        ours = obj.cast(new_type)
        assert ours._vol._parts is not None  # built by a maker, not by stock's clone
        with pytest.MonkeyPatch.context() as mp:
            _stock_volatility3(mp)
            theirs = stock_cast(obj, new_type)
        _same_state(ours, theirs, {})
        assert ours.vol.parent is theirs.vol.parent and ours.vol.member_name == obj.vol.member_name
        assert ours.vol.native_layer_name == "native"
        if isinstance(ours, int):
            assert int(ours) == int(theirs)
    to_int = ctx.symbol_space.get_type("t!int")  # extra arguments: stock's path
    ours = source.cast("pointer", subtype=to_int)
    theirs = stock_cast(source, "pointer", subtype=to_int)
    assert ours.vol.subtype is to_int and int(ours) == int(theirs)
    _same_state(ours, theirs, {})
    ctx.symbol_space.get_type("t!s").update_vol(size=32)  # not carried to a clone: stock's cast, size 24
    resized = source.cast("s")
    assert resized.vol.size == stock_cast(source, "s").vol.size == 24
    for cast in (source.cast, lambda name: stock_cast(source, name)):
        with pytest.raises(Exception) as err:
            cast("nope")
        assert "nope" in str(err.value)


def test_members_kept_in_the_instance_dict_and_dir_is_stocks():
    """A member built once is the same object on every access (kept in the instance
    ``__dict__``, so no failed lookup and ``__getattr__`` call the next time), and
    ``dir()`` lists what stock lists: each member once, a value set on the object
    (as pdbutil does) as stock sees it."""
    import pytest

    voladapt.adapt_volatility3()
    data = bytes(range(96))
    ctx = _context_with_bytes(data)
    struct_t = _templates()[5]
    dirs, values = [], []
    for stock in (False, True):
        with pytest.MonkeyPatch.context() as mp:
            if stock:
                _stock_volatility3(mp)
                mp.setattr(objects.AggregateType, "__dir__", objects.AggregateType.__dir__.__wrapped__)
            struct = struct_t(ctx, iobjects.ObjectInformation(layer_name="mem", offset=8, native_layer_name="mem"))
            first = [struct.lo, struct.member("n"), struct.p, struct.n]
            assert struct.lo is first[0] and struct.n is first[1] is first[3] and struct.member("p") is first[2]
            assert ("lo" in vars(struct)) is not stock  # ours: the instance dict holds it
            if not stock:
                struct.f
                assert "f" in vars(struct)  # from its first access
                del vars(struct)["f"]
                assert struct.f is struct._concrete_members["f"] and "f" in vars(struct)  # from the members cache
            struct.c = 7  # set on the object: shadows the member, in stock and here
            values.append((int(struct.lo), int(struct.n), int(struct.p), struct.c, int(struct.f)))
            dirs.append(dir(struct))
            with pytest.raises(AttributeError, match="has no attribute: s.nope"):
                struct.nope
    assert dirs[0] == dirs[1] and dirs[0].count("lo") == 1 and dirs[0].count("c") == 2
    assert values[0] == values[1]


view_keys = st.sampled_from(["a", "size", "offset", "type_name", "get", "keys", "_dict", "x"])
view_ops = st.lists(st.tuples(st.sampled_from(["set", "del", "pop", "clear", "ior", "view"]), view_keys,
                              st.integers()), max_size=12)


def _seen_through(view, names) -> tuple:
    """What a ReadOnlyMapping shows: attributes (or their error), items, length, iteration."""
    attrs = []
    for name in names:
        try:
            value = getattr(view, name)
            attrs.append(("bound", name) if callable(value) and name in ("get", "keys") else value)
        except AttributeError as exc:
            attrs.append(("AttributeError", str(exc)))
    return attrs, [view.get(n) for n in names], [n in view for n in names], len(view), list(view), dict(view)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.dictionaries(view_keys, st.integers()), min_size=1, max_size=3), view_ops)
def test_vol_views_are_stock_read_only_mappings(ms, script):
    """``obj.vol`` made once per map (a view over the flat dict where it can be)
    shows what stock's new ReadOnlyMapping shows, after any writes: views taken
    before a write (kept by a caller) as well as after, keys that are names of
    the mapping class (``get``, ``keys``) included."""
    voladapt.adapt_volatility3()
    stock = collections.ChainMap(*[dict(m) for m in ms])
    ours = voladapt.VolChainMap(*[dict(m) for m in ms])
    holder = type("Holder", (), {"vol": iobjects.ObjectInterface.vol})()
    holder._vol = ours
    kept = [holder.vol]
    assert holder.vol is kept[0]  # made once
    names = ["a", "size", "offset", "type_name", "get", "keys", "x", "nope"]
    for op, key, value in script:
        _write_both(stock, ours, op, key, value)
        kept.append(holder.vol)
        expected = _seen_through(iobjects.ReadOnlyMapping(stock), names)
        for view in kept:
            assert _seen_through(view, names) == expected


@settings(max_examples=40, deadline=None)
@given(st.binary(min_size=96, max_size=96), st.integers(0, 40), st.sampled_from(
    ["t!s", "t!unsigned short", "t!int", "t!pointer", "t!list_head"]), st.booleans(), st.sampled_from([None, "native"]))
def test_context_objects_are_stock_objects(data, offset, type_name, as_template, native):
    """``Context.object`` for a type name, or for the type's template (as
    ``Module.object_from_symbol`` passes it), builds what stock's clone, update
    and call builds; a template with additions, a reference template and extra
    arguments take stock's path."""
    import pytest

    from volatility3.framework.layers.physical import BufferDataLayer

    voladapt.adapt_volatility3()
    ctx = _context_with_table(data)
    ctx.layers.add_layer(BufferDataLayer(ctx, "cfg2", "native", data))
    stock_object = contexts.Context.object.__wrapped__
    kind = ctx.symbol_space.get_type(type_name) if as_template else type_name
    clones = []
    with pytest.MonkeyPatch.context() as mp:
        clone = templates.ObjectTemplate.clone
        mp.setattr(templates.ObjectTemplate, "clone", lambda self: clones.append(self) or clone(self))
        ours = ctx.object(kind, "mem", offset, native_layer_name=native)
    assert ours._vol._parts is not None and not clones  # built by a maker, not by stock's clone and call
    with pytest.MonkeyPatch.context() as mp:
        _stock_volatility3(mp)
        theirs = stock_object(ctx, kind, "mem", offset, native_layer_name=native)
    _same_state(ours, theirs, {})
    if isinstance(ours, int):
        assert int(ours) == int(theirs)
    ref = templates.ReferenceTemplate(type_name=type_name)  # stock resolves it: the same object
    _same_state(ctx.object(ref, "mem", offset), stock_object(ctx, ref, "mem", offset), {})
    grown = ctx.symbol_space.get_type("t!s").clone()
    grown.update_vol(size=32)  # an addition, which stock writes into its clone again
    made = ctx.object(grown, "mem", offset)
    assert made.vol.size == stock_object(ctx, grown, "mem", offset).vol.size == 32
