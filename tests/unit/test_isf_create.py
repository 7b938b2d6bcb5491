"""volbridge.isf_create and LazySymbolSpace.free_table_name: stock's tables and names, found and parsed once.

library_list creates an ELF symbol table for every memory map of every process;
stock searched, opened, parsed and validated the ISF file each time, and
counted table names from 1 each time (minutes and 2 GB at 2,000 tasks).
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings, strategies as st
from volatility3.framework import contexts, interfaces, symbols
from volatility3.framework.symbols import intermed
from volatility3.framework.symbols.linux.extensions import elf

from shadowvol import volbridge

def _stock_create():
    volbridge.adapt_isf_create()
    return intermed.IntermediateSymbolTable.__dict__["create"].__func__.__wrapped__


def _tables(ctx, create, calls):
    return [create(intermed.IntermediateSymbolTable, ctx, f"cfg{i}", "linux", "elf", None, None, types, mask)
            for i, (types, mask) in enumerate(calls)]


def _summary(ctx, name: str) -> tuple:
    table = ctx.symbol_space[name]
    ehdr = table.get_type("Elf64_Ehdr")
    return (name, isinstance(table, intermed.IntermediateSymbolTable), dict(table.config),
            table.natives.name if table.natives else None, sorted(table.types), sorted(table.enumerations),
            ehdr.size, sorted(ehdr.vol.members), ehdr.vol.object_class,
            table.get_type("Elf").vol.object_class, table.get_type_class("Elf"))


def test_tables_are_stock_tables_and_the_file_is_read_once(monkeypatch):
    stock_create = _stock_create()
    calls = [(None, 0), (elf.class_types, 0), (None, (1 << 48) - 1), (elf.class_types, 0)]
    stock_ctx = contexts.Context()
    stock_names = _tables(stock_ctx, stock_create, calls)

    live = volbridge.LiveContext()
    searched = []
    real_search = intermed.IntermediateSymbolTable.file_symbol_url.__func__

    def counting_search(cls, sub_path, filename=None):
        searched.append((sub_path, filename))
        return real_search(cls, sub_path, filename)

    monkeypatch.setattr(intermed.IntermediateSymbolTable, "file_symbol_url", classmethod(counting_search))
    names = [intermed.IntermediateSymbolTable.create(live, f"cfg{i}", "linux", "elf", class_types=types,
                                                     symbol_mask=mask)
             for i, (types, mask) in enumerate(calls)]
    assert names == stock_names == ["elf1", "elf2", "elf3", "elf4"]
    assert searched == [("linux", "elf")] and list(live.isf_files) == [("linux", "elf")]
    for name in names:
        assert _summary(live, name) == _summary(stock_ctx, name)
    assert live.symbol_space["elf1"].get_type_class("Elf") is not live.symbol_space["elf2"].get_type_class("Elf")


def test_what_stock_takes_stays_stock(monkeypatch):
    _stock_create()
    with pytest.raises(FileNotFoundError, match="No symbol files found at provided filename: nope"):
        intermed.IntermediateSymbolTable.create(volbridge.LiveContext(), "cfg", "linux", "nope")


    class Subclass(intermed.IntermediateSymbolTable):  # its own create is stock's, its tables its own class
        pass

    live = volbridge.LiveContext()
    assert type(live.symbol_space[Subclass.create(live, "cfg", "linux", "elf")]) is Subclass
    used = []
    monkeypatch.setattr(volbridge, "PreloadedISF", lambda *a, **k: used.append(a))
    ctx = contexts.Context()  # not a live context: stock's own create
    name = intermed.IntermediateSymbolTable.create(ctx, "cfg", "linux", "elf")
    assert name == "elf1" and isinstance(ctx.symbol_space[name], intermed.IntermediateSymbolTable)
    assert not used


class _Table(interfaces.symbols.BaseSymbolTableInterface):
    def __init__(self, name: str) -> None:
        self.name = name


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["new", "add", "remove"]), st.sampled_from(["elf", "layer", "t"]),
                          st.integers(1, 6)), max_size=40))
def test_free_table_names_are_stocks(script):
    """After any appends (of free names or any others) and removals, the name is stock's."""
    ours, stock = volbridge.LazySymbolSpace(), symbols.SymbolSpace()
    for op, prefix, n in script:
        if op == "new":
            name = ours.free_table_name(prefix)
            assert name == stock.free_table_name(prefix)
            for space in (ours, stock):
                space.append(_Table(name))
        elif op == "add":
            for space in (ours, stock):
                space.append(_Table(f"{prefix}{n}"))
        elif f"{prefix}{n}" in stock:
            for space in (ours, stock):
                space.remove(f"{prefix}{n}")
        assert ours.free_table_name(prefix) == stock.free_table_name(prefix)


def test_a_tables_types_are_stocks_merged_once():
    """``types`` lists what stock's lists, in its order (user types, then natives),
    and answers ``SymbolSpace.has_type`` alike; the merge is made once per table."""
    stock_create = _stock_create()
    stock_ctx, live = contexts.Context(), volbridge.LiveContext()
    [stock_name] = _tables(stock_ctx, stock_create, [(None, 0)])
    name = intermed.IntermediateSymbolTable.create(live, "cfg", "linux", "elf")
    ours, stock = live.symbol_space[name], stock_ctx.symbol_space[stock_name]
    assert type(ours) is volbridge.PreloadedISF
    assert list(ours.types) == list(stock.types) and len(ours.types) > 20
    assert ours.types is ours.types and stock.types is not stock.types
    for type_name in ("Elf64_Ehdr", "Elf", "unsigned int", "pointer", "nope", "Elf64_Ehdr!x"):
        assert live.symbol_space.has_type(f"{name}!{type_name}") == \
            stock_ctx.symbol_space.has_type(f"{stock_name}!{type_name}")


def _template_summary(template) -> tuple:
    members = template.vol.get("members", {})
    return (template.vol.type_name, template.vol.object_class, template.size,
            sorted((name, offset, child.vol.type_name, child.vol.object_class, child.size)
                   for name, (offset, child) in members.items()))


def _tables_resolved(space) -> set:
    return {key.partition("!")[0] for key in space._resolved}


def test_transient_tables_drop_their_resolved_types_and_resolve_them_again():
    """Only the newest KEEP_RESOLVED tables made by ``create`` keep their resolved
    templates; an older one asked again resolves what stock resolves. Other
    tables' types stay, and ``remove`` still empties the cache, as stock's does."""
    stock_create = _stock_create()
    stock_ctx, live = contexts.Context(), volbridge.LiveContext()
    space = live.symbol_space
    space.KEEP_RESOLVED = 3
    _, elf_isf = volbridge._load_isf_file(intermed.IntermediateSymbolTable, "linux", "elf")
    keep = volbridge.PreloadedISF(live, "keep.cfg", "keep", "test:elf", isf=elf_isf)  # not a transient table
    space.append(keep)
    kept = space.get_type("keep!Elf64_Ehdr")
    names = [intermed.IntermediateSymbolTable.create(live, f"cfg{i}", "linux", "elf", class_types=elf.class_types)
             for i in range(8)]
    stock_names = _tables(stock_ctx, stock_create, [(elf.class_types, 0)] * 8)
    first = {}
    for name in names:
        first[name] = space.get_type(f"{name}!Elf64_Ehdr")
        space.get_type(f"{name}!Elf")
    assert _tables_resolved(space) == {"keep", *names[-3:]}
    assert space.get_type("keep!Elf64_Ehdr") is kept
    assert all(space.get_type(f"{name}!Elf64_Ehdr") is first[name] for name in names[-3:])
    for name, stock_name in zip(names, stock_names):
        again = space.get_type(f"{name}!Elf64_Ehdr")
        stock = stock_ctx.symbol_space.get_type(f"{stock_name}!Elf64_Ehdr")
        assert _template_summary(again) == _template_summary(first[name]) == _template_summary(stock)
        assert space.get_type(f"{name}!Elf").vol.object_class is elf.elf
    assert not any(first[name] is space._resolved.get(f"{name}!Elf64_Ehdr") for name in names[:5])
    space.remove(names[-1])
    assert not space._resolved and names[-1] not in space
    more = [intermed.IntermediateSymbolTable.create(live, f"more{i}", "linux", "elf") for i in range(4)]
    for name in [names[0]] + more:
        space.get_type(f"{name}!Elf64_Phdr")
    assert _tables_resolved(space) == set(more[-3:])
